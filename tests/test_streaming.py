"""Streaming: the chunked loop yields exactly the ids of the one-call loop, chunk by chunk."""

import jax
import pytest

from dspark_jax import draft as draft_model
from dspark_jax import target as target_model
from dspark_jax.config import Qwen3Config
from dspark_jax.decoding import generate_ar
from dspark_jax.sampling import Sampling
from dspark_jax.speculative import speculative_generate
from dspark_jax.streaming import stream_generate


@pytest.fixture(scope="module")
def pair():
    cfg = Qwen3Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    dcfg = draft_model.DraftConfig(layers=Qwen3Config(**{**cfg.__dict__, "num_hidden_layers": 1}), block_size=3,
                                   target_layer_ids=(0, 1), mask_token_id=127, markov_rank=8)
    return (target_model.init_params(jax.random.key(0), cfg, std=0.3), cfg,
            draft_model.init_draft_params(jax.random.key(1), dcfg, std=0.3), dcfg)


def drain(gen):
    chunks = []
    while True:
        try:
            chunks.append(next(gen))
        except StopIteration as stop:
            return chunks, stop.value


PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13]]


@pytest.mark.parametrize("mode", ["ar", "speculative"])
def test_streamed_ids_equal_the_non_streaming_call_and_arrive_in_several_chunks(pair, mode):
    target, cfg, draft, dcfg = pair
    kw = dict(max_new_tokens=13, sampling=Sampling())
    if mode == "ar":
        expected = generate_ar(target, cfg, PROMPTS, **kw)
        chunks, result = drain(stream_generate(target, cfg, PROMPTS, chunk=3, **kw))
        assert result == expected
    else:
        full = speculative_generate(target, cfg, draft, dcfg, PROMPTS, **kw)
        expected = full.samples
        chunks, result = drain(stream_generate(target, cfg, PROMPTS, draft=draft, dcfg=dcfg, chunk=2, **kw))
        assert result.samples == expected and result.stats["tau"] == full.stats["tau"]
    streamed = [sum((c[i] for c in chunks), []) for i in range(len(PROMPTS))]
    assert streamed == expected
    # text before the end: the first chunk holds the prefill's token and a few more, not all 13
    assert len(chunks) >= 3 and 0 < len(chunks[0][0]) < len(expected[0])


def test_stream_chunk_must_be_positive(pair):
    target, cfg, _, _ = pair
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        next(stream_generate(target, cfg, PROMPTS, max_new_tokens=4, chunk=0))
