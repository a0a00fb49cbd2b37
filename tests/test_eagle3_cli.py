"""``dspark-jax train-draft --drafter eagle3`` end to end on a tiny target: the export in
DeepSpec's Eagle-3 layout decodes greedy == ar, a second run resumes, eval compares it with a
DSpark drafter, and a confidence scheduler refuses it on the command line."""

import contextlib
import io
import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax import cli
from dspark_jax import eagle3
from dspark_jax.checkpoint import load_draft, load_drafter
from dspark_jax.decoding import generate_ar

from test_cli import model_dirs, run_json  # noqa: F401  (the tiny target with its tokenizer)

BLOCK = 3
# the tensors of DeepSpec's one-layer Eagle-3 checkpoint (deepspec_qwen3_eagle3/draft/keys.json)
# less its copies of the target's embed_tokens / lm_head
DEEPSPEC_EAGLE3_KEYS = {"fc.weight", "norm.weight"} | {f"layers.0.{name}.weight" for name in (
    "hidden_norm", "input_layernorm", "post_attention_layernorm", "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj",
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "self_attn.q_norm",
    "self_attn.k_norm")}


def train_draft_argv(root, work, drafter, steps):
    """The recipe's short form: few prompts and steps, tiny answers, the export of step 2b."""
    return ["train-draft", "--drafter", drafter, "--target", str(root / "target"), "--out", str(work / drafter),
            "--prompts", str(work / "prompts.jsonl"), "--num-prompts", "8", "--answer-tokens", "8", "--seq-len", "16",
            "--batch-size", "4", "--regen-batch", "8", "--layers", "1", "--block-size", str(BLOCK), "--markov-rank", "8",
            "--num-anchors", "4", "--target-layer-ids", "0,1", "--save-every", "2", "--log-every", "1",
            "--no-progress", "--export-dtype", "bfloat16", "--no-embedding-copies", "--steps", str(steps)]


@pytest.fixture(scope="module")
def trained(model_dirs, tmp_path_factory):
    """An Eagle-3 run stopped at step 2 and resumed to 4 (the logs of both runs), and a DSpark
    drafter trained the same short way on the same regenerated answers."""
    root, _, _ = model_dirs
    work = tmp_path_factory.mktemp("eagle3_cli")
    (work / "prompts.jsonl").write_text(
        "\n".join(json.dumps({"text": t}) for t in ["def f(x):", "the quick", "return x", "brown fox"] * 2))
    logs = []
    for steps in (2, 4):
        logs.append(run_logged(train_draft_argv(root, work, "eagle3", steps)))
    (work / "dspark").mkdir()
    shutil.copy(work / "eagle3" / "regenerated.npz", work / "dspark")  # the same answers, as RECIPE.md step 2b
    run_logged(train_draft_argv(root, work, "dspark", 2))
    return work, logs


def run_logged(argv) -> str:
    """What a CLI command printed (stdout)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        cli.main(argv)
    return buf.getvalue()


def test_train_draft_eagle3_exports_deepspecs_layout_that_decodes_greedy_equal_to_ar(model_dirs, trained, capsys):
    root, target, cfg = model_dirs
    work, _ = trained
    export = work / "eagle3" / "draft"
    saved = json.loads((export / "config.json").read_text())
    assert saved["architectures"] == [eagle3.ARCHITECTURE]
    assert saved["target_layer_ids"] == [0, 1] and saved["ttt_length"] == BLOCK and saved["step_loss_decay"] == 0.8
    assert saved["draft_num_hidden_layers"] == saved["num_hidden_layers"] == 1 and saved["tie_word_embeddings"] is False
    with open(export / "model.safetensors", "rb") as f:  # the raw header: names and stored dtypes
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    header.pop("__metadata__", None)
    assert set(header) == DEEPSPEC_EAGLE3_KEYS  # without the embed_tokens / lm_head copies
    assert {t["dtype"] for t in header.values()} == {"BF16"}
    D = cfg.hidden_size  # fc fuses the 2 target layers' features; q/k/v read [embedding ; hidden]
    assert header["fc.weight"]["shape"] == [D, 2 * D]
    assert header["layers.0.self_attn.q_proj.weight"]["shape"] == [cfg.num_attention_heads * cfg.head_dim, 2 * D]
    draft, dcfg = load_draft(export, target, cfg, "float32")
    assert isinstance(draft, eagle3.Eagle3Params) and dcfg.block_size == BLOCK
    at_step_4, cfg_4 = load_drafter(work / "eagle3", target, cfg, "float32")  # the run's latest checkpoint
    assert cfg_4 == dcfg
    jax.tree.map(lambda exported, last: np.testing.assert_array_equal(  # the export is step 4's state, in bfloat16
        exported, np.asarray(jnp.asarray(last, jnp.bfloat16), np.float32)), draft, at_step_4)
    out = run_json(capsys, ["generate", "--target", str(root / "target"), "--draft", str(export), "--prompt-ids",
                            "5,6,7", "--max-new-tokens", "12", "--compare-ar", "--repeats", "1", "--json"])
    assert out["mode"] == "speculative" and out["matches_ar"] is True and out["rounds"] > 0
    assert out["samples"] == generate_ar(target, cfg, [[5, 6, 7]], max_new_tokens=12)


def test_train_draft_eagle3_resumes_from_its_last_checkpoint(trained):
    work, (first, second) = trained
    assert "resuming" not in first and "resuming from step 2" in second
    steps = [json.loads(l)["step"] for l in (work / "eagle3" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert json.loads((work / "eagle3" / "draft" / "manifest.json").read_text())["steps"] == 4


def test_eval_compares_eagle3_with_dspark_and_plots_both(model_dirs, trained, tmp_path, capsys):
    root, _, _ = model_dirs
    work, _ = trained
    out_dir = tmp_path / "figs"
    argv = ["eval", "--target", str(root / "target"), "--draft", str(work / "eagle3" / "draft"),
            "--draft", str(work / "dspark" / "draft"), "--prompts", str(work / "prompts.jsonl"), "--num-prompts", "4",
            "--max-new-tokens", "8", "--temperature", "1", "--block-size", str(BLOCK), "--batch-size", "4", "--out", str(out_dir)]
    cli.main(argv)
    lines = capsys.readouterr().out.splitlines()
    taus = {}
    for name in ("eagle3/draft", "dspark/draft"):  # the tau table: one row per drafter (one domain, its mean)
        row = next(l for l in lines if l.startswith(name + " "))
        taus[name] = float(row.split()[1])
        assert 1.0 <= taus[name] <= BLOCK + 1
        rates = next(l for l in lines if l.startswith(name + " ") and "prompts" in l).split()[2:]
        assert len(rates) == BLOCK  # per-position acceptance of each drafter
    ratio = next(l for l in lines if l.startswith("eagle3/draft/dspark/draft "))  # over the last drafter
    assert float(ratio.split()[1].rstrip("x")) == pytest.approx(taus["eagle3/draft"] / taus["dspark/draft"], abs=3e-3)  # of 3-decimal taus
    figures = lines[-1].removeprefix("figures: ").split(", ")
    assert figures == [str(out_dir / "acceptance_by_position.png"), str(out_dir / "confidence_reliability.png")]
    for path in figures:
        data = open(path, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


@pytest.mark.parametrize("option", [["--scheduler", "algorithm1"], ["--scheduler", "async"],
                                    ["--scheduler", "threshold"], ["--confidence-threshold", "0.5"]])
def test_generate_refuses_a_confidence_scheduler_for_eagle3_in_one_line(model_dirs, trained, option, capsys):
    root, _, _ = model_dirs
    work, _ = trained
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--target", str(root / "target"), "--draft", str(work / "eagle3" / "draft"),
                  "--prompt-ids", "5,6,7", "--max-new-tokens", "4", "--json", *option])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: .*Eagle-3 has none.*'fixed' scheduler\n", err), err
