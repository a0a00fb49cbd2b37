"""Gemma 4 targets: parity with DeepSpec's Gemma 4 fixture and with transformers.

The fixture (``../shared/fixtures/deepspec_gemma4_vanilla``, see its README) is a tiny random
``Gemma4ForConditionalGeneration`` in the released multimodal layout (mixed sliding/full
layers, k_eq_v, KV-shared and double-wide layers, proportional RoPE, layer scalars, a soft cap)
with reference arrays from DeepSpec's own code, compared at its stated float32 tolerance
(rtol = atol = 1e-3) with every token exact. A transformers model built and saved here covers
the cache beyond the fixture: prompts several windows long, sliding rings shorter than the
cache, verify chunks rolled back.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax import decoding, gemma4, target
from dspark_jax.checkpoint import load_target
from dspark_jax.config import ConfigError
from fixtures import require_fixture
from hf_models import hf_gemma4_forward, make_hf_gemma4

TOL = dict(rtol=1e-3, atol=1e-3)  # the fixture README's float32 parity bound
FIXTURE = "deepspec_gemma4_vanilla"


@functools.partial(jax.jit, static_argnames=("cfg", "feature_layers"))
def run_chunk(params, cfg, tokens, cache, feature_layers=()):
    return target.forward(params, cfg, tokens, cache, feature_layers=feature_layers)


@pytest.fixture(scope="module")
def fixture_dir():
    return require_fixture(FIXTURE, "reference.npz", "target/config.json", "target/model.safetensors")


@pytest.fixture(scope="module")
def ref(fixture_dir):
    return dict(np.load(fixture_dir / "reference.npz"))


@pytest.fixture(scope="module")
def fixture_target(fixture_dir):
    return load_target(fixture_dir / "target", "float32")


# --------------------------------------------------------------------------- the fixture


def test_config_reads_every_gemma4_feature_of_the_fixture(fixture_target):
    _, cfg = fixture_target
    specs = cfg.layer_specs()
    assert [s.sliding for s in specs] == [True, True, False, True, True, False]
    assert [(s.head_dim, s.kv_heads) for s in specs] == [(16, 2), (16, 2), (32, 1), (16, 2), (16, 2), (32, 1)]
    assert [s.source for s in specs] == [0, 1, 2, 3, 3, 2]  # layers 4, 5 read layers 3, 2
    assert [s.mlp_width for s in specs] == [48, 48, 48, 48, 96, 96]
    assert cfg.rope_full.rope_type == "proportional" and cfg.rope_full.partial_rotary_factor == 0.25
    assert cfg.final_logit_softcapping == 5.0 and cfg.tie_word_embeddings and cfg.sliding_window == 16


def test_loader_accounts_for_every_tensor_and_names_the_ignored_towers(fixture_dir):
    from dspark_jax.safetensors_io import TensorSource

    cfg = gemma4.load_gemma4_config(fixture_dir / "target")
    keys = json.loads((fixture_dir / "target" / "keys.json").read_text())
    names = {t["name"] for t in keys["tensors"]}
    with TensorSource(fixture_dir / "target") as source:
        accounting = gemma4.tensor_accounting(source.names(), gemma4.target_decl(cfg))
        assert source.names() == names
    assert accounting["text"] == 79
    assert sum(accounting["ignored"].values()) == 86
    assert set(accounting["ignored"]) == {"model.vision_tower", "model.embed_vision", "model.audio_tower",
                                          "model.embed_audio"}


@pytest.fixture(scope="module")
def fixture_forward(fixture_target, ref):
    """One cache-less forward over the prompt and the greedy continuation (but its last
    token): causal, so its first 40 positions are the prompt's own run."""
    params, cfg = fixture_target
    seq = np.concatenate([ref["prompt_ids"], ref["greedy_ids"][:, :-1]], axis=1)
    out, _ = run_chunk(params, cfg, jnp.asarray(seq, jnp.int32), None, tuple(range(-1, cfg.num_hidden_layers - 1)))
    return out


def test_target_logits_and_every_hidden_state_match_deepspec(fixture_target, fixture_forward, ref):
    cfg = fixture_target[1]
    np.testing.assert_allclose(np.asarray(fixture_forward.logits)[:, :40], ref["target_logits"], **TOL)
    hidden_all = ref["target_hidden_all"]  # [0] scaled embedding, [i] layer i-1, [6] final-normed
    layers = np.asarray(fixture_forward.features)[0, :40].reshape(40, cfg.num_hidden_layers, -1).transpose(1, 0, 2)
    for i in range(cfg.num_hidden_layers):
        np.testing.assert_allclose(layers[i], hidden_all[i], **TOL, err_msg=f"hidden_states[{i}]")
    np.testing.assert_allclose(np.asarray(fixture_forward.hidden)[0, :40], hidden_all[-1], **TOL, err_msg="final-normed")


def test_greedy_step_logits_match_deepspec(fixture_forward, ref):
    np.testing.assert_allclose(np.asarray(fixture_forward.logits)[:, 39:], ref["greedy_logits"], **TOL)


def test_ar_greedy_continuation_is_deepspecs_token_for_token(fixture_target, ref):
    params, cfg = fixture_target
    # the reference continuation ignores eos; ours stops at it, so check none is generated
    assert not set(ref["greedy_ids"][0].tolist()) & set(cfg.eos_token_ids)
    tokens = decoding.generate_ar(params, cfg, [ref["prompt_ids"][0].tolist()], max_new_tokens=16)
    assert tokens[0] == ref["greedy_ids"][0].tolist()


@pytest.mark.parametrize("field, value, message", [
    ("hidden_size_per_layer_input", 256, "per-layer inputs"),
    ("enable_moe_block", True, "MoE block"),
    ("use_bidirectional_attention", "all", "non-causal"),
    ("hidden_activation", "silu", "hidden_activation"),
])
def test_unsupported_gemma4_feature_is_a_clear_error_at_load(fixture_dir, tmp_path, field, value, message):
    for name in ("model.safetensors", "generation_config.json"):
        os.symlink(fixture_dir / "target" / name, tmp_path / name)
    raw = json.loads((fixture_dir / "target" / "config.json").read_text())
    raw["text_config"][field] = value
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=message) as err:
        load_target(tmp_path, "float32")
    assert str(tmp_path / "config.json") in str(err.value) and field in str(err.value)


# --------------------------------------------------------------------------- transformers

WINDOW = 8
PROMPT = 50  # more than six windows
STEPS = 6
S, F = gemma4.SLIDING, gemma4.FULL
# a period of (sliding, sliding, full) twice, then a KV-shared (sliding, full) tail
HF_LAYER_TYPES = (S, S, F, S, S, F, S, F)


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma4")
    model = make_hf_gemma4(path, window=WINDOW, seed=3, layer_types=HF_LAYER_TYPES, kv_shared=2)
    params, cfg = load_target(path, "float32")
    ids = np.random.RandomState(1).randint(0, cfg.vocab_size, (2, PROMPT + STEPS)).astype(np.int32)
    logits, hidden = hf_gemma4_forward(model, ids)
    return dict(params=params, cfg=cfg, ids=ids, logits=logits, hidden=hidden)


def test_whole_sequence_matches_transformers(hf_pair):
    p = hf_pair
    cfg = p["cfg"]
    out, _ = run_chunk(p["params"], cfg, jnp.asarray(p["ids"]), None, tuple(range(-1, cfg.num_hidden_layers - 1)))
    np.testing.assert_allclose(np.asarray(out.logits), p["logits"], rtol=1e-4, atol=1e-4)
    layers = np.split(np.asarray(out.features), cfg.num_hidden_layers, axis=-1)
    for i, h in enumerate(layers):
        np.testing.assert_allclose(h, p["hidden"][i], rtol=1e-4, atol=1e-4, err_msg=f"hidden_states[{i}]")


def test_prefill_then_steps_through_sliding_rings_match_transformers(hf_pair):
    """Prefill in chunks of 5 tokens into a cache whose sliding layers keep a ring of
    window + chunk - 1 = 12 slots (of 64), then one token at a time; a verify-sized chunk is
    written before each step and never committed (rejected drafts), so a ring that let it
    overwrite keys still in the window would fail."""
    p = hf_pair
    params, cfg, ids = p["params"], p["cfg"], p["ids"]
    cache = gemma4.init_cache(cfg, 2, 64, max_chunk=5)
    assert cache.ring == WINDOW - 1 + 5 and cache.sliding_k.shape[0] == 4 and cache.full_k.shape[0] == 2
    for start in range(0, PROMPT, 5):
        out, cache = run_chunk(params, cfg, jnp.asarray(ids[:, start : start + 5]), cache)
        cache = cache.advance(5)
        np.testing.assert_allclose(np.asarray(out.logits), p["logits"][:, start : start + 5], rtol=1e-4, atol=1e-4,
                                   err_msg=f"prefill chunk at {start}")
    junk = jnp.asarray(np.random.RandomState(2).randint(0, cfg.vocab_size, (2, 5)), jnp.int32)
    for t in range(PROMPT, PROMPT + STEPS):
        _, cache = run_chunk(params, cfg, junk, cache)  # written, rolled back (lengths unchanged)
        out, cache = run_chunk(params, cfg, jnp.asarray(ids[:, t : t + 1]), cache)
        cache = cache.advance(1)
        np.testing.assert_allclose(np.asarray(out.logits)[:, 0], p["logits"][:, t], rtol=1e-4, atol=1e-4,
                                   err_msg=f"position {t}")


def test_cache_stores_only_unshared_layers_and_sliding_layers_only_their_ring(hf_pair):
    cfg = hf_pair["cfg"]
    cache = gemma4.init_cache(cfg, 1, 4096)
    # 8 layers: 2 shared store nothing; 4 sliding rings of window - 1 + MAX_CHUNK; 2 full layers
    assert cache.sliding_k.shape == (4, 1, WINDOW - 1 + gemma4.MAX_CHUNK, cfg.num_key_value_heads, cfg.head_dim)
    assert cache.full_k.shape == (2, 1, 4096, 1, cfg.global_head_dim)
    with pytest.raises(ValueError, match="sliding ring"):
        target.forward(hf_pair["params"], cfg, jnp.zeros((1, gemma4.MAX_CHUNK + 1), jnp.int32), cache)


def test_repeated_layer_pattern_runs_as_one_scanned_group_per_period(hf_pair):
    """The stored layers' (sliding, sliding, full) period repeats twice: one group of two
    repeats, whose weights stack the checkpoint's layers 0, 3 / 1, 4 / 2, 5; the shared tail
    is its own group."""
    cfg, params = hf_pair["cfg"], hf_pair["params"]
    groups = cfg.layer_groups()
    assert [(g.start, g.repeats, g.period) for g in groups] == [(0, 2, 3), (6, 1, 2)]
    assert [groups[0].layer_ids(j) for j in range(3)] == [(0, 3), (1, 4), (2, 5)]
    decl = gemma4.target_decl(cfg).layers[0][2].k_proj
    assert decl.tensor_names() == [f"model.language_model.layers.{i}.self_attn.k_proj.weight" for i in (2, 5)]
    assert params.layers[0][2].k_proj.shape == (2, cfg.hidden_size, 1, cfg.global_head_dim)


def test_untied_gemma4_without_k_eq_v_matches_transformers(tmp_path):
    model = make_hf_gemma4(tmp_path, k_eq_v=False, tie=False, seed=4, layer_types=("sliding_attention", "full_attention",
                                                                                    "full_attention"), kv_shared=1)
    params, cfg = load_target(tmp_path, "float32")
    assert params.lm_head is not None and all(p.v_proj is not None for group in params.layers for p in group
                                                  if p.k_proj is not None)  # every stored layer
    ids = np.random.RandomState(5).randint(0, cfg.vocab_size, (1, 20)).astype(np.int32)
    out, _ = run_chunk(params, cfg, jnp.asarray(ids), None)
    np.testing.assert_allclose(np.asarray(out.logits), hf_gemma4_forward(model, ids)[0], rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- the DSpark drafter


@pytest.fixture(scope="module")
def fixture_draft(fixture_dir, fixture_target):
    from dspark_jax.checkpoint import load_draft

    return load_draft(fixture_dir / "draft", *fixture_target, "float32")


@pytest.fixture(scope="module")
def eval_path(fixture_target, fixture_draft, ref):
    """DeepSpec's eval path replayed: prefill, round 1, verify, 2 drafts accepted, the context
    append of the 3 committed positions, round 2; arrays keyed by the reference names."""
    from dspark_jax import draft as Dr
    from test_draft import kv_to_deepspec

    tp, tc = fixture_target
    dp, dc = fixture_draft
    ids = jnp.asarray(ref["prompt_ids"], jnp.int32)
    P, accepted = ids.shape[1], 2
    ours: dict = {}
    cache = target.init_cache(tc, 1, 64)
    pre, cache = run_chunk(tp, tc, ids, cache, dc.target_layer_ids)
    cache = cache.advance(P)
    ours["context_features"] = pre.features
    anchor1 = jnp.argmax(pre.logits[:, -1], -1).astype(jnp.int32)
    fx = type("Fx", (), dict(dp=dp, dc=dc, tp=tp))
    from test_draft import draft_round

    ctx1 = Dr.append_context(dp, dc, Dr.init_context_cache(dc, 1, 64), pre.features, jnp.array([P]))
    ours["r1_ctx_proj"] = Dr.project_context(dp, dc, pre.features)
    ours["r1_draft_cache_k"], ours["r1_draft_cache_v"] = kv_to_deepspec(ctx1.k, P), kv_to_deepspec(ctx1.v, P)
    ours.update({f"r1_{k}": v for k, v in draft_round(fx, ctx1, anchor1).items()})
    vin = jnp.concatenate([anchor1[:, None], ours["r1_draft_tokens"]], 1)
    vout, _ = run_chunk(tp, tc, vin, cache, dc.target_layer_ids)
    ours.update(r1_verify_input_ids=vin, r1_verify_logits=vout.logits, r1_verify_context_features=vout.features)
    anchor2 = jnp.argmax(vout.logits[:, accepted], -1).astype(jnp.int32)
    ours["r2_target_hidden_states"] = vout.features[:, : accepted + 1]
    ours["r2_ctx_proj"] = Dr.project_context(dp, dc, ours["r2_target_hidden_states"])
    ctx2 = Dr.append_context(dp, dc, ctx1, vout.features, jnp.array([accepted + 1]))
    S2 = P + accepted + 1
    ours["r2_draft_cache_k"], ours["r2_draft_cache_v"] = kv_to_deepspec(ctx2.k, S2), kv_to_deepspec(ctx2.v, S2)
    ours.update({f"r2_{k}": v for k, v in draft_round(fx, ctx2, anchor2).items()})
    ours["r2_verify_input_ids"] = jnp.concatenate([anchor2[:, None], ours["r2_draft_tokens"]], 1)
    return ours, int(anchor1[0]), int(anchor2[0])


DRAFT_FLOATS = ["context_features", "r1_verify_logits", "r1_verify_context_features", "r2_target_hidden_states"] + [
    f"{r}_{n}" for r in ("r1", "r2") for n in ("ctx_proj", "draft_cache_k", "draft_cache_v", "layer_out",
                                             "block_hidden", "base_logits", "corrected_logits", "confidence_logits")]
DRAFT_IDS = [f"{r}_{n}" for r in ("r1", "r2") for n in ("draft_input_ids", "draft_tokens", "verify_input_ids")]


def test_drafter_config_is_deepspecs_gemma4_dspark(fixture_draft):
    from dspark_jax import draft as Dr

    dp, dc = fixture_draft
    assert dc.is_gemma4 and dc.head_type == "vanilla" and dc.target_layer_ids == (-1, 2, 4)
    assert [s.mlp_width for s in gemma4.draft_layer_specs(dc.layers)] == [48, 96, 96]
    assert all(p.v_proj is None and p.k_proj.shape == (64, 1, 32) for p in dp.layers)  # k_eq_v, global geometry
    assert Dr.init_context_cache(dc, 1, 8).k.shape == (3, 1, 8, 1, 32)


def test_drafter_eval_path_floats_match_deepspec(eval_path, ref):
    ours = eval_path[0]
    for name in DRAFT_FLOATS:
        np.testing.assert_allclose(np.asarray(ours[name]), ref[name], **TOL, err_msg=name)


def test_drafter_eval_path_tokens_equal_deepspec(eval_path, ref):
    ours, anchor1, anchor2 = eval_path
    assert (anchor1, anchor2) == (215, 245)
    for name in DRAFT_IDS:
        np.testing.assert_array_equal(np.asarray(ours[name]), ref[name], err_msg=name)


@pytest.mark.parametrize("case", ["A", "B"])
def test_drafter_training_forward_and_losses_match_deepspec(fixture_target, fixture_draft, ref, case):
    from dspark_jax import train as train_lib

    tp, tc = fixture_target
    dp, dc = fixture_draft
    tokens = jnp.asarray(ref["train_input_ids"], jnp.int32)
    feats, last = train_lib.target_features(tp, tc, dc, tokens)
    np.testing.assert_allclose(feats, ref["train_target_hidden_states"], **TOL)
    np.testing.assert_allclose(last, ref["train_target_last_hidden_states"], **TOL)
    out = train_lib.draft_training_forward(
        dp, dc, tp, tokens, jnp.asarray(ref[f"train{case}_loss_mask"]), jnp.asarray(ref["train_target_hidden_states"]),
        jnp.asarray(ref["train_target_last_hidden_states"]), jnp.asarray(ref[f"train{case}_anchor_positions"], jnp.int32),
        jnp.asarray(ref[f"train{case}_block_keep_mask"]))
    for ours, name in ((out.layer_out, "layer_out"), (out.hidden, "output_hidden"), (out.draft_logits, "draft_logits"),
                       (out.aligned_target_logits, "aligned_target_logits"),
                       (out.confidence_logits, "confidence_pred")):
        np.testing.assert_allclose(np.asarray(ours), ref[f"train{case}_{name}"], **TOL, err_msg=name)
    np.testing.assert_array_equal(out.target_ids, ref[f"train{case}_target_ids"])
    np.testing.assert_array_equal(out.eval_mask, ref[f"train{case}_eval_mask"])
    loss, metrics = train_lib.draft_loss_terms(out, train_lib.LossConfig(ce=0.1, l1=0.9, confidence=1.0, decay_gamma=4.0))
    np.testing.assert_allclose(loss, ref[f"train{case}_loss"], **TOL)
    for term in ("ce_loss", "l1_loss", "confidence_loss"):
        np.testing.assert_allclose(metrics[term], ref[f"train{case}_{term}"], **TOL, err_msg=term)


def test_drafter_exports_back_to_deepspecs_exact_tensors_and_config(fixture_dir, fixture_target, fixture_draft, tmp_path):
    from dspark_jax.checkpoint import save_draft
    from dspark_jax.safetensors_io import TensorSource

    tp, _ = fixture_target
    dp, dc = fixture_draft
    save_draft(tmp_path, dp, dc, tp)
    with TensorSource(tmp_path) as ours, TensorSource(fixture_dir / "draft") as theirs:
        assert ours.names() == theirs.names()
        for name in sorted(theirs.names()):
            np.testing.assert_array_equal(ours.get(name), theirs.get(name), err_msg=name)
    exported = json.loads((tmp_path / "config.json").read_text())
    released = json.loads((fixture_dir / "draft" / "config.json").read_text())
    for field in ("architectures", "block_size", "target_layer_ids", "mask_token_id", "markov_rank", "markov_head_type",
                  "enable_confidence_head", "global_head_dim", "num_global_key_value_heads", "attention_k_eq_v",
                  "layer_types", "num_kv_shared_layers", "use_double_wide_mlp", "final_logit_softcapping",
                  "tie_word_embeddings", "model_type", "rope_parameters", "hidden_size_per_layer_input"):
        if field == "rope_parameters":  # DeepSpec's copy carries transformers' top-level rope_theta/type too
            assert all(exported[field][k] == released[field][k] for k in ("full_attention", "sliding_attention"))
        else:
            assert exported[field] == released[field], field


def test_greedy_speculative_equals_greedy_ar_on_gemma4(fixture_target, fixture_draft, ref):
    """Packed verification (threshold scheduler, every draft offered) through the sliding
    rings, the shared layers and the drafter: the target's greedy continuation exactly."""
    from dspark_jax.speculative import speculative_generate

    tp, tc = fixture_target
    dp, dc = fixture_draft
    res = speculative_generate(tp, tc, dp, dc, [ref["prompt_ids"][0].tolist()], max_new_tokens=16,
                               scheduler="threshold")
    assert res.samples[0] == ref["greedy_ids"][0].tolist()


def cache_spellings(arrays) -> list[str]:
    """HLO spellings of each cache array and of one layer of it (``cache_sized_copies`` order)."""
    dims = lambda shape: "f32[" + ",".join(map(str, shape)) + "]"
    return [s for a in arrays for s in (dims(a.shape), dims(a.shape[1:]))]


def test_gemma4_ar_step_updates_its_caches_in_place(fixture_target):
    """The KV-shared layers of the last group read the cache after the earlier groups' chunk
    keys/values are ready: the write must still come after them, without copying the cache."""
    from test_long_context import cache_sized_copies, loop_instructions

    from dspark_jax.sampling import Sampling

    params, cfg = fixture_target
    cache = target.init_cache(cfg, 2, 512)
    compiled = decoding.ar_decode.lower(
        params, jnp.zeros((2, 16), jnp.int32), jnp.array([5, 3]), jax.random.key(0), jnp.int32(8), cache,
        cfg=cfg, sampling=Sampling(), buffer_len=16, eos_ids=()).compile().as_text()
    shapes = cache_spellings([cache.full_k, cache.sliding_k])
    assert any(shapes[2] in line for line in loop_instructions(compiled))  # the rings are in the loop
    assert cache_sized_copies(compiled, shapes) == []


@pytest.mark.parametrize("scheduler", ["fixed", "algorithm1"])
def test_gemma4_speculative_round_updates_both_caches_in_place(fixture_target, fixture_draft, scheduler):
    from test_long_context import cache_sized_copies

    from dspark_jax.speculative import SpecConfig, init_schedule_state, speculative_decode, speculative_prefill

    tp, tc = fixture_target
    dp, dc = fixture_draft
    scfg = SpecConfig(target=tc, draft=dc, scheduler=scheduler)
    state = speculative_prefill(tp, dp, jnp.zeros((2, 16), jnp.int32), jnp.array([5, 3]), jnp.array([True, True]),
                                jax.random.key(0), jnp.int32(8), init_schedule_state(2, dc.block_size), scfg=scfg,
                                buffer_len=16, cache_len=512)
    compiled = speculative_decode.lower(tp, dp, state, scfg=scfg).compile().as_text()
    caches = [state.target_cache.full_k, state.target_cache.sliding_k, state.draft_cache.k]
    assert cache_sized_copies(compiled, cache_spellings(caches)) == []


def test_memory_check_before_a_speculative_run_counts_the_gemma4_drafters_context_cache(
        fixture_target, fixture_draft, monkeypatch):
    """A Gemma 4 drafter's context cache holds every draft layer at the full-attention geometry
    over the whole cache (no sliding rings, no shared layers): the check before a run counts
    those bytes, more than the drafter's layers would need as a target."""
    from dspark_jax import draft as Dr
    from dspark_jax import speculative

    tp, tc = fixture_target
    dp, dc = fixture_draft
    sizes, checked = [], []
    cache_bytes = decoding.cache_bytes
    monkeypatch.setattr(decoding, "cache_bytes", lambda cfg, B, L, dtype: sizes.append((B, L)) or cache_bytes(cfg, B, L, dtype))

    def stop(nbytes, what):
        checked.append(nbytes)
        raise RuntimeError("checked")

    monkeypatch.setattr(decoding, "check_cache_memory", stop)
    with pytest.raises(RuntimeError, match="checked"):
        speculative.speculative_generate(tp, tc, dp, dc, [[1, 2, 3]], max_new_tokens=4, cache_len=64)
    (B, L), = sizes
    context = Dr.init_context_cache(dc, B, L)
    draft_bytes = sum(a.nbytes for a in (context.k, context.v, context.lengths))
    assert checked == [cache_bytes(tc, B, L, jnp.float32) + draft_bytes]
    assert draft_bytes > gemma4.cache_bytes(dc.layers, B, L, jnp.float32)


def test_speculative_sampling_on_gemma4_matches_the_targets_distribution(fixture_target, fixture_draft, ref):
    """Temperature 1, packed verification: the first token a round commits (drafted and
    accepted, or drawn from the residual) follows the target's own marginal
    p(b | prompt) = sum_a p(a | prompt) p(b | prompt, a) (chi-square, as for Qwen3)."""
    from dspark_jax.sampling import Sampling, distribution
    from dspark_jax.speculative import speculative_generate
    from test_speculative import assert_matches

    tp, tc = fixture_target
    tc = dataclasses.replace(tc, eos_token_ids=())  # every sample two tokens long (an eos may be drawn first)
    dp, dc = fixture_draft
    prompt = ref["prompt_ids"][0, :12].tolist()
    V, P, rows = tc.vocab_size, len(prompt), 2048
    seqs = np.array([prompt + [a] for a in range(V)], np.int32)
    out, _ = run_chunk(tp, tc, jnp.asarray(seqs), None)
    d = np.asarray(distribution(out.logits, Sampling(temperature=1.0)), np.float64)
    marginal = d[0, P - 1] @ d[:, P]  # [V]
    res = speculative_generate(tp, tc, dp, dc, [prompt] * rows, max_new_tokens=2, cache_len=32, seed=3,
                               sampling=Sampling(temperature=1.0), scheduler="threshold")
    assert 0 < res.stats["accepted_tokens"] < res.stats["proposed_tokens"]  # both the accept and the residual paths
    second = np.array([s[1] for s in res.samples])
    assert_matches(np.bincount(second, minlength=V), marginal)
