"""Training-data helpers: the domain mix of regeneration prompts."""

import numpy as np
import pytest

from dspark_jax.data import Document, domain_mixed_prompts


def char_ids(text):
    return [ord(c) for c in text]


def corpus():
    rng = np.random.default_rng(1)
    text = lambda lo, n: "".join(map(chr, rng.integers(lo, lo + 500, n)))
    code = [Document(f"mod{i}", text(100, 400), "code") for i in range(20)]
    prose = [Document(f"topic{i}", text(1000, 120), "prose") for i in range(3)]  # code points >= 1000
    return code + prose


def test_domain_mix_has_the_asked_share_of_prose_at_prompt_length_and_is_shuffled():
    prompts = domain_mixed_prompts(corpus(), 16, char_ids, 80, 0.25, np.random.default_rng(0))
    assert len(prompts) == 80 and all(len(p) == 16 for p in prompts)
    is_prose = np.array([p[0] >= 1000 for p in prompts])
    assert is_prose.sum() == 20
    # shuffled: prose is spread over the list, not a block at one end
    assert 0 < is_prose[:40].sum() < 20
    # the three short prose documents give 20 prompts only because they are cut at a finer stride
    assert len({tuple(p) for p in np.array(prompts, dtype=object)[is_prose]}) == 20


def test_domain_mix_names_the_domain_that_runs_out_of_prompts():
    with pytest.raises(ValueError, match="prose: asked for 400 prompts of 16 tokens, the corpus has"):
        domain_mixed_prompts(corpus(), 16, char_ids, 800, 0.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="prose_fraction"):
        domain_mixed_prompts(corpus(), 16, char_ids, 10, 1.5, np.random.default_rng(0))
