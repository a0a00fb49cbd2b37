"""The command line on a Gemma 4 target: ``train-draft`` trains a DSpark drafter online against
the frozen fixture target and exports it in DeepSpec's ``Gemma4DSparkModel`` layout; the
exported pair then runs ``generate`` (greedy speculative == greedy ar), ``eval`` and
``calibrate``. The target is the DeepSpec fixture's (``../shared/fixtures/deepspec_gemma4_vanilla``)
with a byte-level tokenizer of its vocabulary size beside it. ``calibrate``'s STS fit needs
confidences that track acceptance, which a few training steps do not give: it runs on a
near-bigram Gemma 4 target and its oracle drafter (``spec_models``), whose drafts are partly
accepted and whose confidence head ranks them (overconfidently)."""

from __future__ import annotations

import json
import shutil

import pytest

import numpy as np

from dspark_jax import cli, gemma4, schedule
from dspark_jax.checkpoint import load_draft, load_target, save_draft
from dspark_jax.decoding import generate_ar
from fixtures import require_fixture

FIXTURE = "deepspec_gemma4_vanilla"
PROMPT_IDS = [5, 6, 7, 8]


def byte_level_tokenizer(vocab_size: int, path):
    """A byte-level BPE ``tokenizer.json`` of exactly ``vocab_size`` entries (the 256 bytes, then merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def f(x):\n    return x + 1\n" * 20, "the quick brown fox jumps over the lazy dog"], trainer)
    assert tok.get_vocab_size() == vocab_size
    tok.save(str(path))


def target_with_prompts(target_src, root):
    """A copy of a Gemma 4 target directory under ``root`` with a byte-level tokenizer of its
    vocabulary beside it, and a four-line prompts file: (target dir, prompts path)."""
    target_dir = root / "target"
    shutil.copytree(target_src, target_dir)
    _, tcfg = load_target(target_dir, "float32")
    byte_level_tokenizer(tcfg.vocab_size, target_dir / "tokenizer.json")
    prompts = root / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"text": t}) for t in ["def f(x):", "the quick", "return x", "brown fox"]))
    return target_dir, prompts


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(target dir, the train-draft work dir, the fixture dir) after a 3-step train-draft run."""
    fixture = require_fixture(FIXTURE, "target/config.json", "target/model.safetensors", "draft/keys.json")
    root = tmp_path_factory.mktemp("gemma4_cli")
    target_dir, prompts = target_with_prompts(fixture / "target", root)
    out = root / "run"
    # the fixture drafter's shape: 3 layers (1 and 2 double-wide), Markov rank 16, confidence head
    cli.main(["train-draft", "--target", str(target_dir), "--out", str(out), "--prompts", str(prompts),
              "--num-prompts", "4", "--answer-tokens", "8", "--seq-len", "20", "--batch-size", "2", "--layers", "3",
              "--block-size", "5", "--markov-rank", "16", "--num-anchors", "4", "--log-every", "1", "--no-progress",
              "--target-layer-ids=-1,2,4", "--steps", "3"])
    return target_dir, out, fixture


def run_json(capsys, argv):
    capsys.readouterr()
    cli.main(argv)
    return json.loads(capsys.readouterr().out)


def test_train_draft_on_gemma4_exports_deepspecs_gemma4_dspark_layout(trained):
    target_dir, out, fixture = trained
    exported = json.loads((out / "draft" / "config.json").read_text())
    reference = json.loads((fixture / "draft" / "config.json").read_text())
    assert exported["architectures"] == ["Gemma4DSparkModel"]
    same = ("model_type", "layer_types", "num_hidden_layers", "head_dim", "global_head_dim", "num_key_value_heads",
            "num_global_key_value_heads", "attention_k_eq_v", "num_kv_shared_layers", "use_double_wide_mlp",
            "intermediate_size", "final_logit_softcapping", "tie_word_embeddings", "target_model_type",
            "target_text_model_type", "target_layer_ids", "num_target_layers", "block_size", "markov_rank")
    assert {k: exported[k] for k in same} == {k: reference[k] for k in same}
    for kind in (gemma4.SLIDING, gemma4.FULL):
        assert exported["rope_parameters"][kind] == reference["rope_parameters"][kind]
    from safetensors import safe_open

    with safe_open(str(out / "draft" / "model.safetensors"), "np") as f:
        shapes = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
    reference_shapes = {t["name"]: t["shape"] for t in json.loads((fixture / "draft" / "keys.json").read_text())["tensors"]}
    assert shapes == reference_shapes


def test_train_draft_on_gemma4_reloads_and_decodes_greedy_equal_to_ar(trained, capsys):
    target_dir, out, _ = trained
    target, tcfg = load_target(target_dir, "float32")
    draft, dcfg = load_draft(out / "draft", target, tcfg)
    assert dcfg.is_gemma4 and [s.mlp_width for s in gemma4.draft_layer_specs(dcfg.layers)] == [48, 96, 96]
    ar = generate_ar(target, tcfg, [PROMPT_IDS], max_new_tokens=12)[0]
    spec = run_json(capsys, ["generate", "--target", str(target_dir), "--draft", str(out / "draft"), "--prompt-ids",
                             ",".join(map(str, PROMPT_IDS)), "--max-new-tokens", "12", "--num-samples", "2", "--json"])
    assert spec["mode"] == "speculative" and spec["samples"] == [ar, ar]
    tp = run_json(capsys, ["generate", "--target", str(target_dir), "--draft", str(out / "draft"), "--prompt-ids",
                           ",".join(map(str, PROMPT_IDS)), "--max-new-tokens", "12", "--num-samples", "2",
                           "--tensor-parallel", "2", "--json"])
    assert tp["samples"] == [ar, ar]
    plain = run_json(capsys, ["generate", "--mode", "ar", "--target", str(target_dir), "--prompt", "def f(x):",
                              "--max-new-tokens", "6", "--json"])
    assert plain["samples"] == generate_ar(target, tcfg, [plain["prompt_ids"]], max_new_tokens=6)
    assert isinstance(plain["texts"][0], str)


def test_eval_on_a_gemma4_pair_reports_acceptance_per_domain(trained, tmp_path, capsys):
    target_dir, out, _ = trained
    prompts = tmp_path / "code.jsonl"
    prompts.write_text("\n".join(json.dumps({"turns": [t]}) for t in ["def f(x):", "the quick brown"]))
    res = run_json(capsys, ["eval", "--target", str(target_dir), "--draft", str(out / "draft"), "--prompts",
                            str(prompts), "--num-prompts", "2", "--max-new-tokens", "10", "--out", str(tmp_path / "figs"),
                            "--json"])
    (r,) = res["results"]
    assert r["domain"] == "code" and r["prompts"] == 2 and r["rounds"] > 0
    assert r["tau"] >= 1.0 and len(r["accept_rate_by_position"]) == 5
    assert (tmp_path / "figs" / "acceptance_by_position.png").read_bytes()[:4] == b"\x89PNG"


def test_calibrate_on_a_gemma4_pair_records_rounds_with_every_draft_verified(trained, capsys):
    # a 3-step drafter's confidences do not track acceptance (its STS fit would be refused as
    # degenerate), so the run stops at the round count, what it recorded on the Gemma pair: the
    # first of the 16 tokens comes from the prefill, so 4 prompts make at most 60 rounds
    target_dir, out, _ = trained
    with pytest.raises(SystemExit, match=r"STS needs at least 64 rounds with all drafts offered, got [1-9]\d*;"):
        cli.main(["calibrate", "--target", str(target_dir), "--draft", str(out / "draft"), "--prompts", "train",
                  "--num-prompts", "4", "--temperature", "1", "--max-new-tokens", "16", "--min-rounds", "64",
                  "--out", str(out / "cal")])
    assert not (out / "cal" / "sts_calibration.json").exists()


def test_train_draft_dflash_with_precomputed_gemma4_features_decodes_greedy_equal_to_ar(trained, tmp_path, capsys):
    target_dir, _, _ = trained
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"text": t}) for t in ["def f(x):", "the quick"]))
    out = tmp_path / "dflash"
    cli.main(["train-draft", "--target", str(target_dir), "--out", str(out), "--prompts", str(prompts),
              "--num-prompts", "2", "--answer-tokens", "6", "--seq-len", "16", "--batch-size", "2", "--layers", "1",
              "--block-size", "3", "--head", "none", "--num-anchors", "2", "--precompute", "--no-progress",
              "--steps", "1"])
    target, tcfg = load_target(target_dir, "float32")
    draft, dcfg = load_draft(out / "draft", target, tcfg)
    assert dcfg.head_type == "none" and draft.markov is None and dcfg.layers.num_hidden_layers == 1
    ar = generate_ar(target, tcfg, [PROMPT_IDS], max_new_tokens=10)[0]
    spec = run_json(capsys, ["generate", "--target", str(target_dir), "--draft", str(out / "draft"), "--prompt-ids",
                             ",".join(map(str, PROMPT_IDS)), "--max-new-tokens", "10", "--json"])
    assert spec["samples"] == [ar]


def save_gemma4_text(path, params, cfg):
    """A Gemma 4 text model in the layout dspark-jax loads: the text config as config.json,
    the text tensors under their checkpoint names (no vision / audio towers)."""
    from dspark_jax.params import export_tensors
    from dspark_jax.safetensors_io import save_tensors

    path.mkdir(parents=True)
    save_tensors(str(path), export_tensors(gemma4.target_decl(cfg), params))
    (path / "config.json").write_text(json.dumps(cfg.to_hf_text()))


@pytest.fixture(scope="module")
def near_bigram(tmp_path_factory):
    """(target dir, draft dir, target, config): the near-bigram Gemma 4 pair, saved."""
    from spec_models import gemma4_target_config, make_gemma4_draft, make_gemma4_target

    root = tmp_path_factory.mktemp("gemma4_sts")
    tcfg = gemma4_target_config()
    target = make_gemma4_target(tcfg, context=0.05)
    draft, dcfg = make_gemma4_draft(target, tcfg, block_size=4)
    save_gemma4_text(root / "target", target, tcfg)
    byte_level_tokenizer(tcfg.vocab_size, root / "target" / "tokenizer.json")
    save_draft(root / "draft", draft, dcfg, target)
    return root / "target", root / "draft", target, tcfg


def test_calibrate_fits_sts_on_a_gemma4_pair_and_algorithm1_with_it_stays_greedy_equal_to_ar(
        near_bigram, tmp_path, capsys, monkeypatch):
    target_dir, draft_dir, target, tcfg = near_bigram
    prompts = tmp_path / "p.jsonl"  # (cutting the stdlib corpus into prompts tokenizes all of it)
    prompts.write_text("\n".join(json.dumps({"text": f"def f{i}(x):\n    return x * {i} + {i * i}  # the quick brown fox"})
                                 for i in range(16)))
    cli.main(["calibrate", "--target", str(target_dir), "--draft", str(draft_dir), "--prompts", str(prompts),
              "--num-prompts", "16", "--temperature", "1", "--max-new-tokens", "32", "--min-rounds", "64"])
    assert "STS on" in capsys.readouterr().out
    saved = json.loads((draft_dir / "sts_calibration.json").read_text())
    temps, rep = np.asarray(saved["temperatures"]), saved["report"]
    # finite, inside the search range (check_sts_fit refuses a fit at its bounds), not all 1
    assert temps.shape == (4,) and np.all(np.isfinite(temps)) and np.all((0.05 < temps) & (temps < 20))
    assert np.any(np.abs(temps - 1) > 0.05)
    assert rep["rounds"] >= 64
    before, after = np.asarray(rep["ece_before"]), np.asarray(rep["ece_after"])
    assert np.all(after <= before + 1e-6) and after.mean() < before.mean()
    assert rep["auroc_before"][0] > 0.6  # the confidences rank the rounds: what makes the fit well posed

    # generate reads the drafter's sts_calibration.json; algorithm1 with it is lossless
    profile = tmp_path / "sps.json"
    schedule.linear_cost_profile(2 * 5).save(profile)
    loaded = []
    load = schedule.Calibration.load
    monkeypatch.setattr(schedule.Calibration, "load",
                        classmethod(lambda cls, *a, **kw: loaded.append(load(*a, **kw)) or loaded[-1]))
    capsys.readouterr()
    cli.main(["generate", "--target", str(target_dir), "--draft", str(draft_dir), "--prompt-ids",
              ",".join(map(str, PROMPT_IDS)), "--max-new-tokens", "16", "--num-samples", "2", "--scheduler",
              "algorithm1", "--sps-profile", str(profile), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert loaded and all(c.temperatures.tolist() == np.float32(temps).tolist() for c in loaded)
    ar = generate_ar(target, tcfg, [PROMPT_IDS], max_new_tokens=16)[0]
    assert out["samples"] == [ar, ar] and out["accepted_tokens"] > 0
