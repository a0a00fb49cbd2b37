"""The one attention interface: every backend against the dense reference on random ragged
inputs, for every use (decode, verify, packed grid, drafter block, training blocks, sliding
window), and the blockwise backend reading only the used part of the context."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax import attention as A
from dspark_jax.train import training_attention_mask

B, S, H, K, DH = 3, 40, 4, 2, 8


@functools.lru_cache(maxsize=None)
def available_backends():
    """Every backend that runs on this platform (cuDNN needs a GPU), plus blockwise with
    blocks small enough that a context spans several, not a multiple of the capacity."""
    names = [n for n in A.BACKENDS if n != "cudnn" or jax.default_backend() == "gpu"]
    fns = {n: A.BACKENDS[n] for n in names}
    fns["blockwise/7"] = functools.partial(A.blockwise_attention, block=7)
    return {n: jax.jit(f) for n, f in fns.items()}


def random_qkv(seed, T, capacity=S):
    keys = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(keys[0], (B, T, H, DH))
    k = jax.random.normal(keys[1], (B, T, K, DH))
    v = jax.random.normal(keys[2], (B, T, K, DH))
    context = A.Context(jax.random.normal(keys[3], (2, B, capacity, K, DH)),
                        jax.random.normal(keys[4], (2, B, capacity, K, DH)), jnp.int32(1))
    return q, k, v, context


def cases():
    """(name, T, mask builder) for each use of attention in the package."""
    lengths = jnp.array([0, 13, 31], jnp.int32)  # ragged committed lengths; row 0 has no context

    def chunk(T, **kw):
        return A.AttentionMask.make(lengths[:, None] + jnp.arange(T), context_len=lengths, **kw)

    anchors, keep = jnp.array([[3, 9], [0, 20], [17, 30]]), jnp.array([[True, True], [True, False], [True, True]])
    return [
        ("decode", 1, chunk(1)),
        ("verify", 5, chunk(5)),
        ("prefill_chunk", 9, chunk(9)),
        ("drafter_block", 4, chunk(4, causal=False)),
        ("sliding_window", 6, chunk(6, window=5)),
        ("window_of_one", 3, chunk(3, window=1)),
        ("training_blocks", 8, training_attention_mask(anchors, keep, 4)),
        ("no_context", 7, A.AttentionMask.make(jnp.broadcast_to(jnp.arange(7), (B, 7)))),
    ]


CASES = {name: (T, build) for name, T, build in cases()}


@functools.lru_cache(maxsize=None)
def case_inputs(case):
    """Inputs, reference output and the rows that read any key, once per case."""
    T, mask = CASES[case]
    q, k, v, context = random_qkv(list(CASES).index(case), T)
    ctx = None if case == "no_context" else context
    want = jax.jit(A.dense_attention)(q, k, v, mask, ctx)
    # rows that read no key at all (unkept training blocks) are garbage by contract
    reads = np.asarray(mask.dense(0 if ctx is None else S).any(-1))
    return (q, k, v, mask, ctx), np.asarray(want), reads


@pytest.mark.parametrize("backend", list(available_backends()))
@pytest.mark.parametrize("case", list(CASES))
def test_every_backend_matches_the_dense_reference(backend, case):
    args, want, reads = case_inputs(case)
    got = np.asarray(available_backends()[backend](*args))
    assert reads.sum() > 0
    np.testing.assert_allclose(got[reads], want[reads], rtol=2e-5, atol=2e-5)


def test_reference_matches_a_direct_softmax_over_the_described_keys():
    """The mask description itself: one query, keys listed by hand."""
    q, k, v, context = random_qkv(3, 2)
    lengths = jnp.array([0, 13, 31], jnp.int32)
    mask = A.AttentionMask.make(lengths[:, None] + jnp.arange(2), context_len=lengths, window=4)
    out = A.dense_attention(q, k, v, mask, context)
    b, t, h = 2, 1, 3  # row 2, query at position 32 reads positions 29, 30 (context) and 31, 32 (chunk)
    ck, cv = context.layer_kv()
    keys = jnp.concatenate([ck[b, 29:31], k[b, 0:2]])[:, h // 2]
    values = jnp.concatenate([cv[b, 29:31], v[b, 0:2]])[:, h // 2]
    probs = jax.nn.softmax(keys @ q[b, t, h] / np.sqrt(DH))
    np.testing.assert_allclose(out[b, t, h], probs @ values, rtol=1e-5, atol=1e-6)


def test_blockwise_reads_only_the_used_blocks():
    """Poison every context block past the longest readable key with NaN: the blockwise
    backend never touches them (a dense read would turn the output into NaN)."""
    block, capacity = 8, 64
    q, k, v, context = random_qkv(5, 3, capacity)
    lengths = jnp.array([2, 17, 11], jnp.int32)  # longest 17: blocks 0..2 are used
    mask = A.AttentionMask.make(lengths[:, None] + jnp.arange(3), context_len=lengths)
    clean = A.blockwise_attention(q, k, v, mask, context, block=block)
    poison = lambda a: a.at[:, :, 24:].set(jnp.nan)
    poisoned = A.Context(poison(context.k), poison(context.v), context.layer)
    got = A.blockwise_attention(q, k, v, mask, poisoned, block=block)
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_array_equal(got, clean)
    assert np.isnan(np.asarray(A.dense_attention(q, k, v, mask, poisoned))).any()


def test_block_range_follows_the_used_length_and_the_window():
    mask = A.AttentionMask.make(jnp.array([[5], [17]]), context_len=jnp.array([5, 17]))
    assert [int(x) for x in A.context_block_range(mask, 4096, 8)] == [0, 3]
    windowed = A.AttentionMask.make(jnp.array([[30]]), context_len=jnp.array([30]), window=6)
    assert [int(x) for x in A.context_block_range(windowed, 4096, 8)] == [3, 4]  # keys 25..29


def test_unknown_backend_is_a_clear_error():
    q, k, v, _ = random_qkv(0, 1)
    mask = A.AttentionMask.make(jnp.zeros((B, 1), jnp.int32))
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        A.attend(q, k, v, mask, None, backend="flash")


def test_registered_backend_is_used():
    calls = []

    def spy(q, k, v, mask, context):
        calls.append(q.shape)
        return A.dense_attention(q, k, v, mask, context)

    A.register_backend("spy", spy)
    try:
        q, k, v, _ = random_qkv(0, 2)
        mask = A.AttentionMask.make(jnp.broadcast_to(jnp.arange(2), (B, 2)))
        np.testing.assert_array_equal(A.attend(q, k, v, mask, None, backend="spy"), A.dense_attention(q, k, v, mask, None))
        assert calls == [(B, 2, H, DH)]
    finally:
        del A.BACKENDS["spy"]
