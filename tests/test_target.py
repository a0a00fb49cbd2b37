"""Parity of the JAX Qwen3 target with ``transformers.Qwen3ForCausalLM``.

Every model here is a tiny random transformers model that the test builds and saves itself
(``hf_models.make_hf_qwen3``), then loads with ``dspark_jax.checkpoint.load_qwen3``. The
reference is always transformers run on the *whole* sequence without a cache, so a chunked
run of ours (prefill, then T = 1 and T = 5 chunks against the KV cache) has to reproduce
full-sequence attention from its cache.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dspark_jax import decoding
from dspark_jax.checkpoint import load_qwen3, load_target
from dspark_jax.config import RopeConfig
from dspark_jax.target import forward, init_cache
from hf_models import hf_forward, make_hf_qwen3

ATOL = 1e-4  # float32 parity bound (max abs error) for logits and hidden states
LAYERS = 3
VOCAB = 97


@functools.partial(jax.jit, static_argnames=("cfg", "feature_layers"))
def run_chunk(params, cfg, tokens, cache, feature_layers=()):
    return forward(params, cfg, tokens, cache, feature_layers=feature_layers)


@functools.partial(jax.jit, static_argnames=("cfg",))
def run_prefill(params, cfg, tokens, lengths, cache):
    last_logits, cache, _ = decoding.prefill(params, cfg, tokens, lengths, cache)
    return last_logits, cache


def max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def hf_layer_outputs(model, ids: np.ndarray) -> list[np.ndarray]:
    """Raw (un-normed) outputs of every transformers decoder layer, through forward hooks.

    transformers' ``hidden_states[L]`` is the *final-normed* output, so the raw output of the
    last layer (our feature id L-1) is only observable with a hook.
    """
    outs: list[np.ndarray] = []

    def hook(_module, _inputs, output):
        out = output[0] if isinstance(output, tuple) else output
        outs.append(out.detach().numpy().copy())

    handles = [layer.register_forward_hook(hook) for layer in model.model.layers]
    try:
        with torch.no_grad():
            model(torch.tensor(ids))
    finally:
        for h in handles:
            h.remove()
    return outs


# --------------------------------------------------------------------------- chunked parity

VARIANTS = {
    "untied-gqa": dict(tie=False, heads=4, kv_heads=2),
    "tied-gqa": dict(tie=True, heads=4, kv_heads=1),
    "untied-mha": dict(tie=False, heads=4, kv_heads=4),
}
CHUNKS = (7, 1, 5, 1, 5)  # prefill of 7, then incremental chunks of T = 1 and T = 5
SEQ_LEN = sum(CHUNKS)
FEATURE_LAYERS = (-1,) + tuple(range(LAYERS))


@pytest.fixture(scope="module")
def hf_runs(tmp_path_factory):
    """Per variant (built once, shared by both weight layouts): the saved transformers model's
    directory, its input ids, and its full-sequence outputs."""
    runs = {}
    for name, variant in VARIANTS.items():
        path = tmp_path_factory.mktemp(name)
        model = make_hf_qwen3(path, layers=LAYERS, vocab=VOCAB, seed=1, **variant)
        ids = np.random.RandomState(0).randint(0, VOCAB, (2, SEQ_LEN)).astype(np.int32)
        hf_logits, hf_hidden = hf_forward(model, ids)
        runs[name] = dict(path=path, ids=ids, hf_logits=hf_logits, hf_hidden=hf_hidden,
                          hf_raw_layers=hf_layer_outputs(model, ids))
    return runs


# the layer weights stacked [L, ...] (training's layout) and one array per layer (decoding's)
LAYOUTS = {"stacked": False, "per-layer": True}


# every variant stacked; the per-layer path (lm_head and kv-head handling shared) on one of them
@pytest.fixture(scope="module", params=[(v, "stacked") for v in VARIANTS] + [("untied-gqa", "per-layer")], ids="-".join)
def chunked_run(request, hf_runs):
    """Ours chunk by chunk against the cache, and transformers on the full sequence."""
    name, layout = request.param
    variant, hf = VARIANTS[name], hf_runs[name]
    params, cfg = load_target(hf["path"], dtype="float32", per_layer=LAYOUTS[layout])
    assert cfg.tie_word_embeddings == variant["tie"]
    assert (params.lm_head is None) == variant["tie"]
    assert cfg.num_key_value_heads == variant["kv_heads"]
    assert isinstance(params.layers, tuple) == LAYOUTS[layout] == cfg.per_layer_weights
    ids, hf_logits, hf_hidden, hf_raw_layers = hf["ids"], hf["hf_logits"], hf["hf_hidden"], hf["hf_raw_layers"]

    cache = init_cache(cfg, batch=2, max_len=SEQ_LEN + 5)
    logits, features, hidden, lengths_after_forward = [], [], [], []
    start = 0
    for T in CHUNKS:
        out, new_cache = run_chunk(params, cfg, jnp.asarray(ids[:, start : start + T]), cache, FEATURE_LAYERS)
        lengths_after_forward.append((np.asarray(cache.lengths), np.asarray(new_cache.lengths)))
        cache = new_cache.advance(T)
        logits.append(np.asarray(out.logits))
        features.append(np.asarray(out.features))
        hidden.append(np.asarray(out.hidden))
        start += T
    return dict(
        cfg=cfg,
        hf_logits=hf_logits,
        hf_hidden=hf_hidden,
        hf_raw_layers=hf_raw_layers,
        logits=np.concatenate(logits, axis=1),
        features=np.concatenate(features, axis=1),
        hidden=np.concatenate(hidden, axis=1),
        final_lengths=np.asarray(cache.lengths),
        lengths_after_forward=lengths_after_forward,
    )


def test_forward_writes_cache_but_does_not_advance_lengths(chunked_run):
    for before, after in chunked_run["lengths_after_forward"]:
        np.testing.assert_array_equal(before, after)
    np.testing.assert_array_equal(chunked_run["final_lengths"], [SEQ_LEN, SEQ_LEN])


def test_chunked_logits_match_transformers_full_sequence(chunked_run):
    r = chunked_run
    assert r["logits"].dtype == np.float32
    assert r["logits"].shape == r["hf_logits"].shape
    start = 0
    for T in CHUNKS:  # report the failing chunk, not only the global max
        err = max_err(r["logits"][:, start : start + T], r["hf_logits"][:, start : start + T])
        assert err < ATOL, f"logits of chunk at positions {start}..{start + T - 1}: max abs err {err}"
        start += T


def test_chunked_layer_features_match_transformers_hidden_states(chunked_run):
    r = chunked_run
    D = r["cfg"].hidden_size
    assert r["features"].shape == (2, SEQ_LEN, len(FEATURE_LAYERS) * D)
    for slot, layer_id in enumerate(FEATURE_LAYERS):
        ours = r["features"][..., slot * D : (slot + 1) * D]
        # hidden_states[0] is the embedding output and hidden_states[l + 1] the output of layer
        # l, except the last entry, which transformers replaces by the final-normed output.
        if layer_id + 1 < LAYERS:
            ref = r["hf_hidden"][layer_id + 1]
        else:
            ref = r["hf_raw_layers"][layer_id]
        err = max_err(ours, ref)
        assert err < ATOL, f"feature layer {layer_id}: max abs err {err}"
    for layer_id in range(LAYERS - 1):  # the hooks and hidden_states agree where both exist
        assert max_err(r["hf_raw_layers"][layer_id], r["hf_hidden"][layer_id + 1]) == 0.0


def test_chunked_final_hidden_matches_transformers_last_hidden_state(chunked_run):
    r = chunked_run
    assert r["hidden"].shape == r["hf_hidden"][-1].shape
    assert max_err(r["hidden"], r["hf_hidden"][-1]) < ATOL


# --------------------------------------------------------------------------- ragged prefill


@pytest.fixture(scope="module")
def gqa_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("ragged")
    model = make_hf_qwen3(path, layers=LAYERS, vocab=VOCAB, seed=2)
    params, cfg = load_qwen3(path, dtype="float32")
    return model, params, cfg, path


def test_ragged_prefill_last_logits_equal_each_sequence_alone(gqa_model):
    model, params, cfg, _ = gqa_model
    rng = np.random.RandomState(3)
    seqs = [rng.randint(0, VOCAB, n).astype(np.int32) for n in (5, 11)]
    padded = np.zeros((2, 16), np.int32)  # right padding with a real token id (0)
    for i, s in enumerate(seqs):
        padded[i, : len(s)] = s
    cache_len = 24
    batch_logits, batch_cache = run_prefill(
        params, cfg, jnp.asarray(padded), jnp.asarray([5, 11], jnp.int32), init_cache(cfg, 2, cache_len)
    )
    np.testing.assert_array_equal(np.asarray(batch_cache.lengths), [5, 11])
    for i, s in enumerate(seqs):
        alone_logits, alone_cache = run_prefill(
            params, cfg, jnp.asarray(s[None]), jnp.asarray([len(s)], jnp.int32), init_cache(cfg, 1, cache_len)
        )
        np.testing.assert_array_equal(np.asarray(alone_cache.lengths), [len(s)])
        assert max_err(batch_logits[i], alone_logits[0]) < ATOL
        hf_logits, _ = hf_forward(model, s[None].astype(np.int64))
        assert max_err(batch_logits[i], hf_logits[0, -1]) < ATOL


def test_chunk_after_ragged_prefill_continues_each_sequence_at_its_own_offset(gqa_model):
    """Padding entries written by the prefill lie past each length: the next chunk overwrites
    them and must see only its own sequence's prefix."""
    model, params, cfg, _ = gqa_model
    rng = np.random.RandomState(4)
    lens = (4, 9)
    full = [rng.randint(0, VOCAB, n + 5).astype(np.int32) for n in lens]
    padded = np.zeros((2, 16), np.int32)
    for i, n in enumerate(lens):
        padded[i, :n] = full[i][:n]
    _, cache = run_prefill(params, cfg, jnp.asarray(padded), jnp.asarray(lens, jnp.int32), init_cache(cfg, 2, 24))
    chunk = np.stack([f[n:] for f, n in zip(full, lens)])
    out, _ = run_chunk(params, cfg, jnp.asarray(chunk), cache)
    for i, n in enumerate(lens):
        hf_logits, _ = hf_forward(model, full[i][None].astype(np.int64))
        assert max_err(out.logits[i], hf_logits[0, n:]) < ATOL


# --------------------------------------------------------------------------- RoPE scaling

ROPE_VARIANTS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "yarn-explicit": {
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "beta_fast": 16.0,
        "beta_slow": 2.0,
        "attention_factor": 1.25,
        "truncate": False,
    },
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "original_max_position_embeddings": 64,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
    },
}
ROPE_THETA = 100.0  # small base: every rotary pair turns noticeably within the test length
ROPE_SEQ = 48


@pytest.mark.parametrize("name", list(ROPE_VARIANTS))
def test_rope_scaling_matches_transformers(name, tmp_path):
    rope_parameters = {**ROPE_VARIANTS[name], "rope_theta": ROPE_THETA}
    model = make_hf_qwen3(tmp_path, layers=2, vocab=VOCAB, seed=5, rope_parameters=dict(rope_parameters))
    params, cfg = load_qwen3(tmp_path, dtype="float32")
    assert cfg.rope.rope_type == rope_parameters["rope_type"]
    assert cfg.rope.factor == rope_parameters["factor"]
    assert cfg.rope.theta == ROPE_THETA

    ids = np.random.RandomState(6).randint(0, VOCAB, (1, ROPE_SEQ)).astype(np.int32)
    hf_logits, _ = hf_forward(model, ids.astype(np.int64))
    cache = init_cache(cfg, 1, ROPE_SEQ + 16)
    out, cache = run_chunk(params, cfg, jnp.asarray(ids[:, :40]), cache)
    out2, _ = run_chunk(params, cfg, jnp.asarray(ids[:, 40:]), cache.advance(40))
    ours = np.concatenate([np.asarray(out.logits), np.asarray(out2.logits)], axis=1)
    assert max_err(ours, hf_logits) < ATOL

    # The comparison is sensitive to the scaling: unscaled RoPE is far off.
    unscaled = dataclasses.replace(cfg, rope=RopeConfig(theta=ROPE_THETA))
    plain, _ = run_chunk(params, unscaled, jnp.asarray(ids), init_cache(cfg, 1, ROPE_SEQ + 16))
    assert max_err(plain.logits, hf_logits) > 100 * ATOL


# --------------------------------------------------------------------------- bfloat16


def test_bfloat16_forward_is_close_to_float32(gqa_model):
    _, params32, cfg, path = gqa_model
    params16, cfg16 = load_qwen3(path, dtype="bfloat16")
    assert cfg16 == cfg
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params16))

    ids = jnp.asarray(np.random.RandomState(7).randint(0, VOCAB, (4, 16)).astype(np.int32))
    out32, _ = run_chunk(params32, cfg, ids, init_cache(cfg, 4, 16))
    out16, _ = run_chunk(params16, cfg, ids, init_cache(cfg, 4, 16, jnp.bfloat16))
    assert out16.logits.dtype == jnp.float32  # logits are accumulated in float32 either way
    assert out16.hidden.dtype == jnp.bfloat16
    l32, l16 = np.asarray(out32.logits), np.asarray(out16.logits)

    # Tolerance: bfloat16 keeps 8 significant bits, i.e. a relative rounding error of up to
    # 2^-9 ~ 0.2% per rounding. Weights are rounded once and activations after every matmul,
    # norm and residual add (about 10 roundings per layer here, 3 layers), and these errors
    # add up like a random walk: sqrt(30) * 0.2% ~ 1.1% of the activations' scale (measured:
    # 1.4% mean abs error). The mean bound, 5% of the float32 logits' standard deviation,
    # leaves a 3.5x margin. The max over the 6k logits is a tail statistic, fattened where
    # attention softmaxes and rsqrt norms amplify a rounding (measured: 15%); we allow 25%.
    # Either bound is far below what a real bug gives: a wrong layout, position or cache
    # entry makes errors of the order of the logits themselves (~100% of their std).
    scale = float(np.std(l32))
    assert float(np.mean(np.abs(l16 - l32))) < 0.05 * scale
    assert max_err(l16, l32) < 0.25 * scale
    agree = float(np.mean(np.argmax(l16, -1) == np.argmax(l32, -1)))
    assert agree >= 0.9, f"bf16 and f32 argmax agree on only {agree:.0%} of positions"


def test_repeated_and_unordered_feature_layer_ids_each_get_their_layer(gqa_model):
    _, params, cfg, _ = gqa_model
    tokens = jnp.asarray(np.arange(6, dtype=np.int32)[None] % VOCAB)
    D = cfg.hidden_size
    single = {
        i: np.asarray(forward(params, cfg, tokens, None, feature_layers=(i,))[0].features) for i in (-1, 0, 1)
    }
    ids = (1, 0, 1, -1)
    out, _ = forward(params, cfg, tokens, None, feature_layers=ids)
    for slot, i in enumerate(ids):
        np.testing.assert_array_equal(np.asarray(out.features[..., slot * D : (slot + 1) * D]), single[i])
    assert np.abs(single[1]).max() > 0


def test_forward_without_cache_equals_forward_into_an_empty_cache(gqa_model):
    _, params, cfg, _ = gqa_model
    tokens = jnp.asarray(np.random.RandomState(9).randint(0, VOCAB, (2, 7)).astype(np.int32))
    plain, none_cache = forward(params, cfg, tokens, None, feature_layers=(0,))
    cached, _ = forward(params, cfg, tokens, init_cache(cfg, 2, 12), feature_layers=(0,))
    assert none_cache is None
    np.testing.assert_allclose(plain.logits, cached.logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(plain.features, cached.features, rtol=1e-5, atol=1e-5)
