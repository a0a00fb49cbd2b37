"""Autoregressive decoding (``generate_ar`` / ``ar_decode``) against transformers ``generate``.

One tiny random transformers Qwen3 is built and saved per module; greedy decoding must agree
with transformers token for token, alone and in ragged batches, and every stopping rule (EOS,
max_new_tokens, a full cache) must cut the same unconstrained sequence at the right place.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import Qwen3ForCausalLM

import dspark_jax.target
from dspark_jax.checkpoint import load_qwen3
from dspark_jax.decoding import generate_ar
from dspark_jax.sampling import Sampling
from hf_models import make_hf_qwen3

VOCAB = 97
MAX_NEW = 20
# lengths 3 and 8 share the 16-token prompt bucket, 17 falls in the next one
PROMPTS = [
    [5, 6, 7],
    [11, 3, 96, 40, 0, 27, 58, 13],
    [int(t) for t in np.random.RandomState(8).randint(0, VOCAB, 17)],
]


def hf_greedy(model, prompt, max_new_tokens):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


def first_eos_cut(tokens, eos):
    """The tokens up to and including the first ``eos`` (all of them when it never occurs)."""
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("ar")
    make_hf_qwen3(path, layers=3, vocab=VOCAB, seed=30)
    return path


@pytest.fixture(scope="module")
def hf_model(model_dir):
    return Qwen3ForCausalLM.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def target(model_dir):
    params, cfg = load_qwen3(model_dir, dtype="float32")
    assert cfg.eos_token_ids == ()
    return params, cfg


@pytest.fixture(scope="module")
def alone(target):
    """Unconstrained greedy continuation of each prompt, decoded one prompt at a time."""
    params, cfg = target
    return [generate_ar(params, cfg, [p], max_new_tokens=MAX_NEW)[0] for p in PROMPTS]


def test_greedy_matches_transformers_generate(alone, hf_model):
    for prompt, ours in zip(PROMPTS, alone):
        assert len(ours) == MAX_NEW
        assert ours == hf_greedy(hf_model, prompt, MAX_NEW)


def test_ragged_batch_decodes_each_sequence_as_alone(target, alone):
    params, cfg = target
    batch = generate_ar(params, cfg, PROMPTS, max_new_tokens=MAX_NEW)
    assert batch == alone
    reordered = generate_ar(params, cfg, PROMPTS[::-1], max_new_tokens=MAX_NEW)
    assert reordered == alone[::-1]


def test_max_new_tokens_cuts_the_same_sequence(target, alone):
    params, cfg = target
    assert generate_ar(params, cfg, PROMPTS, max_new_tokens=7) == [a[:7] for a in alone]
    assert generate_ar(params, cfg, PROMPTS, max_new_tokens=1) == [a[:1] for a in alone]


# --------------------------------------------------------------------------- EOS


@pytest.fixture(scope="module")
def eos_setup(model_dir, alone, tmp_path_factory):
    """A copy of the model whose config.json names, as EOS, a token that prompt 0 generates
    for the first time at step >= 2 of its unconstrained run."""
    seq = alone[0]
    index = next(i for i in range(2, len(seq)) if seq[i] not in seq[:i])
    eos = seq[index]
    path = tmp_path_factory.mktemp("ar-eos")
    shutil.copytree(model_dir, path, dirs_exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        raw = json.loads((path / name).read_text())
        raw["eos_token_id"] = eos
        (path / name).write_text(json.dumps(raw))
    return path, eos, index


def test_eos_from_config_stops_right_after_it(eos_setup, alone):
    path, eos, index = eos_setup
    params, cfg = load_qwen3(path)
    assert cfg.eos_token_ids == (eos,)
    out = generate_ar(params, cfg, [PROMPTS[0]], max_new_tokens=MAX_NEW)[0]
    assert out == alone[0][: index + 1]
    assert out[-1] == eos and eos not in out[:-1]


def test_eos_stop_agrees_with_transformers(eos_setup):
    path, eos, index = eos_setup
    hf = Qwen3ForCausalLM.from_pretrained(path).eval()
    assert hf.generation_config.eos_token_id == eos
    params, cfg = load_qwen3(path)
    for prompt in PROMPTS:
        assert generate_ar(params, cfg, [prompt], max_new_tokens=MAX_NEW)[0] == hf_greedy(hf, prompt, MAX_NEW)


def test_eos_in_ragged_batch_stops_only_its_own_sequence(eos_setup, alone):
    path, eos, _ = eos_setup
    params, cfg = load_qwen3(path)
    out = generate_ar(params, cfg, PROMPTS, max_new_tokens=MAX_NEW)
    assert out == [first_eos_cut(a, eos) for a in alone]
    # prompt 0 stopped early while another sequence of its batch kept decoding
    assert len(out[0]) < max(len(o) for o in out)


# --------------------------------------------------------------------------- cache capacity


def test_full_cache_stops_generation_on_the_same_prefix(target, alone):
    """With a cache of C positions, a prompt of P tokens yields C - P + 1 tokens: every cache
    entry is used, and the newest token needs no entry of its own."""
    params, cfg = target
    cache_len = 12
    out = generate_ar(params, cfg, PROMPTS[:2], max_new_tokens=MAX_NEW, cache_len=cache_len)
    for prompt, full, got in zip(PROMPTS[:2], alone, out):
        assert len(got) == cache_len - len(prompt) + 1
        assert got == full[: len(got)]


def test_prompt_filling_the_cache_yields_one_token(target, alone):
    params, cfg = target
    prompt = PROMPTS[1]
    assert generate_ar(params, cfg, [prompt], max_new_tokens=MAX_NEW, cache_len=len(prompt)) == [alone[1][:1]]


# --------------------------------------------------------------------------- input validation


@pytest.fixture
def count_traces(monkeypatch):
    """Counts traces of the decoding graph: ``ar_decode`` calls ``target.forward`` only while
    it is being traced (twice per trace: prefill and decode step), never on a cache hit."""
    calls = []
    original = dspark_jax.target.forward

    def counting_forward(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(dspark_jax.target, "forward", counting_forward)
    return calls


def test_prompt_longer_than_cache_raises_before_compiling(target, count_traces):
    params, cfg = target
    with pytest.raises(ValueError, match=r"prompt of 8 tokens does not fit the KV cache of 7 positions"):
        generate_ar(params, cfg, [PROMPTS[0], PROMPTS[1]], max_new_tokens=4, cache_len=7)
    assert count_traces == []


@pytest.mark.parametrize(
    "prompts, message",
    [
        ([[1, 2], [3, VOCAB, 4]], rf"prompt 1: token ids \[{VOCAB}\] outside the vocabulary \[0, {VOCAB}\)"),
        ([[-1, 2]], rf"prompt 0: token ids \[-1\] outside the vocabulary \[0, {VOCAB}\)"),
        ([[1, 2], []], r"prompt 1 is empty"),
        ([], r"no prompts given"),
    ],
    ids=["id-too-large", "negative-id", "empty-prompt", "no-prompts"],
)
def test_invalid_prompts_raise_before_compiling(target, count_traces, prompts, message):
    params, cfg = target
    with pytest.raises(ValueError, match=message):
        generate_ar(params, cfg, prompts, max_new_tokens=4)
    assert count_traces == []


def test_nonpositive_max_new_tokens_raises(target):
    params, cfg = target
    with pytest.raises(ValueError, match=r"max_new_tokens must be >= 1, got 0"):
        generate_ar(params, cfg, [PROMPTS[0]], max_new_tokens=0)


# --------------------------------------------------------------------------- sampling

HOT = Sampling(temperature=1.0)
NUM_SAMPLES = 8
SAMPLE_NEW = 12


def test_sampling_is_reproducible_for_a_seed(target):
    params, cfg = target
    batch = [PROMPTS[0]] * NUM_SAMPLES
    a = generate_ar(params, cfg, batch, max_new_tokens=SAMPLE_NEW, sampling=HOT, seed=3)
    b = generate_ar(params, cfg, batch, max_new_tokens=SAMPLE_NEW, sampling=HOT, seed=3)
    c = generate_ar(params, cfg, batch, max_new_tokens=SAMPLE_NEW, sampling=HOT, seed=4)
    assert a == b
    assert a != c


def test_identical_prompts_sampled_at_temperature_one_give_varied_samples(target, alone):
    params, cfg = target
    samples = generate_ar(params, cfg, [PROMPTS[0]] * NUM_SAMPLES, max_new_tokens=SAMPLE_NEW, sampling=HOT, seed=5)
    assert all(len(s) == SAMPLE_NEW for s in samples)
    assert all(0 <= t < VOCAB for s in samples for t in s)
    # each row draws its own randomness: the logits spread over the 97 tokens with a standard
    # deviation of ~1.7, so two rows of 12 independent draws coinciding is vanishingly unlikely
    assert len({tuple(s) for s in samples}) == NUM_SAMPLES
    # already the first token varies across rows
    assert len({s[0] for s in samples}) > 1
    assert any(s != alone[0][:SAMPLE_NEW] for s in samples)


@pytest.mark.parametrize(
    "sampling",
    [Sampling(temperature=1.0, top_k=1), Sampling(temperature=0.7, top_p=1e-6)],
    ids=["top_k=1", "top_p=tiny"],
)
def test_sampling_restricted_to_the_top_token_equals_greedy(target, alone, sampling):
    params, cfg = target
    assert generate_ar(params, cfg, PROMPTS, max_new_tokens=MAX_NEW, sampling=sampling, seed=9) == alone


# --------------------------------------------------------------------------- compilation


def test_new_max_new_tokens_and_prompt_length_in_same_bucket_do_not_retrace(target, alone, hf_model, count_traces):
    params, cfg = target
    # prompt lengths 3 and 4 share the 16-token bucket and buffer_len = bucket(max_new) = 16
    # for every call below; cache_len 20 is used by no other test, so the first call traces
    first = generate_ar(params, cfg, [PROMPTS[0]], max_new_tokens=5, cache_len=20)[0]
    traces_after_first = len(count_traces)
    assert traces_after_first > 0
    second = generate_ar(params, cfg, [PROMPTS[0]], max_new_tokens=9, cache_len=20)[0]
    third = generate_ar(params, cfg, [PROMPTS[1][:4]], max_new_tokens=11, cache_len=20)[0]
    assert len(count_traces) == traces_after_first
    assert first == alone[0][:5]
    assert second == alone[0][:9]
    assert third == hf_greedy(hf_model, PROMPTS[1][:4], 11)


def test_jit_cache_hit_returns_the_same_tokens(target, alone):
    """A cache hit must not reuse stale state from a previous call (e.g. its max_new_tokens)."""
    params, cfg = target
    long = generate_ar(params, cfg, [PROMPTS[0]], max_new_tokens=13)[0]
    short = generate_ar(params, cfg, [PROMPTS[0]], max_new_tokens=6)[0]
    assert long == alone[0][:13]
    assert short == alone[0][:6]
