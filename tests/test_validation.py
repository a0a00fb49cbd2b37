"""Bad input never yields a silent wrong answer: every class of issue 15, through the command line.

Usage errors exit 2, unusable files or arrays exit 1, each with one ``error: ...`` line naming the
option, file or tensor; nothing is loaded, compiled or overwritten first. The training cases that
need real processes (kill -9 and resume, two runs into one directory, SIGTERM) run the CLI as a
subprocess on a tiny target.
"""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax import cli
from dspark_jax import draft as draft_model
from dspark_jax import target as target_model
from dspark_jax.checkpoint import save_draft, save_qwen3
from dspark_jax.config import Qwen3Config
from dspark_jax.schedule import Calibration, check_sts_fit
from dspark_jax.validate import DataError, UsageError, json_safe, strict_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = Qwen3Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=512)


def random_params(init, cfg, seed=0):
    """Random weights (normal, std 0.3) in ``init``'s structure, drawn with numpy: eager jax
    initialisers compile one program per op, seconds on CPU for a model this small."""
    rng = np.random.default_rng(seed)
    abstract = jax.eval_shape(lambda: init(jax.random.key(0), cfg))
    return jax.tree.map(lambda a: jnp.asarray(rng.normal(0.0, 0.3, a.shape), a.dtype), abstract)


def _tokenizer(path, vocab=300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def f(x):\n    return x + 1\n" * 20, "the quick brown fox jumps over the lazy dog"], trainer)
    tok.save(str(path))


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation")
    target = random_params(target_model.init_params, CFG)
    dcfg = draft_model.DraftConfig(layers=dataclasses.replace(CFG, num_hidden_layers=1), block_size=3,
                                   target_layer_ids=(0, 1), mask_token_id=299, markov_rank=8,
                                   enable_confidence_head=True)
    save_qwen3(root / "target", target, CFG)
    save_draft(root / "draft", random_params(draft_model.init_draft_params, dcfg, 1), dcfg, target)
    (root / "draft" / "manifest.json").write_text(json.dumps({"config": dcfg.to_hf()}))  # as train-draft writes it
    _tokenizer(root / "target" / "tokenizer.json")
    prompts = root / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"text": t}) for t in ["def f(x):", "the quick", "return x", "brown"] * 2))
    return root


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def fails(capsys, argv, status):
    """Run the CLI; it must exit ``status`` with exactly one ``error:`` line on stderr."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == status, (e.value.code, err)
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def gen(dirs, *extra, draft=True):
    argv = ["generate", "--target", str(dirs / "target"), "--prompt-ids", "5,6,7", "--max-new-tokens", "4",
            "--no-warmup", "--json"]
    return argv + (["--draft", str(dirs / "draft")] if draft else []) + list(extra)


# ---------------------------------------------------------------------------- 1. non-finite values


@pytest.mark.parametrize("extra, message", [
    (["--temperature", "nan"], "--temperature must be a finite number, got nan"),
    (["--temperature", "inf"], "--temperature must be a finite number, got inf"),
    (["--top-p", "nan"], "--top-p must be a finite number"),
    (["--confidence-threshold", "inf"], "--confidence-threshold must be a finite number"),
    (["--temperature", "-1"], "--temperature must be >= 0, got -1.0"),
])
def test_non_finite_or_out_of_range_sampling_options_are_usage_errors(dirs, capsys, extra, message):
    assert message in fails(capsys, gen(dirs, *extra), 2)


def test_non_finite_weights_are_found_at_load_and_the_tensor_named(dirs, tmp_path, capsys):
    target = random_params(target_model.init_params, CFG)
    for name, params, tensor in [
        ("nan", dataclasses.replace(target, final_norm=target.final_norm.at[3].set(jnp.nan)), "model.norm.weight"),
        ("inf", dataclasses.replace(target, embed=target.embed.at[7, 1].set(jnp.inf)), "model.embed_tokens.weight"),
    ]:
        save_qwen3(tmp_path / name, params, CFG)
        err = fails(capsys, ["generate", "--target", str(tmp_path / name), "--prompt-ids", "5", "--json"], 1)
        assert f"tensor '{tensor}'" in err and str(tmp_path / name) in err


@pytest.mark.parametrize("extra, message", [
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--lr", "0"], "--lr must be > 0, got 0.0"),
    (["--warmup", "1.5"], "--warmup must be in [0, 1], got 1.5"),
    (["--clip-norm", "inf"], "--clip-norm must be a finite number"),
])
def test_non_finite_training_hyperparameters_fail_before_anything_loads(tmp_path, capsys, extra, message):
    argv = ["train-draft", "--target", str(tmp_path / "missing"), "--out", str(tmp_path / "run"), *extra]
    assert message in fails(capsys, argv, 2)
    assert not (tmp_path / "run").exists()


def test_a_non_finite_loss_stops_training_without_saving_over_the_last_good_checkpoint(tmp_path):
    from dspark_jax.trainer import Diverged, checkpoint_manager, restore_checkpoint, run_training

    class Batches:
        def batch(self, t):
            return {"x": np.ones(2, np.float32)}

    def step_fn(state, batch, key):  # finite for 3 steps, then the loss and the weights turn NaN
        w = jnp.where(state["t"] >= 3, jnp.nan, state["w"] + 1.0)
        return {"w": w, "t": state["t"] + 1}, {"loss": jnp.sum(w)}

    state = {"w": jnp.zeros(2), "t": jnp.int32(0)}
    with pytest.raises(Diverged, match=r"loss is nan at step 4: .* last good checkpoint \(step 2\)"):
        run_training(state=state, step_fn=step_fn, batches=Batches(), total_steps=10, workdir=str(tmp_path),
                     meta={}, save_every=2, log_every=1, progress=False)
    manager = checkpoint_manager(str(tmp_path / "checkpoints"))
    assert manager.latest_step() == 2
    restored, _ = restore_checkpoint(manager, jax.eval_shape(lambda: state))
    np.testing.assert_array_equal(restored["w"], [2.0, 2.0])
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # the NaN row is not logged


# ---------------------------------------------------------------------------- 2. zero / negative counts


@pytest.mark.parametrize("command, extra, message", [
    ("generate", ["--block-size", "0"], "--block-size must be >= 1, got 0"),
    ("generate", ["--tensor-parallel", "0"], "--tensor-parallel must be >= 1, got 0"),
    ("generate", ["--tensor-parallel", "-2"], "--tensor-parallel must be >= 1, got -2"),
    ("generate", ["--data-parallel", "-1"], "--data-parallel must be >= 1, got -1"),
    ("generate", ["--repeats", "0"], "--repeats must be >= 1, got 0"),
    ("generate", ["--num-samples", "0"], "--num-samples must be >= 1, got 0"),
    ("eval", ["--num-prompts", "0"], "--num-prompts must be >= 1, got 0"),
    ("eval", ["--num-prompts", "-1"], "--num-prompts must be >= 1, got -1"),
    ("eval", ["--block-size", "0"], "--block-size must be >= 1, got 0"),
    ("profile-sps", ["--block-size", "0"], "--block-size must be >= 1, got 0"),
    ("profile-sps", ["--batch", "0"], "--batch must be >= 1, got 0"),
    ("train-draft", ["--steps", "0"], "--steps must be >= 1, got 0"),
    ("train-draft", ["--steps", "-1"], "--steps must be >= 1, got -1"),
    ("train-target", ["--save-every", "0"], "--save-every must be >= 1, got 0"),
    ("calibrate", ["--num-prompts", "0"], "--num-prompts must be >= 1, got 0"),
])
def test_zero_and_negative_counts_are_usage_errors_not_defaults(dirs, tmp_path, capsys, command, extra, message):
    base = {
        "generate": gen(dirs),
        "eval": ["eval", "--target", str(dirs / "target"), "--draft", str(dirs / "draft"), "--out", str(tmp_path / "e")],
        "profile-sps": ["profile-sps", "--target", str(dirs / "target"), "--out", str(tmp_path / "p.json")],
        "train-draft": ["train-draft", "--target", str(dirs / "target"), "--out", str(tmp_path / "run")],
        "train-target": ["train-target", "--out", str(tmp_path / "run")],
        "calibrate": ["calibrate", "--target", str(dirs / "target"), "--draft", str(dirs / "draft")],
    }[command]
    assert message in fails(capsys, base + extra, 2)
    assert not (tmp_path / "run").exists() and not (tmp_path / "p.json").exists()


# ---------------------------------------------------------------------------- 3. limits


def test_requests_past_the_context_or_memory_fail_with_the_numbers(dirs, capsys):
    err = fails(capsys, gen(dirs, "--max-new-tokens", "1000000000", draft=False), 1)
    assert "3 tokens + max_new_tokens 1000000000 = 1000000003 positions exceeds the model's context of 512" in err
    err = fails(capsys, gen(dirs, "--max-new-tokens", "1000000000", "--allow-long-context", draft=False), 1)
    assert "the KV cache needs" in err and "GiB" in err
    assert "--cache-len 5 is shorter" in fails(capsys, gen(dirs, "--cache-len", "5", draft=False), 2)


def test_ids_past_a_smaller_tokenizer_are_reported_not_dropped_silently(dirs, tmp_path, capsys):
    big = dataclasses.replace(CFG, vocab_size=400)  # the tokenizer has 300 tokens
    save_qwen3(tmp_path / "big", random_params(target_model.init_params, big), big)
    shutil.copy(dirs / "target" / "tokenizer.json", tmp_path / "big")
    cli.main(["generate", "--target", str(tmp_path / "big"), "--prompt", "def f", "--max-new-tokens", "4",
              "--no-warmup", "--json"])
    captured = capsys.readouterr()
    samples = json.loads(captured.out)["samples"]
    past = sorted({t for s in samples for t in s if t >= 300})
    assert past, "the case needs a generated id the tokenizer lacks"
    warnings = [l for l in captured.err.splitlines() if l.startswith("warning: ")]
    assert len(warnings) == 1 and f"generated id(s) {past[:5]} have no token" in warnings[0]


# ---------------------------------------------------------------------------- 4. calibration


def test_calibrate_refuses_too_few_rounds_and_keeps_the_old_file(dirs, tmp_path, capsys):
    draft = copy(dirs / "draft", tmp_path / "draft")
    good = json.dumps({"temperatures": [1.5, 1.2, 0.9], "report": {"rounds": 4000}})
    (draft / "sts_calibration.json").write_text(good)
    argv = ["calibrate", "--target", str(dirs / "target"), "--draft", str(draft), "--prompts", str(dirs / "p.jsonl")]
    err = fails(capsys, argv + ["--num-prompts", "2", "--max-new-tokens", "2"], 2)  # known before decoding
    assert "--num-prompts 2 x --max-new-tokens 2 records at most 4 rounds, fewer than --min-rounds 32" in err
    assert (draft / "sts_calibration.json").read_text() == good
    assert sorted(os.listdir(draft)) == ["config.json", "manifest.json", "model.safetensors", "sts_calibration.json"]


def test_calibrate_refuses_a_drafter_without_confidence_head_before_loading(dirs, tmp_path, capsys):
    draft = copy(dirs / "draft", tmp_path / "draft")
    config = json.loads((draft / "config.json").read_text())
    (draft / "config.json").write_text(json.dumps({**config, "enable_confidence_head": False}))
    (draft / "manifest.json").unlink()  # it records the confidence head this drafter was trained with
    (draft / "model.safetensors").write_bytes(b"not a safetensors file")  # never read: the config decides
    argv = ["calibrate", "--target", str(dirs / "target"), "--draft", str(draft), "--prompts", str(dirs / "p.jsonl")]
    err = fails(capsys, argv, 2)
    assert f"{draft}: the drafter has no confidence head to calibrate" in err
    assert not (draft / "sts_calibration.json").exists()


def test_degenerate_sts_fits_are_refused():
    rng = np.random.default_rng(0)
    with pytest.raises(DataError, match="at least 32 rounds"):
        check_sts_fit(Calibration(np.ones(3)), np.zeros(8, int))
    with pytest.raises(DataError, match=r"undefined at draft position 1: 64 of 64 rounds accepted it"):
        check_sts_fit(Calibration(np.ones(3)), np.full(64, 3))
    with pytest.raises(DataError, match=r"undefined at draft position 3: 0 of 64"):
        check_sts_fit(Calibration(np.ones(3)), rng.integers(0, 3, 64))
    varied = rng.integers(0, 4, 64)
    with pytest.raises(DataError, match=r"degenerate at draft position 2: temperature 20"):
        check_sts_fit(Calibration(np.array([1.0, 20.0, 1.0])), varied)
    check_sts_fit(Calibration(np.array([1.3, 0.7, 2.0])), varied)  # a usable fit passes


def test_calibration_is_written_atomically_to_a_chosen_file(tmp_path):
    cal = Calibration(np.array([1.5, 0.5], np.float32), {"auroc": float("nan")})
    cal.save(tmp_path / "mine.json")
    cal.save(tmp_path / "dir")
    for path in (tmp_path / "mine.json", tmp_path / "dir" / Calibration.FILENAME):
        saved = json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
        assert saved == {"temperatures": [1.5, 0.5], "report": {"auroc": None}}
    assert sorted(os.listdir(tmp_path)) == ["dir", "mine.json"]  # no temporary file left


# ---------------------------------------------------------------------------- 5. training runs (real processes)


def test_training_workdir_lock_and_metrics_after_the_restored_step(tmp_path):
    from dspark_jax.trainer import WorkdirLocked, drop_metrics_after, workdir_lock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(f"{dead.pid}\n")
    with workdir_lock(str(tmp_path)):  # a dead process's lock is taken over
        assert (tmp_path / ".lock").read_text().split()[0] == str(os.getpid())
    assert not (tmp_path / ".lock").exists()
    (tmp_path / ".lock").write_text(f"{os.getppid()}\n")  # a live process holds it
    with pytest.raises(WorkdirLocked, match=f"another run \\(pid {os.getppid()}\\) is training here"):
        with workdir_lock(str(tmp_path)):
            pass
    rows = [{"step": s, "loss": 1.0} for s in (1, 2, 3, 4, 5)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"step": 6, "lo')  # the kill cut the last line
    drop_metrics_after(str(path), 3)
    assert [json.loads(l)["step"] for l in path.read_text().splitlines()] == [1, 2, 3]


def _rows(path):
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass
    return steps


def _latest_checkpoint(workdir):
    d = workdir / "checkpoints"
    return max((int(n) for n in os.listdir(d) if n.isdigit()), default=None) if d.is_dir() else None


def _wait_for(condition, proc, timeout=120):
    t0 = time.time()
    while not condition():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.02)


def test_kill_9_resume_concurrent_run_and_sigterm_leave_an_honest_run(dirs, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(("def f(x):\n    return x + 1\n" * 50 + "the quick brown fox\n") * 4)
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "dspark_jax.cli", "train-target", "--out", str(out), "--corpus", str(corpus),
            "--tokenizer", str(dirs / "target" / "tokenizer.json"), "--layers", "1", "--hidden", "32", "--heads", "4",
            "--kv-heads", "2", "--head-dim", "8", "--intermediate", "64", "--seq-len", "16", "--batch-size", "2",
            "--steps", "100000", "--save-every", "50", "--log-every", "1", "--no-progress"]
    # the runs share one persistent compilation cache: the resumed run does not compile again
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    popen = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    metrics = out / "metrics.jsonl"

    first = subprocess.Popen(argv, **popen)
    _wait_for(lambda: _latest_checkpoint(out) is not None
              and _latest_checkpoint(out) + 5 <= max(_rows(metrics), default=0) < _latest_checkpoint(out) + 40, first)
    # a second run into the same directory fails at once, before preparing data or compiling
    second = subprocess.run(argv, timeout=120, **popen)
    assert second.returncode == 1 and f"another run (pid {first.pid}) is training here" in second.stderr
    assert "target 1L" not in second.stdout

    first.kill()  # kill -9: no checkpoint for the steps after the last one, the lock left behind
    first.wait()
    killed_at, restored = max(_rows(metrics)), _latest_checkpoint(out)
    assert killed_at > restored and (out / ".lock").exists()

    third = subprocess.Popen(argv, **popen)
    _wait_for(lambda: len(_rows(metrics)) > restored + 5 and max(_rows(metrics)) > killed_at, third)
    third.send_signal(signal.SIGTERM)
    stdout, stderr = third.communicate(timeout=120)
    assert third.returncode == 128 + signal.SIGTERM, stderr
    assert "taking over the stale lock" in stdout and f"resuming from step {restored}" in stdout
    stopped = max(_rows(metrics))
    assert f"error: stopped by SIGTERM at step {stopped}; checkpoint saved" in stderr
    assert _rows(metrics) == list(range(1, stopped + 1))  # every step once, none past the checkpoint
    assert _latest_checkpoint(out) == stopped
    assert not (out / "model").exists() and not (out / ".lock").exists()  # not finished: nothing exported


def test_training_out_that_is_a_file_or_inside_one_fails_before_any_work(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "run"):
        err = fails(capsys, ["train-target", "--out", str(out), "--steps", "2"], 2)
        assert f"--out {out}" in err and ("not a directory" in err or "is a file" in err)
    assert "--kv-heads 3 must divide --heads 4" in fails(
        capsys, ["train-target", "--out", str(tmp_path / "r"), "--heads", "4", "--kv-heads", "3"], 2)
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------------- 6. named errors, not tracebacks


def test_damaged_files_are_named_errors(dirs, tmp_path, capsys):
    trunc = copy(dirs / "target", tmp_path / "trunc")
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    garbage = copy(dirs / "target", tmp_path / "garbage")
    (garbage / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    badtok = copy(dirs / "target", tmp_path / "badtok")
    (badtok / "tokenizer.json").write_text("{not json")
    for model, message in [(trunc, "file ends inside tensor"), (garbage, "not a safetensors file"),
                           (badtok, "not a readable tokenizer.json")]:
        err = fails(capsys, ["generate", "--target", str(model), "--prompt", "def", "--json"], 1)
        assert message in err and str(model) in err
    with pytest.raises(Exception) as e:  # --debug: the traceback, for a bug report
        cli.main(["generate", "--target", str(badtok), "--prompt", "def", "--debug"])
    assert not isinstance(e.value, SystemExit)


def test_bad_sps_profiles_and_calibrations_are_named(dirs, tmp_path, capsys):
    profiles = {"notable": {"measured": [1, 2]}, "empty": {"table": [], "measured": []},
                "nan": {"table": [float("nan")] * 20}, "zero": {"table": [0.0] * 20}, "list": [1, 2]}
    for name, body in profiles.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(body))
    (tmp_path / "broken.json").write_text("{")
    for name, message in [("notable", "no 'table'"), ("empty", "table has 0 entries"),
                          ("nan", "table[0] = nan"), ("zero", "table[0] = 0.0"), ("list", "no 'table'"),
                          ("broken", "SPS profile is not valid JSON"), ("missing", "SPS profile not found")]:
        err = fails(capsys, gen(dirs, "--scheduler", "algorithm1", "--sps-profile", str(tmp_path / f"{name}.json")), 1)
        assert message in err and f"{name}.json" in err
    for i, (body, message) in enumerate([("{oops", "STS calibration is not valid JSON"),
                                         ('{"temperatures": [2.0]}', "1 temperatures for a drafter of block_size 3"),
                                         ('{"temperatures": [1.0, NaN, 1.0]}', "temperatures[1] = nan"),
                                         ('{"temperatures": [1.0, -1.0, 1.0]}', "temperatures[1] = -1.0"),
                                         ('{"report": {}}', "temperatures must be a list of numbers")]):
        draft = copy(dirs / "draft", tmp_path / f"cal{i}")
        (draft / "sts_calibration.json").write_text(body)
        err = fails(capsys, gen(dirs, "--draft", str(draft), draft=False), 1)
        assert message in err and str(draft / "sts_calibration.json") in err


# ---------------------------------------------------------------------------- 7. silent substitutions


def test_a_drafter_config_edited_away_from_its_training_is_an_error(dirs, tmp_path, capsys):
    for field, value in [("block_size", 2), ("target_layer_ids", [0]), ("markov_rank", 4)]:
        draft = copy(dirs / "draft", tmp_path / field)
        config = json.loads((draft / "config.json").read_text())
        trained = config[field]
        (draft / "config.json").write_text(json.dumps({**config, field: value}))
        err = fails(capsys, gen(dirs, "--draft", str(draft), draft=False), 1)
        assert f"config.json: {field} {value!r} differs from {trained!r}, the value the drafter was trained with" in err


def test_sps_profile_for_a_scheduler_that_ignores_it_is_a_warning(dirs, capsys):
    args = cli.build_parser().parse_args(gen(dirs, "--scheduler", "threshold", "--sps-profile", "x.json"))
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli.check_args(args)
    assert [str(w.message) for w in caught] == [
        "--sps-profile is read by --scheduler algorithm1 or async only; ignored with --scheduler threshold"]


def test_eval_json_is_strict_json_with_null_for_undefined_numbers(dirs, tmp_path, capsys, monkeypatch):
    from dspark_jax import evaluate

    def fake_evaluation(target, tcfg, draft, dcfg, prompts, *, name, domain, **kw):
        # every round accepted its first draft: AUROC and the ratio of an empty position are undefined
        return evaluate.DomainResult(name, domain, 4, 2.0, [1.0, None, None], [4, 4, 0], [[0.9] * 4, [], []],
                                     [[True] * 4, [], []], rounds_per_prompt=[2, 2], accepted_per_prompt=[2, 2])

    monkeypatch.setattr(evaluate, "evaluate_drafter", fake_evaluation)
    cli.main(["eval", "--target", str(dirs / "target"), "--draft", str(dirs / "draft"), "--prompts",
              str(dirs / "p.jsonl"), "--num-prompts", "2", "--out", str(tmp_path / "figs"), "--json"])
    out = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"bare {c} in eval --json"))
    assert out["results"][0]["reliability"][0] == {"n": 4, "ece": pytest.approx(0.1), "auroc": None}
    assert strict_json({"a": float("inf"), "b": [np.float32("nan"), 1.5]}) == '{"a": null, "b": [null, 1.5]}'
    assert json_safe((1.0, float("-inf"))) == [1.0, None]


def test_usage_errors_exit_2_and_data_errors_exit_1():
    assert cli.exit_status(UsageError("x")) == 2
    assert cli.exit_status(DataError("x")) == 1 and cli.exit_status(FileNotFoundError("x")) == 1
    assert cli.exit_status(KeyError("a bug")) is None  # a bug keeps its traceback
