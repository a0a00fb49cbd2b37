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

import functools
import json
import os
import shutil

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


@pytest.fixture(scope="module")
def hf_pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma4")
    model = make_hf_gemma4(path, window=WINDOW, seed=3)
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
    assert cache.ring == WINDOW - 1 + 5 and cache.sliding_k.shape[0] == 2 and cache.full_k.shape[0] == 1
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
    # 5 layers: 2 shared store nothing; 2 sliding rings of window - 1 + MAX_CHUNK; 1 full layer
    assert cache.sliding_k.shape == (2, 1, WINDOW - 1 + gemma4.MAX_CHUNK, cfg.num_key_value_heads, cfg.head_dim)
    assert cache.full_k.shape == (1, 1, 4096, 1, cfg.global_head_dim)
    with pytest.raises(ValueError, match="sliding ring"):
        target.forward(hf_pair["params"], cfg, jnp.zeros((1, gemma4.MAX_CHUNK + 1), jnp.int32), cache)


def test_untied_gemma4_without_k_eq_v_matches_transformers(tmp_path):
    model = make_hf_gemma4(tmp_path, k_eq_v=False, tie=False, seed=4, layer_types=("sliding_attention", "full_attention",
                                                                                    "full_attention"), kv_shared=1)
    params, cfg = load_target(tmp_path, "float32")
    assert params.lm_head is not None and all(p.v_proj is not None for p in params.layers[:2])
    ids = np.random.RandomState(5).randint(0, cfg.vocab_size, (1, 20)).astype(np.int32)
    out, _ = run_chunk(params, cfg, jnp.asarray(ids), None)
    np.testing.assert_allclose(np.asarray(out.logits), hf_gemma4_forward(model, ids)[0], rtol=1e-4, atol=1e-4)
