"""The dspark-jax command line: JSON output of generate (ar and speculative), text prompts, errors."""

import json
import pathlib
import re

import jax
import numpy as np
import pytest

from dspark_jax import cli
from dspark_jax import draft as draft_model
from dspark_jax import target as target_model
from dspark_jax.checkpoint import save_draft, save_qwen3
from dspark_jax.config import Qwen3Config
from dspark_jax.decoding import generate_ar


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    cfg = Qwen3Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    target = target_model.init_params(jax.random.key(0), cfg, std=0.3)
    dcfg = draft_model.DraftConfig(layers=Qwen3Config(**{**cfg.__dict__, "num_hidden_layers": 1}), block_size=3,
                                   target_layer_ids=(0, 1), mask_token_id=299, markov_rank=8,
                                   enable_confidence_head=True)
    draft = draft_model.init_draft_params(jax.random.key(1), dcfg, std=0.3)
    save_qwen3(root / "target", target, cfg)
    save_draft(root / "draft", draft, dcfg, target)
    # a real byte-level BPE tokenizer.json beside the target
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def f(x):\n    return x + 1\n" * 20, "the quick brown fox jumps over the lazy dog"], trainer)
    tok.save(str(root / "target" / "tokenizer.json"))
    return root, target, cfg


def run_json(capsys, argv):
    cli.main(argv)
    return json.loads(capsys.readouterr().out)


def test_generate_ar_json_has_samples_excluding_the_prompt_and_tokens_per_second(model_dirs, capsys):
    root, target, cfg = model_dirs
    out = run_json(capsys, ["generate", "--mode", "ar", "--target", str(root / "target"), "--prompt-ids", "5,6,7",
                            "--max-new-tokens", "9", "--json"])
    assert out["samples"] == generate_ar(target, cfg, [[5, 6, 7]], max_new_tokens=9)
    assert len(out["samples"][0]) == 9 and out["tokens_per_second"] > 0


def test_generate_speculative_is_the_default_with_a_draft_and_reports_statistics_and_trace(model_dirs, capsys):
    root, target, cfg = model_dirs
    out = run_json(capsys, ["generate", "--target", str(root / "target"), "--draft", str(root / "draft"),
                            "--prompt-ids", "5,6,7", "--max-new-tokens", "9", "--num-samples", "2", "--trace", "--json"])
    assert out["mode"] == "speculative"
    assert out["samples"] == [generate_ar(target, cfg, [[5, 6, 7]], max_new_tokens=9)[0]] * 2
    assert out["rounds"] == sum(len(t) for t in out["trace"])
    assert out["tau"] == pytest.approx((out["accepted_tokens"] + out["rounds"]) / out["rounds"])
    assert len(out["accept_rate_by_position"]) == 3
    for sample, rounds in zip(out["samples"], out["trace"]):
        rebuilt = [sample[0]]  # the first token comes from the target's prefill
        for r in rounds:
            rebuilt += r["proposed"][: r["accepted"]] + [r["bonus"]]
        assert rebuilt[: len(sample)] == sample


def test_generate_with_text_prompt_uses_the_tokenizer_and_returns_text(model_dirs, capsys):
    root, _, _ = model_dirs
    out = run_json(capsys, ["generate", "--mode", "ar", "--target", str(root / "target"), "--prompt", "def f(x):",
                            "--max-new-tokens", "5", "--temperature", "1", "--seed", "3", "--num-samples", "3", "--json"])
    assert len(out["texts"]) == 3 and all(isinstance(t, str) for t in out["texts"])
    assert len(out["samples"]) == 3


def test_generate_errors_are_clear(model_dirs, capsys):
    root, _, _ = model_dirs
    with pytest.raises(SystemExit, match=re.escape("--cache-len 4 is shorter than the prompt (6 tokens)")):
        cli.main(["generate", "--mode", "ar", "--target", str(root / "target"), "--prompt-ids", "1,2,3,4,5,6",
                  "--cache-len", "4", "--json"])
    with pytest.raises(SystemExit, match="outside the vocabulary"):
        cli.main(["generate", "--mode", "ar", "--target", str(root / "target"), "--prompt-ids", "1,2,999", "--json"])
    with pytest.raises(SystemExit, match="needs --draft"):
        cli.main(["generate", "--mode", "speculative", "--target", str(root / "target"), "--prompt-ids", "1", "--json"])
    with pytest.raises(SystemExit, match="config.json: file not found"):
        cli.main(["generate", "--target", str(root), "--prompt-ids", "1", "--json"])


def test_calibrate_writes_sts_temperatures_that_generate_then_uses(model_dirs, tmp_path, capsys):
    root, target, cfg = model_dirs
    # a fit needs confidences that track acceptance: a random drafter's do not (its STS fit is
    # degenerate, refused), so the calibration runs on the embedded trained pair
    checkpoints = pathlib.Path(__file__).resolve().parents[1] / "checkpoints"
    cli.main(["calibrate", "--target", str(checkpoints / "target"), "--draft", str(checkpoints / "dspark"),
              "--prompts", "train", "--num-prompts", "12", "--temperature", "1", "--max-new-tokens", "48",
              "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "STS on" in printed and "ECE before" in printed
    saved = json.loads((tmp_path / "sts_calibration.json").read_text())
    assert len(saved["temperatures"]) == 7 and all(t > 0 for t in saved["temperatures"])
    assert saved["report"]["rounds"] > 0 and "greedy_temperatures" not in saved
    # a greedy fit lands beside the sampled set, which stays as it was
    cli.main(["calibrate", "--target", str(checkpoints / "target"), "--draft", str(checkpoints / "dspark"),
              "--prompts", "train", "--num-prompts", "12", "--temperature", "0", "--max-new-tokens", "48",
              "--out", str(tmp_path)])
    assert "the greedy set" in capsys.readouterr().out
    both = json.loads((tmp_path / "sts_calibration.json").read_text())
    assert both["temperatures"] == saved["temperatures"] and both["report"] == saved["report"]
    assert len(both["greedy_temperatures"]) == 7 and both["greedy_temperatures"] != saved["temperatures"]
    assert both["greedy_report"]["temperature"] == 0
    profile = tmp_path / "sps.json"
    cli.main(["profile-sps", "--target", str(root / "target"), "--batch", "2", "--block-size", "3", "--out", str(profile)])
    capsys.readouterr()
    for scheduler in ("algorithm1", "async", "threshold"):
        out = run_json(capsys, ["generate", "--target", str(root / "target"), "--draft", str(root / "draft"),
                                "--prompt-ids", "5,6,7", "--max-new-tokens", "9", "--num-samples", "2",
                                "--scheduler", scheduler, "--sps-profile", str(profile), "--json"])
        assert out["samples"] == [generate_ar(target, cfg, [[5, 6, 7]], max_new_tokens=9)[0]] * 2
        assert out["verification_budget_per_request"] <= 4


def test_eval_prints_table_and_json_and_writes_png_figures(model_dirs, tmp_path, capsys):
    root, target, cfg = model_dirs
    prompts = tmp_path / "gsm8k.jsonl"
    prompts.write_text("\n".join(json.dumps({"turns": [t]}) for t in ["def f(x):", "the quick brown", "return x + 1"]))
    out_dir = tmp_path / "figs"
    argv = ["eval", "--target", str(root / "target"), "--draft", str(root / "draft"), "--prompts", str(prompts),
            "held-out-prose", "--num-prompts", "3", "--max-new-tokens", "16", "--out", str(out_dir)]
    cli.main(argv)
    table = capsys.readouterr().out
    assert "tau" in table and "gsm8k" in table and "held-out-prose" in table and "ECE" in table
    for name in ("acceptance_by_position.png", "confidence_reliability.png"):
        data = (out_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    out = run_json(capsys, argv + ["--json"])
    results = {r["domain"]: r for r in out["results"]}
    assert set(results) == {"gsm8k", "held-out-prose"}
    r = results["gsm8k"]
    assert r["rounds"] > 0 and r["tau"] >= 1.0 and len(r["accept_rate_by_position"]) == 3
    assert r["prompts"] == 3 and r["tau_ci95"][0] <= r["tau"] <= r["tau_ci95"][1]
    assert out["tau_ratios"] == []  # one drafter: nothing to compare
    assert all(x["n"] > 0 for x in r["reliability"][:1])


def test_train_draft_regenerates_trains_exports_and_resumes(model_dirs, tmp_path, capsys):
    from dspark_jax.checkpoint import load_draft, load_drafter, load_qwen3

    root, _, _ = model_dirs
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"text": t}) for t in ["def f(x):", "the quick", "return x", "brown fox"] * 2))
    out = tmp_path / "run"
    argv = ["train-draft", "--target", str(root / "target"), "--out", str(out), "--prompts", str(prompts),
            "--num-prompts", "8", "--answer-tokens", "12", "--seq-len", "24", "--batch-size", "4", "--layers", "1",
            "--block-size", "3", "--markov-rank", "8", "--num-anchors", "4", "--save-every", "2", "--log-every", "1",
            "--no-progress", "--target-layer-ids", "0,1", "--regen-temperature", "1", "0"]
    cli.main(argv + ["--steps", "3"])
    target, tcfg = load_qwen3(root / "target")
    # a run's work directory loads as a drafter: its latest checkpoint, here step 3
    at_step_3, cfg_3 = load_drafter(out, target, tcfg)
    cli.main(argv + ["--steps", "5"])
    printed = capsys.readouterr().out
    assert "resuming from step 3" in printed
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    draft, dcfg = load_draft(out / "draft", target, tcfg)
    assert dcfg.block_size == 3 and dcfg.markov_rank == 8 and dcfg.target_layer_ids == (0, 1)
    assert cfg_3 == dcfg
    at_step_5, _ = load_drafter(out, target, tcfg)
    for exported, restored in zip(jax.tree.leaves(draft), jax.tree.leaves(at_step_5)):
        np.testing.assert_array_equal(np.asarray(exported), np.asarray(restored))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(at_step_5), jax.tree.leaves(at_step_3)))
    manifest = json.loads((out / "draft" / "manifest.json").read_text())
    assert manifest["steps"] == 5 and "train-draft" in manifest["recipe"]
    # two temperatures split the prompts: the first half sampled at T=1, the second half greedy
    assert "4 answers of 12 tokens with the target at temperature 1.0" in printed
    assert "4 answers of 12 tokens with the target at temperature 0.0" in printed
    data = np.load(out / "regenerated.npz")
    matches_greedy = []
    for tokens, mask in zip(data["tokens"], data["loss_mask"]):
        start = int(np.argmax(mask))
        answer = tokens[mask == 1].tolist()
        greedy = generate_ar(target, tcfg, [tokens[:start].tolist()], max_new_tokens=len(answer))[0]
        matches_greedy.append(list(greedy) == answer)
    assert matches_greedy[4:] == [True] * 4 and not all(matches_greedy[:4])


def test_compare_ar_reports_speedup_and_identical_greedy_output(model_dirs, capsys):
    root, _, _ = model_dirs
    out = run_json(capsys, ["generate", "--target", str(root / "target"), "--draft", str(root / "draft"),
                            "--prompt-ids", "5,6,7", "--max-new-tokens", "9", "--compare-ar", "--repeats", "3", "--json"])
    assert out["matches_ar"] is True
    spec_t, ar_t = out["timed_seconds"], out["ar_timed_seconds"]
    assert len(spec_t) == len(ar_t) == 3
    # tokens/s from the median timed call; the speedup is the median of the back-to-back ratios
    assert out["tokens_per_second"] == pytest.approx(9 / sorted(spec_t)[1])
    assert out["ar_tokens_per_second"] == pytest.approx(9 / sorted(ar_t)[1])
    assert out["speedup_over_ar"] == pytest.approx(sorted(a / s for s, a in zip(spec_t, ar_t))[1])


def test_generate_without_a_target_names_the_missing_embedded_checkpoint(monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "EMBEDDED_DIR", str(tmp_path / "checkpoints"))
    with pytest.raises(SystemExit, match="no --target given, and no embedded target checkpoint"):
        cli.main(["generate", "--prompt-ids", "1,2", "--json"])


def test_training_seconds_counts_each_step_once_across_resumed_runs(tmp_path):
    from dspark_jax.recipes import _training_seconds

    rows = [{"step": 10, "seconds_per_step": 1.0}, {"step": 20, "seconds_per_step": 2.0, "eval_loss": 3.0},
            {"step": 30, "seconds_per_step": 9.0},  # logged, then interrupted before a checkpoint at 30
            {"step": 30, "seconds_per_step": 3.0}, {"step": 40, "seconds_per_step": 1.0}]  # resumed from 20
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert _training_seconds(str(tmp_path)) == pytest.approx(10 * 1.0 + 10 * 2.0 + 10 * 3.0 + 10 * 1.0)
    assert _training_seconds(str(tmp_path / "missing")) == 0.0


def test_eval_labels_drafters_by_directory_name_or_enough_of_their_paths():
    assert cli.drafter_names(["checkpoints/dspark", "checkpoints/dflash/"]) == ["dspark", "dflash"]
    assert cli.drafter_names(["runs/dspark-v3/draft", "runs/dflash-v3/draft"]) == ["dspark-v3/draft", "dflash-v3/draft"]
    with pytest.raises(SystemExit, match="given twice"):
        cli.drafter_names(["runs/a/draft", "runs/a/draft/"])


@pytest.mark.parametrize("extra, message", [
    (["--prose-fraction", "0.3"], "--prose-fraction applies to --prompts stdlib only"),
    (["--prompts", "stdlib", "--prose-fraction", "1.5"], r"--prose-fraction must be in \[0, 1\], got 1.5"),
    (["--regen-temperature", "1", "-0.5"], "--regen-temperature values must be >= 0"),
])
def test_train_draft_names_bad_data_options_before_loading_anything(tmp_path, extra, message):
    argv = ["train-draft", "--target", str(tmp_path / "missing"), "--out", str(tmp_path / "run"),
            "--prompts", str(tmp_path / "p.jsonl")]
    with pytest.raises(SystemExit, match=message):
        cli.main(argv + extra)
