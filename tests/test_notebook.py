"""The notebooks run: colab/qwen3_4b.ipynb's cells that load Qwen3-4B + dspark_qwen3_4b_block7 from the hub
run offline on a small random pair saved in the released layout (chat template, streaming, ar);
colab/research_new_head.ipynb trains a plug-in head and the vanilla head for a few steps."""

import os

import jax
import pytest

from dspark_jax import draft as draft_model
from dspark_jax import target as target_model
from dspark_jax.checkpoint import EMBEDDED_DIR, save_draft, save_qwen3
from dspark_jax.config import Qwen3Config

from chat_templates import QWEN3_SPECIAL, QWEN3_STYLE, VOCAB, write_tokenizer

REPO = os.path.dirname(EMBEDDED_DIR)


def released_pair(root):
    """target/: config, generation_config, safetensors, tokenizer with its chat template (as
    Qwen/Qwen3-4B); draft/: a DeepSpec DSpark checkpoint with embedding copies (as the hub's)."""
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    write_tokenizer(root / "target", QWEN3_SPECIAL, {"chat_template": QWEN3_STYLE, "eos_token": "<|im_end|>",
                    "pad_token": "<|endoftext|>"}, non_special=("<think>", "</think>"))
    target = target_model.init_params(jax.random.key(0), cfg, std=0.3)
    save_qwen3(root / "target", target, cfg)
    dcfg = draft_model.DraftConfig(layers=Qwen3Config(**{**cfg.__dict__, "num_hidden_layers": 1}), block_size=4,
                                   target_layer_ids=(0, 1), mask_token_id=VOCAB - 1, markov_rank=8,
                                   enable_confidence_head=True)
    save_draft(root / "draft", draft_model.init_draft_params(jax.random.key(1), dcfg, std=0.3), dcfg, target)


def run_notebook(name: str, monkeypatch) -> tuple[list, str]:
    """Execute ``colab/<name>`` with the repository on PYTHONPATH; its code cells' outputs, none an
    error, and their printed text."""
    import nbclient
    import nbformat

    monkeypatch.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(os.path.join(REPO, "colab", name), as_version=4)
    nbclient.NotebookClient(nb, timeout=1500, kernel_name="python3", resources={"metadata": {"path": REPO}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    return outputs, "".join(o.get("text", "") for o in outputs)


def test_qwen3_4b_notebook_runs_its_cells_on_a_random_pair_in_the_released_layout(tmp_path, monkeypatch):
    released_pair(tmp_path)
    monkeypatch.setenv("DSPARK_NOTEBOOK_PAIR", str(tmp_path))
    # the kernel sees the suite's 8 fake CPU devices: the target runs tensor-parallel over 4 (its heads)
    _, text = run_notebook("qwen3_4b.ipynb", monkeypatch)
    assert "<|im_start|>user\nExplain in three sentences" in text and "<think>\n\n</think>" in text
    assert "chunks streamed, tau = " in text and "identical to ar: True" in text and "identical to the stream: True" in text
    assert "tensor-parallel over 4 of 8 device(s)" in text


@pytest.mark.parametrize("steps", [2])
def test_research_new_head_notebook_trains_a_two_token_head_and_compares_it_with_vanilla(steps, monkeypatch):
    """colab/research_new_head.ipynb end to end with ``steps`` optimiser steps per drafter (the
    notebook's default is 300) and a handful of prompts."""
    for name, value in (("STEPS", steps), ("PROMPTS", 8), ("ANSWER_TOKENS", 16), ("EVAL_PROMPTS", 4),
                        ("EVAL_TOKENS", 16)):
        monkeypatch.setenv(f"DSPARK_NOTEBOOK_{name}", str(value))
    outputs, text = run_notebook("research_new_head.ipynb", monkeypatch)
    assert f"{steps} steps per drafter" in text
    assert "two-token: head __main__:TwoTokenHead, Markov state ['out', 'prev', 'prev2']" in text
    assert "vanilla: head vanilla" in text and "tau" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)
