"""The Eagle-3 drafter against DeepSpec (``../shared/fixtures/deepspec_qwen3_eagle3``, reference
arrays of DeepSpec's evaluator and loss) and as a drafter of lossless speculative decoding.

Parity: fused features, the draft cache and hidden after the prefill, every proposal step's
logits / hidden / tokens in both rounds, the cache and hidden after the update, the
training-time test's per-step logits and losses (cases A and B). Tolerance 2e-4 (float32),
tokens exact, as the fixture's README states.
"""

from __future__ import annotations

import functools
import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from dspark_jax import eagle3
from dspark_jax import target as target_model
from dspark_jax.checkpoint import load_draft, load_drafter, load_qwen3, save_draft
from dspark_jax.sampling import Sampling
from dspark_jax.speculative import speculative_start

from fixtures import require_fixture

TOL = dict(rtol=2e-4, atol=2e-4)
NAME = "deepspec_qwen3_eagle3"


@pytest.fixture(scope="module")
def fx():
    path = require_fixture(NAME, "reference.npz", "target/config.json", "draft/config.json")
    ref = dict(np.load(path / "reference.npz"))
    target, tcfg = load_qwen3(path / "target", "float32")
    draft, dcfg = load_draft(path / "draft", target, tcfg, "float32")
    return path, ref, target, tcfg, draft, dcfg


def cache_entries(cache, n):
    """Our ``[1, B, S, K, Dh]`` cache's first n entries in DeepSpec's ``[layer, batch, kv_heads, n, Dh]``."""
    return np.asarray(cache.k)[:, :, :n].transpose(0, 1, 3, 2, 4), np.asarray(cache.v)[:, :, :n].transpose(0, 1, 3, 2, 4)


_chain = jax.jit(eagle3.chain, static_argnames=("cfg", "sampling", "num_drafts"))
_commit = jax.jit(eagle3.commit, static_argnames=("cfg",))


@pytest.fixture(scope="module")
def rounds(fx):
    """DeepSpec's two rounds: prefill (ours: the speculative prefill, in chunks of 16 so the
    prompt's last position lies in the second chunk), round 1, the simulated acceptance of 2,
    the update, round 2."""
    _, ref, target, tcfg, draft, dcfg = fx
    run = speculative_start(target, tcfg, draft, dcfg, [ref["prompt_ids"][0].tolist()], max_new_tokens=16,
                            block_size=4, cache_len=64, prefill_chunk=16)
    state = run.state.draft_cache
    r1 = _chain(jax.random.key(0), draft, dcfg, target, state, sampling=Sampling(), num_drafts=4)
    verify = jnp.concatenate([run.state.anchor[:, None], r1.block.tokens], 1)
    out, _ = target_model.forward(target, tcfg, verify, run.state.target_cache, feature_layers=dcfg.target_layer_ids)
    committed = jnp.asarray(np.pad(ref["u1_committed_tokens"], ((0, 0), (0, 2))), jnp.int32)
    after = _commit(draft, dcfg, target, eagle3.Eagle3State(r1.cache, state.hidden, state.pending), out.features,
                    committed, jnp.asarray([3], jnp.int32))
    r2 = _chain(jax.random.key(0), draft, dcfg, target, after, sampling=Sampling(), num_drafts=4)
    return dict(run=run, prefill=state, r1=r1, verify=out, update=after, r2=r2)


def test_eagle3_fused_features_match_deepspec(fx, rounds):
    """fc of DeepSpec's prompt features; the target's features of the verify forward (the
    features every update fuses)."""
    _, ref, target, tcfg, draft, dcfg = fx
    np.testing.assert_allclose(eagle3.fuse(draft, jnp.asarray(ref["context_features"])), ref["init_fc"], **TOL)
    np.testing.assert_allclose(rounds["verify"].features, ref["r1_verify_context_features"], **TOL)
    np.testing.assert_allclose(eagle3.fuse(draft, rounds["verify"].features[:, :3]), ref["u1_fc"], **TOL)


def test_eagle3_prefill_cache_and_hidden_match_deepspec(fx, rounds):
    _, ref, *_ = fx
    state = rounds["prefill"]
    assert int(rounds["run"].state.anchor[0]) == int(ref["greedy_ids"][0, 0])
    assert state.cache.lengths.tolist() == [24]
    k, v = cache_entries(state.cache, 24)
    np.testing.assert_allclose(k, ref["init_draft_cache_k"], **TOL)
    np.testing.assert_allclose(v, ref["init_draft_cache_v"], **TOL)
    np.testing.assert_allclose(state.hidden, ref["init_draft_hidden"][:, 0], **TOL)


@pytest.mark.parametrize("name", ["r1", "r2"])
def test_eagle3_proposal_steps_match_deepspec(fx, rounds, name):
    """Every step's hidden, logits and token; the proposal entries written past the committed
    length (ours skips DeepSpec's K-th forward, which only extends the cache it crops)."""
    _, ref, *_ = fx
    chain = rounds[name]
    np.testing.assert_array_equal(chain.block.tokens, ref[f"{name}_draft_tokens"])
    np.testing.assert_allclose(chain.block.logits, ref[f"{name}_step_logits"], **TOL)
    np.testing.assert_allclose(chain.hidden, ref[f"{name}_step_hidden"], **TOL)
    n = ref[f"{name}_draft_cache_k"].shape[3] - 1
    k, v = cache_entries(chain.cache, n)
    np.testing.assert_allclose(k, ref[f"{name}_draft_cache_k"][..., :n, :], **TOL)
    np.testing.assert_allclose(v, ref[f"{name}_draft_cache_v"][..., :n, :], **TOL)
    np.testing.assert_array_equal(chain.block.probs.argmax(-1), chain.block.tokens)  # one-hot at T=0


def test_eagle3_update_crops_proposals_and_matches_deepspec(fx, rounds):
    _, ref, *_ = fx
    np.testing.assert_allclose(rounds["verify"].logits, ref["r1_verify_logits"], **TOL)
    after = rounds["update"]
    assert after.cache.lengths.tolist() == [27]
    k, v = cache_entries(after.cache, 27)
    np.testing.assert_allclose(k, ref["u1_draft_cache_k"], **TOL)
    np.testing.assert_allclose(v, ref["u1_draft_cache_v"], **TOL)
    np.testing.assert_allclose(after.hidden, ref["u1_draft_hidden"][:, 0], **TOL)


def test_eagle3_released_layout_round_trip(fx, tmp_path):
    """Export with the embedding copies = DeepSpec's key set and tensors; without them the
    same minus the copies; both load back to the same weights and config."""
    path, _, target, tcfg, draft, dcfg = fx
    keys = {t["name"] for t in json.load(open(path / "draft" / "keys.json"))["tensors"]}
    save_draft(tmp_path / "with", draft, dcfg, target)
    save_draft(tmp_path / "without", draft, dcfg, target, embedding_copies=False, dtype="bfloat16")

    def tensors(d):
        with safe_open(str(d / "model.safetensors"), "np") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    ours, theirs = tensors(tmp_path / "with"), tensors(path / "draft")
    assert set(ours) == keys == set(theirs)
    for name, value in theirs.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)
    assert set(tensors(tmp_path / "without")) == keys - {"embed_tokens.weight", "lm_head.weight"}
    back, back_cfg = load_drafter(tmp_path / "with", target, tcfg, "float32")
    assert back_cfg == dcfg and isinstance(back, eagle3.Eagle3Params)
    jax.tree.map(np.testing.assert_array_equal, back, draft)
    half, _ = load_drafter(tmp_path / "without", target, tcfg, "float32")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b.astype(jnp.bfloat16), np.float32)), half, draft)
    saved = json.load(open(tmp_path / "with" / "config.json"))
    original = json.load(open(path / "draft" / "config.json"))
    for key in ("architectures", "target_layer_ids", "ttt_length", "step_loss_decay", "draft_num_hidden_layers",
                "num_hidden_layers", "hidden_size", "num_key_value_heads", "head_dim", "tie_word_embeddings"):
        assert saved[key] == original[key], key


# ---------------------------------------------------------------------------- lossless decoding


def oracle_pair(sharp: float = 4.0, fc_scale: float = 0.01):
    """The near-bigram target of ``spec_models`` (kv heads = heads, so a value head can copy
    the embedding) and an Eagle-3 drafter built to predict it: q/k/v copy the normed embedding
    half of the layer input, the scaled q_norm makes each entry attend (almost) to itself,
    o_proj writes the copy into the residual and fc is nearly 0, so step 0 drafts from the
    anchor's embedding (often accepted) and later steps from a mix of the chain's tokens
    (often rejected)."""
    import dataclasses

    from spec_models import make_target, target_config

    tcfg = target_config(vocab=32, kv_heads=4)
    target = make_target(tcfg, 0, context=0.05)
    cfg = eagle3.Eagle3Config(layers=dataclasses.replace(tcfg, num_hidden_layers=1, eos_token_ids=()),
                              target_layer_ids=(0, 1), ttt_length=4)
    D, H, K, Dh = tcfg.hidden_size, tcfg.num_attention_heads, tcfg.num_key_value_heads, tcfg.head_dim
    p = eagle3.init_eagle3_params(jax.random.key(1), cfg, std=0.1)
    copy = jnp.concatenate([jnp.eye(D), jnp.zeros((D, D))]).reshape(2 * D, K, Dh)[None]
    layer = dataclasses.replace(p.layer, q_proj=copy, k_proj=copy, v_proj=copy, o_proj=jnp.eye(D).reshape(H, Dh, D)[None],
                                q_norm=jnp.full((1, Dh), sharp), down_proj=p.layer.down_proj * 0.1)
    return SimpleNamespace(target=target, tcfg=tcfg, draft=dataclasses.replace(p, fc=p.fc * fc_scale, layer=layer),
                           dcfg=cfg)


@functools.lru_cache(maxsize=None)
def pair():
    return oracle_pair()


def test_greedy_speculative_with_eagle3_equals_autoregressive_batched():
    from dspark_jax.decoding import generate_ar
    from dspark_jax.speculative import speculative_generate
    from spec_models import random_prompts

    pr = pair()
    prompts = random_prompts(8, 32, 1, 16, 0)
    res = speculative_generate(pr.target, pr.tcfg, pr.draft, pr.dcfg, prompts, max_new_tokens=16, cache_len=48, trace=True)
    assert res.samples == generate_ar(pr.target, pr.tcfg, prompts, max_new_tokens=16, cache_len=48)
    rounds = [r for sample in res.trace for r in sample]
    assert any(r["accepted"] == 4 for r in rounds) and any(r["accepted"] < 4 for r in rounds)  # both paths ran
    assert 0.3 < res.stats["accepted_tokens"] / res.stats["proposed_tokens"] < 0.9


def test_eagle3_speculative_sampling_matches_target_distribution():
    from test_speculative import SAMPLING_PROMPT, assert_matches, exact_joint_2_3
    from dspark_jax.speculative import speculative_generate

    pr = pair()
    sampling = Sampling(temperature=1.0)
    joint = exact_joint_2_3(pr, sampling)
    samples, accepted, proposed = [], 0, 0
    for seed in (1, 2):
        res = speculative_generate(pr.target, pr.tcfg, pr.draft, pr.dcfg, [SAMPLING_PROMPT] * 4096, max_new_tokens=4,
                                   cache_len=32, sampling=sampling, seed=seed)
        samples += res.samples
        accepted += res.stats["accepted_tokens"]
        proposed += res.stats["proposed_tokens"]
    assert 0.2 < accepted / proposed < 0.9  # both the accept and the residual paths run often
    S = np.array(samples)
    assert_matches(np.bincount(S[:, 1], minlength=32), joint.sum(1))
    assert_matches(np.bincount(S[:, 2], minlength=32), joint.sum(0))
    assert_matches(np.bincount(S[:, 1] * 32 + S[:, 2], minlength=32 * 32), joint)


@pytest.mark.parametrize("kw", [dict(scheduler="threshold"), dict(confidence_threshold=0.5),
                                dict(scheduler="algorithm1"), dict(scheduler="async")])
def test_confidence_schedulers_refuse_eagle3_before_compiling(kw, monkeypatch):
    from dspark_jax import speculative

    def must_not_compile(*a, **k):
        raise AssertionError("compiled before refusing")

    monkeypatch.setattr(speculative, "speculative_prefill", must_not_compile)
    pr = pair()
    with pytest.raises(ValueError, match="Eagle-3 has none.*'fixed' scheduler"):
        speculative_start(pr.target, pr.tcfg, pr.draft, pr.dcfg, [[1, 2, 3]], max_new_tokens=4, **kw)
