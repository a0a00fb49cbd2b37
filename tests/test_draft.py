"""The DSpark / DFlash drafter: parity with DeepSpec, head consistency, sampling, checkpoints.

Parity tests replay the DeepSpec eval path (two rounds, simulated acceptance of 2 drafts)
against ``../shared/fixtures/deepspec_qwen3_vanilla`` (see tests/fixtures.py for where the
fixture comes from). The other tests build tiny random drafters with ``init_draft_params``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import shutil
import warnings
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from dspark_jax import draft as Dr
from dspark_jax import target as T
from dspark_jax.checkpoint import (
    CheckpointError,
    draft_to_hf_tensors,
    load_draft,
    load_draft_config,
    load_drafter,
    load_qwen3,
    restore_draft_orbax,
    save_draft,
    save_draft_orbax,
)
from dspark_jax.config import ConfigError, Qwen3Config
from dspark_jax.decoding import prefill
from dspark_jax.sampling import Sampling, distribution

from fixtures import FIXTURES_ENV, require_fixture

FIXTURE = "deepspec_qwen3_vanilla"
RTOL = ATOL = 1e-4  # the fixture README's suggested parity tolerance for a float32 port
GREEDY = Sampling()
TEMP1 = Sampling(temperature=1.0)
SAMPLINGS = {"greedy": GREEDY, "temp1": TEMP1}


# ============================================================================ helpers


def assert_same_tree(a, b):
    """Same pytree structure and bitwise-identical leaves (dtype included)."""
    la, ta = jax.tree_util.tree_flatten_with_path(a)
    lb, tb = jax.tree_util.tree_flatten_with_path(b)
    assert ta == tb, f"pytree structures differ:\n{ta}\n{tb}"
    for (path, x), (_, y) in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        name = jax.tree_util.keystr(path)
        assert x.dtype == y.dtype, f"{name}: dtype {x.dtype} != {y.dtype}"
        np.testing.assert_array_equal(x, y, err_msg=name)


def kv_to_deepspec(cache_arr, length):
    """Our cache layout [L, B, S, K, Dh] -> DeepSpec's [L, B, K, S, Dh], first ``length`` entries."""
    return np.asarray(jnp.moveaxis(cache_arr[:, :, :length], 2, 3))


def chi2_sf(stat: float, df: int) -> float:
    """P(chi2_df >= stat): 1 - P(df/2, stat/2) with the regularized lower incomplete gamma by
    its power series (converges for every x; exact enough to compare against 1e-3)."""
    a, x = df / 2.0, stat / 2.0
    if x <= 0:
        return 1.0
    term = total = 1.0 / a
    n = 1
    while term > total * 1e-17:
        term *= x / (a + n)
        total += term
        n += 1
    lower = math.exp(a * math.log(x) - x - math.lgamma(a) + math.log(total))
    return max(0.0, 1.0 - lower)


def chi2_gof(counts: np.ndarray, probs: np.ndarray, min_expected: float = 5.0) -> tuple[float, int, float]:
    """Pearson goodness of fit of ``counts`` to ``probs``; categories with expected count below
    ``min_expected`` are pooled into one bin. Returns (statistic, df, p-value)."""
    n = counts.sum()
    expected = probs / probs.sum() * n
    big = expected >= min_expected
    obs = list(counts[big]) + ([counts[~big].sum()] if (~big).any() else [])
    exp = list(expected[big]) + ([expected[~big].sum()] if (~big).any() else [])
    obs, exp = np.asarray(obs, np.float64), np.asarray(exp, np.float64)
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(obs) - 1
    return stat, df, chi2_sf(stat, df)


def test_chi2_sf_matches_known_quantiles():
    # chi-square 0.999 quantiles (standard tables): df=1: 10.828, df=5: 20.515, df=20: 45.315
    for df, q in ((1, 10.828), (5, 20.515), (20, 45.315)):
        assert chi2_sf(q, df) == pytest.approx(1e-3, rel=1e-3)
    assert chi2_sf(3.0, 3) == pytest.approx(0.39163, rel=1e-4)  # table: P(chi2_3 >= 3) = 0.3916


# ============================================================================ fixture location


def test_missing_fixture_fails_in_ci_and_skips_elsewhere(tmp_path, monkeypatch):
    monkeypatch.setenv(FIXTURES_ENV, str(tmp_path))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="DeepSpec"):
        require_fixture(FIXTURE, "reference.npz")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match=r"\.\./shared/fixtures/deepspec_qwen3_vanilla.*DeepSpec"):
        require_fixture(FIXTURE, "reference.npz")
    (tmp_path / FIXTURE).mkdir()
    (tmp_path / FIXTURE / "reference.npz").write_bytes(b"")
    assert require_fixture(FIXTURE, "reference.npz") == tmp_path / FIXTURE


# ============================================================================ DeepSpec parity


@pytest.fixture(scope="module")
def deepspec():
    """The fixture's target and draft loaded with our loaders, plus the reference arrays."""
    path = require_fixture(
        FIXTURE, "reference.npz", "reference.json", "target/config.json", "draft/config.json", "draft/keys.json"
    )
    tp, tc = load_qwen3(path / "target", dtype=jnp.float32)
    dp, dc = load_draft(path / "draft", tp, tc, dtype=jnp.float32)
    with np.load(path / "reference.npz") as npz:
        ref = {k: npz[k] for k in npz.files}
    meta = json.loads((path / "reference.json").read_text())
    keys = json.loads((path / "draft" / "keys.json").read_text())
    return SimpleNamespace(path=path, ref=ref, meta=meta, keys=keys, tp=tp, tc=tc, dp=dp, dc=dc)


@functools.partial(jax.jit, static_argnames=("dcfg",))
def backbone_and_greedy_block(dp, dcfg, tp, cache, anchor):
    hidden, layer_out = Dr.backbone(dp, dcfg, tp, cache, anchor)
    base = T.compute_logits(tp, hidden)
    return hidden, layer_out, base, Dr.sample_block(jax.random.key(0), dp, dcfg, base, hidden, anchor, GREEDY)


def draft_round(fx, cache: Dr.KVCache, anchor) -> dict:
    """One drafting round the way the (jitted) decode loop does it, keeping every intermediate."""
    hidden, layer_out, base, blk = backbone_and_greedy_block(fx.dp, fx.dc, fx.tp, cache, anchor)
    return dict(
        draft_input_ids=Dr.block_inputs(fx.dc, anchor, fx.dc.block_size),
        layer_out=layer_out,
        block_hidden=hidden,
        base_logits=base,
        corrected_logits=blk.logits,
        confidence_logits=blk.confidence_logits,
        draft_tokens=blk.tokens,
        block=blk,
    )


@pytest.fixture(scope="module")
def eval_path(deepspec):
    """Our replay of the fixture's eval path: prefill, round 1, verify, simulated acceptance of
    2 drafts, incremental context append, round 2. Arrays are keyed by reference names."""
    fx, ref = deepspec, deepspec.ref
    tp, tc, dp, dc = fx.tp, fx.tc, fx.dp, fx.dc
    ours: dict = {}
    ids = jnp.asarray(ref["prompt_ids"], jnp.int32)
    P, D, max_len = ids.shape[1], tc.hidden_size, 64

    # full-prompt forward (no decoding cache): logits and every hidden state
    full, _ = T.forward(tp, tc, ids, T.init_cache(tc, 1, P), feature_layers=(-1, 0, 1, 2))
    ours["target_logits"] = full.logits
    per_layer = [full.features[0, :, i * D : (i + 1) * D] for i in range(4)]
    ours["target_hidden_all"] = jnp.stack(per_layer + [full.hidden[0]])

    # eval prefill with the drafter's feature layers
    cache = T.init_cache(tc, 1, max_len)
    last_logits, cache, _ = prefill(tp, tc, ids, jnp.array([P]), cache)
    pre, _ = T.forward(tp, tc, ids, None, feature_layers=dc.target_layer_ids, with_logits=False)
    ours["context_features"] = pre.features
    anchor1 = jnp.argmax(last_logits, -1).astype(jnp.int32)

    # round 1: the whole prompt becomes draft context
    ctx0 = Dr.init_context_cache(dc, 1, max_len)
    ours["r1_ctx_proj"] = Dr.project_context(dp, dc, pre.features)
    ctx1 = Dr.append_context(dp, dc, ctx0, pre.features, jnp.array([P]))
    ours["r1_draft_cache_k"] = kv_to_deepspec(ctx1.k, P)
    ours["r1_draft_cache_v"] = kv_to_deepspec(ctx1.v, P)
    ours["r1_position_ids"] = jnp.concatenate(
        [Dr.chunk_positions(ctx0.lengths, P), Dr.chunk_positions(ctx1.lengths, dc.block_size)], 1
    )
    r1 = draft_round(fx, ctx1, anchor1)
    ours.update({f"r1_{k}": v for k, v in r1.items()})

    # verify [anchor, d1..d4] against the prefill cache
    vin = jnp.concatenate([anchor1[:, None], r1["draft_tokens"]], 1)
    vout, _ = T.forward(tp, tc, vin, cache, feature_layers=dc.target_layer_ids)
    ours["r1_verify_input_ids"] = vin
    ours["r1_verify_logits"] = vout.logits
    ours["r1_verify_context_features"] = vout.features

    # simulated acceptance of exactly 2 drafts: commit anchor, d1, d2 (3 positions)
    accepted = 2
    anchor2 = jnp.argmax(vout.logits[:, accepted], -1).astype(jnp.int32)
    new_ctx = vout.features[:, : accepted + 1]
    ours["r2_target_hidden_states"] = new_ctx
    ours["r2_ctx_proj"] = Dr.project_context(dp, dc, new_ctx)
    # ragged append as the decode loop does it: all 5 verify positions written, 3 committed
    ctx2 = Dr.append_context(dp, dc, ctx1, vout.features, jnp.array([accepted + 1]))
    S2 = P + accepted + 1
    ours["r2_draft_cache_k"] = kv_to_deepspec(ctx2.k, S2)
    ours["r2_draft_cache_v"] = kv_to_deepspec(ctx2.v, S2)
    ours["r2_position_ids"] = jnp.concatenate(
        [Dr.chunk_positions(ctx1.lengths, accepted + 1), Dr.chunk_positions(ctx2.lengths, dc.block_size)], 1
    )
    r2 = draft_round(fx, ctx2, anchor2)
    ours.update({f"r2_{k}": v for k, v in r2.items()})
    ours["r2_verify_input_ids"] = jnp.concatenate([anchor2[:, None], r2["draft_tokens"]], 1)

    return SimpleNamespace(
        ours=ours, anchor1=anchor1, anchor2=anchor2, ctx0=ctx0, ctx1=ctx1, ctx2=ctx2,
        prompt_features=pre.features, verify_features=vout.features, P=P, accepted=accepted,
    )


FLOAT_ARRAYS = [
    "context_features",
    "target_logits",
    "target_hidden_all",
    *[
        f"{r}_{name}"
        for r in ("r1", "r2")
        for name in (
            "ctx_proj",
            "draft_cache_k",
            "draft_cache_v",
            "layer_out",
            "block_hidden",
            "base_logits",
            "corrected_logits",
            "confidence_logits",
        )
    ],
    "r1_verify_logits",
    "r1_verify_context_features",
    "r2_target_hidden_states",
]
ID_ARRAYS = [
    "r1_draft_input_ids",
    "r1_position_ids",
    "r1_draft_tokens",
    "r1_verify_input_ids",
    "r2_draft_input_ids",
    "r2_position_ids",
    "r2_draft_tokens",
    "r2_verify_input_ids",
]


@pytest.mark.parametrize("name", FLOAT_ARRAYS)
def test_eval_path_float_array_matches_deepspec(eval_path, deepspec, name):
    ours, ref = np.asarray(eval_path.ours[name]), deepspec.ref[name]
    assert ours.shape == ref.shape, f"{name}: shape {ours.shape} != reference {ref.shape}"
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=ATOL, err_msg=name)


@pytest.mark.parametrize("name", ID_ARRAYS)
def test_eval_path_ids_equal_deepspec(eval_path, deepspec, name):
    np.testing.assert_array_equal(np.asarray(eval_path.ours[name]), deepspec.ref[name], err_msg=name)


def test_anchors_are_the_targets_greedy_tokens_59_and_308(eval_path, deepspec):
    rounds = deepspec.meta["eval"]
    assert (rounds["round1"]["anchor"], rounds["round2"]["anchor"]) == (59, 308)
    assert eval_path.anchor1.tolist() == [59]
    assert eval_path.anchor2.tolist() == [308]
    assert eval_path.ours["r1_draft_tokens"].tolist() == [rounds["round1"]["draft_tokens"]]
    assert eval_path.ours["r2_draft_tokens"].tolist() == [rounds["round2"]["draft_tokens"]]


def test_round2_appends_only_the_three_committed_positions_to_the_context_cache(eval_path, deepspec):
    e = eval_path
    P, n_new = e.P, e.accepted + 1
    assert e.ctx0.lengths.tolist() == [0]
    assert e.ctx1.lengths.tolist() == [P]
    assert e.ctx2.lengths.tolist() == [P + n_new]
    # the 24 prompt entries written in round 1 are untouched (not recomputed)
    np.testing.assert_array_equal(np.asarray(e.ctx2.k[:, :, :P]), np.asarray(e.ctx1.k[:, :, :P]))
    np.testing.assert_array_equal(np.asarray(e.ctx2.v[:, :, :P]), np.asarray(e.ctx1.v[:, :, :P]))
    # appending [verify features of anchor, d1, d2] equals building the cache from scratch
    # over all 27 context positions (context keys depend only on H_ctx and position)
    fx_ctx = jnp.concatenate([e.prompt_features, e.verify_features[:, :n_new]], 1)
    scratch = Dr.append_context(deepspec.dp, deepspec.dc, e.ctx0, fx_ctx, jnp.array([P + n_new]))
    S = P + n_new
    np.testing.assert_allclose(np.asarray(e.ctx2.k[:, :, :S]), np.asarray(scratch.k[:, :, :S]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(e.ctx2.v[:, :, :S]), np.asarray(scratch.v[:, :, :S]), rtol=1e-5, atol=1e-5)


def test_uncommitted_verify_positions_in_the_context_cache_are_never_read(eval_path, deepspec):
    """Round 2 from the ragged append (5 written, 3 committed) equals round 2 from a cache that
    only ever saw the 3 committed positions."""
    e, fx = eval_path, deepspec
    exact = Dr.append_context(fx.dp, fx.dc, e.ctx1, e.verify_features[:, : e.accepted + 1], jnp.array([e.accepted + 1]))
    assert exact.lengths.tolist() == e.ctx2.lengths.tolist()
    assert not np.array_equal(np.asarray(e.ctx2.k), np.asarray(exact.k))  # garbage past the length differs
    blk = draft_round(fx, exact, e.anchor2)["block"]
    np.testing.assert_array_equal(np.asarray(blk.tokens), np.asarray(e.ours["r2_draft_tokens"]))
    np.testing.assert_array_equal(np.asarray(blk.logits), np.asarray(e.ours["r2_corrected_logits"]))


def test_draft_block_composes_backbone_lm_head_and_sampling(eval_path, deepspec):
    fx, e = deepspec, eval_path
    blk, hidden = Dr.draft_block(jax.random.key(0), fx.dp, fx.dc, fx.tp, e.ctx2, e.anchor2, GREEDY)
    # eager here, jitted in draft_round: equal up to float32 rounding (XLA may fuse differently)
    close = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-6)
    close(np.asarray(hidden), np.asarray(e.ours["r2_block_hidden"]))
    ref_blk = e.ours["r2_block"]
    np.testing.assert_array_equal(np.asarray(blk.tokens), np.asarray(ref_blk.tokens))
    for field in ("probs", "logits", "confidence_logits"):
        close(np.asarray(getattr(blk, field)), np.asarray(getattr(ref_blk, field)), err_msg=field)


def test_markov_bias_changes_every_greedy_token_of_the_fixture(eval_path):
    # the fixture's README: argmax(corrected) != argmax(base) at all 8 positions, so this
    # parity run really exercises the Markov head
    for r in ("r1", "r2"):
        base = np.asarray(eval_path.ours[f"{r}_base_logits"]).argmax(-1)
        assert (base != np.asarray(eval_path.ours[f"{r}_draft_tokens"])).all()


@pytest.mark.parametrize("case", ["trainA", "trainB"])
def test_teacher_forced_heads_on_deepspec_training_hidden_match_draft_logits(deepspec, case):
    """DeepSpec's training forward: teacher-forced prev tokens [x_anchor, target_ids[:-1]]."""
    fx, ref = deepspec, deepspec.ref
    K = fx.dc.block_size
    hidden = jnp.asarray(ref[f"{case}_output_hidden"]).reshape(1, -1, K, fx.dc.hidden_size)
    anchors = ref[f"{case}_anchor_positions"][0]
    anchor_tokens = ref["train_input_ids"][0, anchors]
    prev = np.concatenate([anchor_tokens[:, None], ref[f"{case}_target_ids"][0, :, :-1]], 1)[None]
    logits, conf = Dr.teacher_forced_heads(
        fx.dp, fx.dc, T.compute_logits(fx.tp, hidden), hidden, jnp.asarray(prev, jnp.int32)
    )
    np.testing.assert_allclose(np.asarray(logits), ref[f"{case}_draft_logits"], rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.asarray(conf), ref[f"{case}_confidence_pred"], rtol=RTOL, atol=ATOL)


# ============================================================================ tiny random drafters

TINY = Qwen3Config(
    vocab_size=32,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
)
VARIANTS = {
    # name: DraftConfig overrides; every confidence-head wiring appears once
    "vanilla": dict(markov_rank=8, markov_head_type="vanilla", enable_confidence_head=True),
    "gated": dict(markov_rank=8, markov_head_type="gated", enable_confidence_head=True),
    "rnn": dict(markov_rank=8, markov_head_type="rnn", enable_confidence_head=True, confidence_head_with_markov=False),
    "dflash": dict(markov_rank=0, enable_confidence_head=False),
}
BATCH, PROMPT_LENGTHS, CTX_LEN = 3, (7, 4, 6), 32


def tiny_draft_config(variant: str) -> Dr.DraftConfig:
    return Dr.DraftConfig(
        layers=dataclasses.replace(TINY, num_hidden_layers=2),
        block_size=4,
        target_layer_ids=(-1, 1),
        mask_token_id=TINY.vocab_size - 1,
        **VARIANTS[variant],
    )


def random_like(seed: int, init_fn):
    """Params with the structure ``init_fn()`` builds (which fields each head type has, their
    shapes and dtypes), every value redrawn with NumPy as the DeepSpec fixture does: matrices
    N(0, 0.3^2) so logits are spread out, norm weights 1 + 0.1 N(0, 1) and biases N(0, 0.1^2)
    so that a mixed-up norm or a dropped bias is visible. NumPy: no compiles, same on every
    backend."""
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(jax.eval_shape(init_fn))
    out = []
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        noise = rng.standard_normal(leaf.shape)
        if "norm" in name:
            value = 1.0 + 0.1 * noise
        elif name.endswith(("_b", ".b")):
            value = 0.1 * noise
        else:
            value = 0.3 * noise
        out.append(jnp.asarray(value, leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


@pytest.fixture(scope="module")
def tiny_target():
    tp = random_like(10, lambda: T.init_params(jax.random.key(0), TINY))
    rng = np.random.default_rng(0)
    prompts = np.zeros((BATCH, max(PROMPT_LENGTHS) + 1), np.int32)  # right-padded
    for b, n in enumerate(PROMPT_LENGTHS):
        prompts[b, :n] = rng.integers(0, TINY.vocab_size - 1, n)
    return SimpleNamespace(params=tp, prompts=prompts, lengths=np.asarray(PROMPT_LENGTHS, np.int32))


@functools.lru_cache(maxsize=None)
def tiny_draft(variant: str) -> tuple[Dr.DraftParams, Dr.DraftConfig]:
    """Random params of one variant (built once per session)."""
    dcfg = tiny_draft_config(variant)
    seed = 100 + list(VARIANTS).index(variant)
    return random_like(seed, lambda: Dr.init_draft_params(jax.random.key(0), dcfg)), dcfg


@functools.partial(jax.jit, static_argnames=("feature_layers",))
def prefill_features(tp, prompts, lengths, feature_layers):
    """Prefill right-padded prompts (ragged ``lengths``): their target features and anchors
    (the target's greedy next tokens)."""
    cache = T.init_cache(TINY, prompts.shape[0], CTX_LEN)
    last, _, _ = prefill(tp, TINY, prompts, lengths, cache)
    out, _ = T.forward(tp, TINY, prompts, None, feature_layers=feature_layers, with_logits=False)
    return out.features, jnp.argmax(last, -1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("dcfg",))
def context_from_features(dp, dcfg, features, lengths):
    empty = Dr.init_context_cache(dcfg, features.shape[0], CTX_LEN)
    return Dr.append_context(dp, dcfg, empty, features, lengths)


def build_context(tp, dp, dcfg, prompts, lengths):
    """Every prompt position in the drafter's context cache. Returns (context cache, anchors)."""
    features, anchor = prefill_features(tp, prompts, lengths, dcfg.target_layer_ids)
    return context_from_features(dp, dcfg, features, lengths), anchor


@functools.partial(jax.jit, static_argnames=("dcfg",))
def draft_greedy_and_temp1(key, params, dcfg, target, cache, anchor):
    """One backbone pass, then a greedy block and a temperature-1 block from it (one compile
    per variant and shape). Returns {mode: DraftBlock}, base logits, block hidden."""
    hidden, _ = Dr.backbone(params, dcfg, target, cache, anchor)
    base = T.compute_logits(target, hidden)
    blocks = {mode: Dr.sample_block(key, params, dcfg, base, hidden, anchor, s) for mode, s in SAMPLINGS.items()}
    return blocks, base, hidden


jit_teacher_forced = jax.jit(Dr.teacher_forced_heads, static_argnums=(1,))


@pytest.fixture(scope="module", params=list(VARIANTS))
def drafted(request, tiny_target):
    """One variant: params, context, and a greedy and a temperature-1 block from the same anchors."""
    variant = request.param
    dp, dcfg = tiny_draft(variant)
    tp = tiny_target.params
    ctx, anchor = build_context(tp, dp, dcfg, tiny_target.prompts, tiny_target.lengths)
    blocks, base, hidden = draft_greedy_and_temp1(jax.random.key(7), dp, dcfg, tp, ctx, anchor)
    return SimpleNamespace(
        variant=variant, dcfg=dcfg, params=dp, ctx=ctx, anchor=anchor, blocks=blocks, base=base, hidden=hidden, target=tp
    )


def test_draft_block_fields_have_the_documented_shapes(drafted):
    B, K, V, D = BATCH, drafted.dcfg.block_size, TINY.vocab_size, TINY.hidden_size
    base, hidden = drafted.base, drafted.hidden
    for blk in drafted.blocks.values():
        assert (blk.tokens.shape, blk.tokens.dtype) == ((B, K), jnp.int32)
        assert (blk.probs.shape, blk.probs.dtype) == ((B, K, V), jnp.float32)
        assert (blk.logits.shape, blk.logits.dtype) == ((B, K, V), jnp.float32)
        assert (blk.confidence_logits.shape, blk.confidence_logits.dtype) == ((B, K), jnp.float32)
        assert base.shape == (B, K, V) and hidden.shape == (B, K, D)
        assert ((0 <= np.asarray(blk.tokens)) & (np.asarray(blk.tokens) < V)).all()
        np.testing.assert_allclose(np.asarray(blk.probs).sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("mode", ["greedy", "temp1"])
def test_teacher_forced_heads_reproduce_the_sampled_path(drafted, mode):
    blk, base, hidden = drafted.blocks[mode], drafted.base, drafted.hidden
    prev = jnp.concatenate([drafted.anchor[:, None], blk.tokens[:, :-1]], 1)
    logits, conf = jit_teacher_forced(drafted.params, drafted.dcfg, base, hidden, prev)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(blk.logits), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(conf), np.asarray(blk.confidence_logits), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["greedy", "temp1"])
def test_block_probs_are_the_shared_sampling_distribution_of_its_logits(drafted, mode):
    blk, sampling = drafted.blocks[mode], SAMPLINGS[mode]
    np.testing.assert_allclose(
        np.asarray(blk.probs), np.asarray(distribution(blk.logits, sampling)), rtol=1e-6, atol=1e-7
    )
    if mode == "greedy":  # a greedy block drafts the argmax of its corrected logits
        np.testing.assert_array_equal(np.asarray(blk.tokens), np.asarray(blk.logits).argmax(-1))


def numpy_heads(params: Dr.DraftParams, dcfg: Dr.DraftConfig, base, hidden, prev):
    """Section 2 of the spec in float64 NumPy: corrected logits U_k + B_k and confidence logits."""
    f64 = lambda a: np.asarray(a, np.float64)
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))
    base, hidden, prev = f64(base), f64(hidden), np.asarray(prev)
    B, K, V = base.shape
    mk, r = params.markov, dcfg.markov_rank
    state = np.zeros((B, r))
    logits, conf = np.zeros((B, K, V)), np.zeros((B, K))
    for k in range(K):
        h = hidden[:, k]
        e = f64(mk["w1"])[prev[:, k]] if mk is not None else None
        if dcfg.head_type == "vanilla":
            bias = e @ f64(mk["w2"])
        elif dcfg.head_type == "gated":
            g = sig(np.concatenate([h, e], -1) @ f64(mk["gate_w"]) + f64(mk["gate_b"]))
            bias = (g * e) @ f64(mk["w2"])
        elif dcfg.head_type == "rnn":
            z = np.concatenate([state, e, h], -1) @ f64(mk["joint_w"]) + f64(mk["joint_b"])
            gate, cand, out = z[:, :r], z[:, r : 2 * r], z[:, 2 * r :]
            state = sig(gate) * state + (1 - sig(gate)) * np.tanh(cand)
            bias = np.tanh(out) @ f64(mk["w2"])
        else:
            bias = 0.0
        logits[:, k] = base[:, k] + bias
        if params.confidence is not None:
            feats = np.concatenate([h, e], -1) if dcfg.confidence_uses_markov else h
            conf[:, k] = feats @ f64(params.confidence["w"]) + f64(params.confidence["b"])
    return logits, conf


@pytest.mark.parametrize("mode", ["greedy", "temp1"])
def test_corrected_logits_follow_the_spec_formula_along_the_drafted_path(drafted, mode):
    blk, base, hidden = drafted.blocks[mode], drafted.base, drafted.hidden
    prev = np.concatenate([np.asarray(drafted.anchor)[:, None], np.asarray(blk.tokens)[:, :-1]], 1)
    logits, conf = numpy_heads(drafted.params, drafted.dcfg, base, hidden, prev)
    np.testing.assert_allclose(np.asarray(blk.logits), logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(blk.confidence_logits), conf, rtol=1e-5, atol=1e-5)
    if drafted.variant == "dflash":  # no Markov head: sampled logits are the lm_head logits
        np.testing.assert_array_equal(np.asarray(blk.logits), np.asarray(base))
        np.testing.assert_array_equal(np.asarray(blk.confidence_logits), 0.0)
    else:  # the bias is not negligible, so the formula check above has teeth
        assert np.abs(np.asarray(blk.logits) - np.asarray(base)).max() > 0.1


def test_ragged_batch_rows_draft_what_they_draft_alone(tiny_target):
    """Row b of the ragged batch (prompt lengths 7, 4, 6, zero-padded to 8) equals a batch-of-1
    run on its prompt padded differently (to 12, with random junk): padding never matters.
    The context and block code is shared by all heads; the rnn variant carries head state."""
    dp, dcfg = tiny_draft("rnn")
    tp, prompts, lengths = tiny_target.params, tiny_target.prompts, tiny_target.lengths
    ctx, anchor = build_context(tp, dp, dcfg, prompts, lengths)
    batch = draft_greedy_and_temp1(jax.random.key(7), dp, dcfg, tp, ctx, anchor)[0]["greedy"]
    rng = np.random.default_rng(1)
    for b in range(BATCH):
        alone_prompt = rng.integers(0, TINY.vocab_size, (1, 12)).astype(np.int32)
        alone_prompt[0, : lengths[b]] = prompts[b, : lengths[b]]
        ctx_b, anchor_b = build_context(tp, dp, dcfg, alone_prompt, lengths[b : b + 1])
        assert anchor_b.tolist() == [int(anchor[b])]
        alone = draft_greedy_and_temp1(jax.random.key(0), dp, dcfg, tp, ctx_b, anchor_b)[0]["greedy"]
        np.testing.assert_array_equal(np.asarray(alone.tokens[0]), np.asarray(batch.tokens[b]))
        np.testing.assert_allclose(np.asarray(alone.logits[0]), np.asarray(batch.logits[b]), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            np.asarray(alone.confidence_logits[0]), np.asarray(batch.confidence_logits[b]), rtol=1e-5, atol=1e-5
        )


# ---------------------------------------------------------------------------- sampling statistics

ALPHA = 1e-3  # per chi-square test; fixed seed, so the outcome is deterministic
N_ROWS = 6000


@pytest.fixture(scope="module")
def many_identical_rows(tiny_target):
    """N_ROWS copies of one sequence (same context, same anchor) drafted at temperature 1."""
    dp, dcfg = tiny_draft("vanilla")
    ctx, anchor = build_context(tiny_target.params, dp, dcfg, tiny_target.prompts[:1], tiny_target.lengths[:1])
    tile = lambda a: jnp.broadcast_to(a, (a.shape[0], N_ROWS) + a.shape[2:])
    ctx = Dr.KVCache(tile(ctx.k), tile(ctx.v), jnp.broadcast_to(ctx.lengths, (N_ROWS,)))
    anchors = jnp.broadcast_to(anchor, (N_ROWS,))
    blk = draft_greedy_and_temp1(jax.random.key(1234), dp, dcfg, tiny_target.params, ctx, anchors)[0]["temp1"]
    return np.asarray(blk.tokens), np.asarray(blk.probs)


def test_first_drafted_token_follows_the_returned_distribution(many_identical_rows):
    tokens, probs = many_identical_rows
    q1 = probs[0, 0]
    np.testing.assert_allclose(probs[:, 0], np.broadcast_to(q1, probs[:, 0].shape), rtol=1e-6, atol=1e-7)
    assert q1.max() < 0.5 and (q1 > 0.01).sum() >= 8, "the test needs a spread-out distribution"
    counts = np.bincount(tokens[:, 0], minlength=q1.size)
    stat, df, p = chi2_gof(counts, q1.astype(np.float64))
    assert df >= 7
    assert p > ALPHA, f"chi2={stat:.1f}, df={df}, p={p:.2e}"


def test_second_token_given_the_first_follows_the_returned_conditional(many_identical_rows):
    tokens, probs = many_identical_rows
    mode = np.bincount(tokens[:, 0]).argmax()
    rows = tokens[:, 0] == mode
    q2 = probs[rows, 1][0]
    np.testing.assert_allclose(probs[rows, 1], np.broadcast_to(q2, probs[rows, 1].shape), rtol=1e-6, atol=1e-7)
    counts = np.bincount(tokens[rows, 1], minlength=q2.size)
    stat, df, p = chi2_gof(counts, q2.astype(np.float64))
    assert df >= 5
    assert p > ALPHA, f"chi2={stat:.1f}, df={df}, p={p:.2e}"
    # power check: d2 depends on d1 through the Markov head, and the same counts are rejected
    # against the conditional of another first token
    other = np.bincount(tokens[~rows, 0], minlength=q2.size).argmax()
    q2_other = probs[tokens[:, 0] == other, 1][0]
    assert np.abs(q2_other - q2).max() > 0.05
    assert chi2_gof(counts, q2_other.astype(np.float64))[2] < ALPHA


# ============================================================================ checkpoints


def copy_fixture_draft(deepspec, dst):
    """A writable copy of the fixture's draft directory (the fixture files are read-only)."""
    dst.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copyfile(deepspec.path / "draft" / f, dst / f)
    return dst


def edit_tensors(draft_dir, fn):
    tensors = load_file(draft_dir / "model.safetensors")
    fn(tensors)
    save_file(tensors, draft_dir / "model.safetensors", metadata={"format": "pt"})


def edit_config(draft_dir, fn):
    raw = json.loads((draft_dir / "config.json").read_text())
    fn(raw)
    (draft_dir / "config.json").write_text(json.dumps(raw))


def _drop(key):
    return lambda t: t.pop(key)


def _transpose(key):
    return lambda t: t.__setitem__(key, np.ascontiguousarray(t[key].T))


def _set(field, value):
    return lambda raw: raw.__setitem__(field, value)


BAD_CHECKPOINTS = [
    pytest.param(
        edit_tensors, _drop("layers.1.self_attn.k_norm.weight"),
        CheckpointError, r"missing tensor 'layers\.1\.self_attn\.k_norm\.weight'", id="missing-tensor",
    ),
    pytest.param(
        edit_tensors, _drop("confidence_head.proj.bias"),
        CheckpointError, r"missing tensor 'confidence_head\.proj\.bias'", id="missing-confidence-bias",
    ),
    pytest.param(
        edit_tensors, _transpose("markov_head.markov_w2.weight"),
        CheckpointError, r"'markov_head\.markov_w2\.weight' has shape \[16, 512\], expected \[512, 16\]",
        id="wrong-shape",
    ),
    pytest.param(
        edit_tensors, lambda t: t.__setitem__("markov_head.extra.bias", np.zeros(4, np.float32)),
        CheckpointError, r"unexpected tensor\(s\) \['markov_head\.extra\.bias'\]", id="unexpected-tensor",
    ),
    pytest.param(
        edit_config, _set("vocab_size", 1024),
        ConfigError, r"vocab_size 1024 != target vocab_size 512", id="vocab-mismatch",
    ),
    pytest.param(
        edit_config, _set("target_layer_ids", [0, 4]),
        ConfigError, r"target_layer_ids \[4\] out of range .* 4 layers", id="layer-id-too-large",
    ),
    pytest.param(
        edit_config, _set("target_layer_ids", [-2, 2]),
        ConfigError, r"target_layer_ids \[-2\] out of range", id="layer-id-negative",
    ),
    pytest.param(
        edit_config, _set("markov_head_type", "lstm"),
        ConfigError, r"markov_head_type 'lstm' not supported", id="unknown-markov-head",
    ),
    pytest.param(
        edit_config, lambda raw: raw.pop("block_size"),
        ConfigError, r"missing DSpark field 'block_size'", id="missing-block-size",
    ),
    pytest.param(
        edit_config, _set("mask_token_id", 512),
        ConfigError, r"mask_token_id 512 outside the vocabulary", id="mask-id-out-of-vocab",
    ),
]


@pytest.mark.parametrize("edit, damage, error, match", BAD_CHECKPOINTS)
def test_damaged_draft_checkpoint_fails_with_a_message_naming_the_problem(deepspec, tmp_path, edit, damage, error, match):
    draft_dir = copy_fixture_draft(deepspec, tmp_path / "draft")
    edit(draft_dir, damage)
    with pytest.raises(error, match=match):
        load_draft(draft_dir, deepspec.tp, deepspec.tc)


@pytest.mark.parametrize("name", ["embed_tokens.weight", "lm_head.weight"])
def test_draft_with_its_own_shared_tensor_warns_and_uses_the_targets(deepspec, tmp_path, name):
    draft_dir = copy_fixture_draft(deepspec, tmp_path / "draft")

    def damage(t):
        t[name] = t[name] + np.float32(0.5)

    edit_tensors(draft_dir, damage)
    with pytest.warns(UserWarning, match=rf"{name} differs from the target's"):
        params, dcfg = load_draft(draft_dir, deepspec.tp, deepspec.tc, dtype=jnp.float32)
    assert dcfg == deepspec.dc
    assert_same_tree(params, deepspec.dp)  # the drafter keeps no embedding / head of its own
    export = draft_to_hf_tensors(params, deepspec.tp)  # and exports the target's
    with safe_open(deepspec.path / "draft" / "model.safetensors", "np") as f:
        np.testing.assert_array_equal(export[name], f.get_tensor(name))


def test_fixture_draft_loads_without_warnings(deepspec):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_draft(deepspec.path / "draft", deepspec.tp, deepspec.tc, dtype=jnp.float32)


# ---------------------------------------------------------------------------- round trips


def test_deepspec_export_of_the_fixture_draft_reproduces_its_tensors_and_keys(deepspec, tmp_path):
    save_draft(tmp_path / "draft", deepspec.dp, deepspec.dc, deepspec.tp)
    with safe_open(tmp_path / "draft" / "model.safetensors", "np") as f:
        ours = {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(deepspec.path / "draft" / "model.safetensors", "np") as f:
        theirs = {k: f.get_tensor(k) for k in f.keys()}
    assert set(ours) == {t["name"] for t in deepspec.keys["tensors"]} == set(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype, k
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    assert load_draft_config(tmp_path / "draft") == deepspec.dc
    params, dcfg = load_draft(tmp_path / "draft", deepspec.tp, deepspec.tc, dtype=jnp.float32)
    assert dcfg == deepspec.dc
    assert_same_tree(params, deepspec.dp)


def test_orbax_round_trip_of_the_fixture_draft(deepspec, tmp_path):
    save_draft_orbax(tmp_path / "orbax", deepspec.dp, deepspec.dc)
    params, dcfg = restore_draft_orbax(tmp_path / "orbax", dtype=jnp.float32)
    assert dcfg == deepspec.dc
    assert_same_tree(params, deepspec.dp)
    params, dcfg = load_drafter(tmp_path / "orbax", deepspec.tp, deepspec.tc, dtype=jnp.float32)
    assert dcfg == deepspec.dc
    assert_same_tree(params, deepspec.dp)
    # the same entry point reads DeepSpec directories
    params, dcfg = load_drafter(deepspec.path / "draft", deepspec.tp, deepspec.tc, dtype=jnp.float32)
    assert_same_tree(params, deepspec.dp)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_random_draft_survives_deepspec_export_and_reload(tiny_target, tmp_path, variant):
    dp, dcfg = tiny_draft(variant)
    save_draft(tmp_path / "draft", dp, dcfg, tiny_target.params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the exported embed/lm_head are the target's
        params, loaded_cfg = load_draft(tmp_path / "draft", tiny_target.params, TINY, dtype=jnp.float32)
    assert loaded_cfg == dcfg
    assert_same_tree(params, dp)


def test_draft_export_without_embedding_copies_is_smaller_and_loads_the_same(tiny_target, tmp_path):
    from safetensors import safe_open

    dp, dcfg = tiny_draft("vanilla")
    save_draft(tmp_path / "full", dp, dcfg, tiny_target.params)
    save_draft(tmp_path / "slim", dp, dcfg, tiny_target.params, embedding_copies=False)
    with safe_open(str(tmp_path / "full" / "model.safetensors"), "np") as f:
        full = set(f.keys())
    with safe_open(str(tmp_path / "slim" / "model.safetensors"), "np") as f:
        slim = set(f.keys())
    assert full - slim == {"embed_tokens.weight", "lm_head.weight"}
    params, loaded_cfg = load_draft(tmp_path / "slim", tiny_target.params, TINY, dtype=jnp.float32)
    assert loaded_cfg == dcfg
    assert_same_tree(params, dp)


@pytest.mark.parametrize("variant", ["gated", "rnn", "dflash"])
def test_random_draft_survives_orbax_save_and_restore(tiny_target, tmp_path, variant):
    dp, dcfg = tiny_draft(variant)
    save_draft_orbax(tmp_path / "orbax", dp, dcfg)
    params, loaded_cfg = load_drafter(tmp_path / "orbax", tiny_target.params, TINY, dtype=jnp.float32)
    assert loaded_cfg == dcfg
    assert_same_tree(params, dp)


def test_orbax_drafter_for_an_incompatible_target_is_refused(tiny_target, tmp_path):
    dp, dcfg = tiny_draft("vanilla")
    save_draft_orbax(tmp_path / "orbax", dp, dcfg)
    small = dataclasses.replace(TINY, num_hidden_layers=1)  # layer id 1 does not exist there
    with pytest.raises(ConfigError, match=r"target_layer_ids \[1\] out of range"):
        load_drafter(tmp_path / "orbax", tiny_target.params, small)
