"""Decoding whose cost follows the used context: chunked prefill equals one-shot prefill,
long prompts decode identically in chunks, the cache is updated in place (HLO check),
sliding-window layers match transformers, and a request past the model's context is an
error before anything compiles."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dspark_jax import draft as draft_model
from dspark_jax import target as target_model
from dspark_jax.checkpoint import load_qwen3, load_target
from dspark_jax.config import Qwen3Config
from dspark_jax.layers import layer_bytes, per_layer_by_default
from dspark_jax.decoding import ContextError, ar_decode, bucket, generate_ar, prefill, prepare_prompts
from dspark_jax.sampling import Sampling
from dspark_jax.speculative import SpecConfig, init_schedule_state, speculative_decode, speculative_generate, speculative_prefill
from hf_models import hf_forward, make_hf_qwen3

CFG = Qwen3Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512)
DCFG = draft_model.DraftConfig(layers=Qwen3Config(**{**CFG.__dict__, "num_hidden_layers": 1}), block_size=4,
                               target_layer_ids=(0, 2), mask_token_id=299, markov_rank=8,
                               enable_confidence_head=True)


@pytest.fixture(scope="module")
def pair():
    target = target_model.init_params(jax.random.key(0), CFG, std=0.3)
    draft = draft_model.init_draft_params(jax.random.key(1), DCFG, std=0.3)
    return target, draft


def ragged_prompts(lengths, seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randint(0, CFG.vocab_size - 1, n).tolist() for n in lengths]


# ---------------------------------------------------------------------------- chunked prefill


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_chunked_prefill_equals_one_shot_prefill(pair, chunk):
    """Logits at each prompt's last token, the cache entries of every prompt position and the
    drafter's context cache: the same whatever the chunk size."""
    target, draft = pair
    prepared = prepare_prompts(ragged_prompts([23, 9, 16]), CFG.vocab_size, 4, chunk_size=chunk)
    tokens, lengths = jnp.asarray(prepared.tokens), jnp.asarray(prepared.lengths)

    def prefill_with(chunk_size):
        def fn(tokens, lengths):
            cache = target_model.init_cache(CFG, 3, 64)
            ctx = draft_model.init_context_cache(DCFG, 3, 64)
            fold = lambda c, f, n: draft_model.append_context(draft, DCFG, c, f, n)
            return prefill(target, CFG, tokens, lengths, cache, chunk_size=chunk_size,
                           feature_layers=DCFG.target_layer_ids, on_chunk=fold, carry=ctx)
        return jax.jit(fn)(tokens, lengths)

    one_logits, one_cache, one_ctx = prefill_with(tokens.shape[1])
    logits, cache, ctx = prefill_with(chunk)
    np.testing.assert_allclose(logits, one_logits, rtol=1e-5, atol=1e-5)
    for got, want in ((cache, one_cache), (ctx, one_ctx)):
        np.testing.assert_array_equal(got.lengths, prepared.lengths)
        for b, n in enumerate(prepared.lengths):
            np.testing.assert_allclose(got.k[:, b, :n], want.k[:, b, :n], rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(got.v[:, b, :n], want.v[:, b, :n], rtol=1e-5, atol=1e-5)


def test_prompt_is_padded_to_whole_chunks_and_the_cache_is_not_doubled():
    prepared = prepare_prompts([[1] * 1300], 300, 100, chunk_size=512)
    assert prepared.tokens.shape == (1, 1536)  # three chunks of 512, not a 2048 bucket
    assert bucket(16_384 + 128 + 8) == 18_432  # multiples of 2048 past 2048, not 32,768
    assert bucket(100) == 128 and bucket(3) == 16


@pytest.mark.parametrize("scheduler", ["fixed", "algorithm1"])
def test_long_prompts_in_many_chunks_decode_greedy_speculative_equal_to_ar(pair, scheduler):
    target, draft = pair
    prompts = ragged_prompts([37, 20, 29], seed=1)
    want = generate_ar(target, CFG, prompts, max_new_tokens=24)
    assert generate_ar(target, CFG, prompts, max_new_tokens=24, prefill_chunk=8) == want
    got = speculative_generate(target, CFG, draft, DCFG, prompts, max_new_tokens=24, prefill_chunk=8,
                               scheduler=scheduler)
    assert got.samples == want


def test_large_capacity_decodes_the_same_tokens(pair):
    """A cache 64x larger than the request changes nothing but the capacity."""
    target, _ = pair
    prompts = ragged_prompts([11, 5])
    assert generate_ar(target, CFG, prompts, max_new_tokens=12, cache_len=2048) == generate_ar(
        target, CFG, prompts, max_new_tokens=12)


def test_a_reused_cache_decodes_like_a_fresh_one(pair):
    """ar_decode hands its (donated) cache back; decoding other prompts into it, over the
    previous request's entries, gives what a fresh zero cache gives."""
    target, _ = pair
    static = dict(cfg=CFG, sampling=Sampling(), buffer_len=16, eos_ids=())
    cache = target_model.init_cache(CFG, 2, 64)
    for seed, lengths in [(1, [13, 4]), (2, [3, 9])]:
        prompts = ragged_prompts(lengths, seed)
        prepared = prepare_prompts(prompts, CFG.vocab_size, 12, 64)
        out, counts, cache = ar_decode(target, jnp.asarray(prepared.tokens), jnp.asarray(prepared.lengths),
                                       jax.random.key(0), jnp.int32(12), cache, **static)
        got = [np.asarray(out)[i, : int(counts[i])].tolist() for i in range(2)]
        assert got == generate_ar(target, CFG, prompts, max_new_tokens=12, cache_len=64)
        assert np.asarray(cache.lengths).tolist() == [n + 11 for n in lengths]  # the last token is not cached


# ---------------------------------------------------------------------------- in place


def cache_shapes(cfg: Qwen3Config, batch: int, capacity: int) -> tuple[str, str]:
    """HLO spellings of a whole cache array and of one layer of it."""
    dims = f"{batch},{capacity},{cfg.num_key_value_heads},{cfg.head_dim}"
    return f"f32[{cfg.num_hidden_layers},{dims}]", f"f32[{dims}]"


def loop_instructions(hlo: str) -> list[str]:
    """Instructions of every computation but the entry one (loop bodies, branches, fusions):
    what runs per decoding step or round."""
    lines, in_entry = [], False
    for line in hlo.splitlines():
        if line.startswith("ENTRY"):
            in_entry = True
        elif line and not line.startswith(" "):
            in_entry = False
        elif not in_entry and " = " in line:
            lines.append(line)
    return lines


def cache_sized_copies(hlo: str, shapes: list[str]) -> list[str]:
    """Per-step instructions that copy a cache, or materialise one layer of it (a slice or a
    concatenation of a whole layer, as a scan over cached layers would)."""
    whole = [s for i, s in enumerate(shapes) if i % 2 == 0]
    layer = [s for i, s in enumerate(shapes) if i % 2 == 1]
    bad = []
    for line in loop_instructions(hlo):
        result = line.split(" = ", 1)[1]
        op = re.match(r"(\S+)\s+([\w-]+)\(", result)
        if op is None:
            continue
        shape, name = op.group(1).split("{")[0], op.group(2)
        if (shape in whole and name == "copy") or (shape in layer and name not in ("parameter", "bitcast")):
            bad.append(line.strip()[:160])
    return bad


def weight_shapes(layers: tuple) -> set[str]:
    """HLO spellings of per-layer weights' matrices, as stored and as the 2-D matrix each
    projection multiplies by (``layers.split_heads`` / ``merge_heads`` views)."""
    shapes = set()
    for a in jax.tree.leaves(layers):
        if a.ndim >= 2:  # not the norms (vectors the size of activations)
            first, last = (a.shape[0], int(np.prod(a.shape[1:]))), (int(np.prod(a.shape[:-1])), a.shape[-1])
            shapes |= {f"f32[{','.join(map(str, s))}]" for s in (a.shape, first, last)}
    return shapes


def weight_sized_copies(hlo: str, shapes: set[str]) -> list[str]:
    """Instructions that write a weight-sized array (a copy, slice or fusion of a weight)
    anywhere in the program: reading weights where they lie makes none."""
    bad = []
    for line in hlo.splitlines():
        if " = " not in line:
            continue
        op = re.match(r"(\S+)\s+([\w-]+)\(", line.split(" = ", 1)[1])
        if op and op.group(1).split("{")[0] in shapes and op.group(2) not in ("parameter", "bitcast", "get-tuple-element"):
            bad.append(line.strip()[:160])
    return bad


def ar_program(target, cfg) -> str:
    return ar_decode.lower(
        target, jnp.zeros((2, 16), jnp.int32), jnp.array([5, 3]), jax.random.key(0), jnp.int32(8),
        target_model.init_cache(cfg, 2, 512), cfg=cfg, sampling=Sampling(), buffer_len=16, eos_ids=(),
    ).compile().as_text()


LAYOUTS = {"stacked": False, "per-layer": True}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ar_step_updates_the_cache_in_place(pair, layout):
    target, cfg = target_model.with_layer_layout(pair[0], CFG, LAYOUTS[layout])
    compiled = ar_program(target, cfg)
    shapes = list(cache_shapes(CFG, 2, 512))
    assert any(shapes[0] in line for line in loop_instructions(compiled))  # the cache is in the loop
    assert cache_sized_copies(compiled, shapes) == []


def test_per_layer_target_and_drafter_decode_as_the_stacked_ones(pair):
    """Greedy speculative decoding with both models in the decoding layout: the target's own
    greedy tokens, and the same drafts accepted as with stacked weights."""
    (target, draft), prompts = pair, ragged_prompts([9, 3, 14])
    per, cfg = target_model.with_layer_layout(target, CFG)
    per_draft = draft_model.with_layer_layout(draft, DCFG)
    assert isinstance(per_draft.layers, tuple) and len(per_draft.layers) == DCFG.layers.num_hidden_layers
    ar = generate_ar(target, CFG, prompts, max_new_tokens=20)
    assert generate_ar(per, cfg, prompts, max_new_tokens=20) == ar
    stacked = speculative_generate(target, CFG, draft, DCFG, prompts, max_new_tokens=20)
    layered = speculative_generate(per, cfg, per_draft, DCFG, prompts, max_new_tokens=20)
    assert stacked.samples == layered.samples == ar
    assert layered.stats["accepted_tokens"] == stacked.stats["accepted_tokens"] > 0
    back = draft_model.with_layer_layout(per_draft, DCFG, per_layer=False)
    assert all(bool(jnp.array_equal(a, b)) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(draft)))


def test_auto_layout_holds_large_layers_per_layer_on_cpu_only(tmp_path):
    big = Qwen3Config(vocab_size=1000, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=128)  # Qwen3-0.6B's layers
    matrices, norms = 1024 * 2048 + 2 * 1024 * 1024 + 2048 * 1024 + 3 * 1024 * 3072, 2 * 1024 + 2 * 128
    assert layer_bytes(big, jnp.float32) == 4 * (matrices + norms)  # 63 MB
    assert target_model.resolve_layer_layout("auto", big, jnp.float32)
    assert not per_layer_by_default(layer_bytes(big, jnp.float32), platform="gpu")
    assert not per_layer_by_default(layer_bytes(big, jnp.float32), platform="tpu")
    assert not target_model.resolve_layer_layout("auto", CFG, jnp.float32)  # 0.03 MB layers
    assert target_model.resolve_layer_layout(True, CFG, jnp.float32)
    with pytest.raises(ValueError, match="per_layer must be"):
        target_model.resolve_layer_layout("yes", CFG, jnp.float32)
    make_hf_qwen3(tmp_path, layers=2)
    _, small = load_target(tmp_path, per_layer="auto")
    assert not small.per_layer_weights


def test_per_layer_weights_are_read_where_they_lie():
    """The decoding layout's point: no instruction of the AR program writes a weight-sized
    array (on XLA:CPU a scan over stacked weights copies each layer's slice before its dot,
    and a 3-axis einsum over o_proj transposed it). Shapes distinct from every activation."""
    cfg = Qwen3Config(vocab_size=300, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                      num_attention_heads=6, num_key_value_heads=3, head_dim=16)
    target, cfg = target_model.with_layer_layout(target_model.init_params(jax.random.key(0), cfg), cfg)
    shapes = weight_shapes(target.layers)
    assert {"f32[48,6,16]", "f32[48,96]", "f32[6,16,48]", "f32[96,48]", "f32[80,48]"} <= shapes
    compiled = ar_program(target, cfg)
    assert any("f32[48,80]" in line for line in compiled.splitlines())  # the weights are in the program
    assert weight_sized_copies(compiled, shapes) == []


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scheduler", ["fixed", "algorithm1"])
def test_speculative_round_updates_both_caches_in_place(pair, scheduler, layout):
    target, cfg = target_model.with_layer_layout(pair[0], CFG, LAYOUTS[layout])
    draft = draft_model.with_layer_layout(pair[1], DCFG, LAYOUTS[layout])
    scfg = SpecConfig(target=cfg, draft=DCFG, scheduler=scheduler)
    state = speculative_prefill(target, draft, jnp.zeros((2, 16), jnp.int32), jnp.array([5, 3]),
                                jnp.array([True, True]), jax.random.key(0), jnp.int32(8),
                                init_schedule_state(2, DCFG.block_size), scfg=scfg, buffer_len=16, cache_len=512)
    compiled = speculative_decode.lower(target, draft, state, scfg=scfg).compile().as_text()
    shapes = list(cache_shapes(CFG, 2, 512)) + list(cache_shapes(DCFG.layers, 2, 512))
    assert cache_sized_copies(compiled, shapes) == []


# ---------------------------------------------------------------------------- sliding window


@pytest.fixture(scope="module")
def windowed_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("sliding")
    types = ["full_attention", "sliding_attention", "sliding_attention"]
    hf = make_hf_qwen3(path, layers=3, use_sliding_window=True, sliding_window=5, layer_types=types,
                       attn_implementation="eager")
    params, cfg = load_qwen3(path)
    return hf, params, cfg


def test_sliding_window_config_is_read_not_ignored(windowed_model):
    _, _, cfg = windowed_model
    assert cfg.layer_windows() == (None, 5, 5)
    default = Qwen3Config.from_hf({**cfg.to_hf(), "layer_types": None, "max_window_layers": 2})
    assert default.layer_windows() == (None, None, 5)  # transformers: layers >= max_window_layers
    assert Qwen3Config.from_hf({**cfg.to_hf(), "use_sliding_window": False}).layer_windows() == (None,) * 3


def test_sliding_window_logits_match_transformers(windowed_model):
    hf, params, cfg = windowed_model
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (2, 19))  # window 5 << 19
    want, _ = hf_forward(hf, ids)
    out, _ = target_model.forward(params, cfg, jnp.asarray(ids), None)
    np.testing.assert_allclose(out.logits, want, rtol=2e-4, atol=2e-4)
    # the same through the cache, chunk by chunk (windowed reads of the cache)
    cache = target_model.init_cache(cfg, 2, 64)
    logits, cache, _ = jax.jit(lambda t, l, c: prefill(params, cfg, t, l, c, chunk_size=4))(
        jnp.asarray(ids), jnp.array([19, 19]), cache)
    np.testing.assert_allclose(logits, want[:, -1], rtol=2e-4, atol=2e-4)


def test_sliding_window_greedy_decoding_matches_transformers_generate(windowed_model):
    hf, params, cfg = windowed_model
    prompt = np.random.RandomState(1).randint(0, cfg.vocab_size, (1, 7))
    with torch.no_grad():
        ref = hf.generate(torch.tensor(prompt), max_new_tokens=20, do_sample=False)[0, 7:].tolist()
    assert generate_ar(params, cfg, prompt.tolist(), max_new_tokens=20, prefill_chunk=3) == [ref]


# ---------------------------------------------------------------------------- the model's context


def test_request_past_the_models_context_is_an_error_unless_allowed(pair):
    target, draft = pair
    prompt = [[1] * 500]  # + 20 new tokens > max_position_embeddings 512
    with pytest.raises(ContextError, match=r"500 tokens \+ max_new_tokens 20 = 520 positions exceeds .* 512"):
        generate_ar(target, CFG, prompt, max_new_tokens=20)
    with pytest.raises(ContextError, match="allow_long_context"):
        speculative_generate(target, CFG, draft, DCFG, prompt, max_new_tokens=20)
    assert len(generate_ar(target, CFG, prompt, max_new_tokens=2, allow_long_context=True)[0]) == 2


def test_cache_larger_than_memory_fails_before_compiling(pair):
    target, _ = pair
    big = Qwen3Config(**{**CFG.__dict__, "max_position_embeddings": 1 << 40})
    with pytest.raises(ContextError, match=r"the KV cache needs [\d.]+ GiB but the device has"):
        generate_ar(target, big, [[1, 2, 3]], max_new_tokens=1 << 32)
