"""The embedded default pair in checkpoints/: small, bfloat16, re-runnable recipes, loads, decodes
losslessly, drives the main job, the eval command and the Colab quickstart notebook."""

import json
import os

import pytest
from safetensors import safe_open

from dspark_jax import cli
from dspark_jax.checkpoint import EMBEDDED_DIR, EMBEDDED_MODELS, embedded_path, load_drafter, load_target
from dspark_jax.data import prompts_from_documents, stdlib_code
from dspark_jax.decoding import generate_ar
from dspark_jax.speculative import speculative_generate
from dspark_jax.tokenizer import Tokenizer

REPO = os.path.dirname(EMBEDDED_DIR)


@pytest.fixture(scope="module")
def pair():
    target, tcfg = load_target(embedded_path("target"), "float32")
    drafters = {name: load_drafter(embedded_path(name), target, tcfg, "float32") for name in ("dspark", "dflash", "eagle3")}
    return target, tcfg, drafters, Tokenizer(embedded_path("target"))


def test_embedded_checkpoints_are_bfloat16_under_25_mb_with_manifests_and_recipes():
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(EMBEDDED_DIR) for f in fs)
    assert total < 25 * 2**20, f"checkpoints/ holds {total / 2**20:.1f} MiB"
    assert os.path.isfile(os.path.join(EMBEDDED_DIR, "RECIPE.md"))
    for name in EMBEDDED_MODELS:
        d = embedded_path(name)
        with safe_open(os.path.join(d, "model.safetensors"), "np") as f:
            keys = list(f.keys())
            assert keys and all(f.get_slice(k).get_dtype() == "BF16" for k in keys), name
        manifest = json.load(open(os.path.join(d, "manifest.json")))
        kind = "train-target" if name == "target" else "train-draft"
        assert manifest["recipe"].startswith(f"dspark-jax {kind} "), manifest["recipe"]
        assert manifest["steps"] > 0 and manifest["final_metrics"]
    assert os.path.isfile(os.path.join(embedded_path("target"), "tokenizer.json"))


def test_unknown_or_missing_embedded_checkpoint_is_named(tmp_path):
    with pytest.raises(ValueError, match="unknown embedded checkpoint 'eagle'"):
        embedded_path("eagle")
    with pytest.raises(FileNotFoundError, match="no embedded dspark checkpoint at"):
        embedded_path("dspark", root=tmp_path)


def test_drafters_were_trained_identically_except_for_the_markov_head(pair):
    _, tcfg, drafters, _ = pair
    (_, dspark), (_, dflash) = drafters["dspark"], drafters["dflash"]
    assert dspark.head_type == "vanilla" and dspark.markov_rank > 0 and dspark.enable_confidence_head
    assert dflash.head_type == "none" and dflash.markov_rank == 0
    for field in ("block_size", "target_layer_ids", "layers"):
        assert getattr(dspark, field) == getattr(dflash, field), field
    assert dspark.block_size == 7
    manifests = [json.load(open(os.path.join(embedded_path(n), "manifest.json"))) for n in ("dspark", "dflash")]
    for key in ("steps", "batch_size", "seq_len", "learning_rate", "sequences"):
        assert manifests[0][key] == manifests[1][key], key

    def recipe_without_head(recipe):  # the commands differ in --out and the head options only
        words = recipe.split()
        drop = {i + j for i, w in enumerate(words) if w in ("--out", "--head", "--markov-rank") for j in (0, 1)}
        return [w for i, w in enumerate(words) if i not in drop]

    assert recipe_without_head(manifests[0]["recipe"]) == recipe_without_head(manifests[1]["recipe"])


def test_eagle3_drafter_had_the_pairs_budget_and_data(pair):
    """The embedded Eagle-3 drafter: DeepSpec's one-layer Eagle-3 over target layers, trained with
    the DSpark/DFlash pair's steps, batch, sequence length, learning rate and regenerated data,
    stored without a confidence head."""
    _, _, drafters, _ = pair
    _, dcfg = drafters["eagle3"]
    assert dcfg.family == "eagle3" and dcfg.block_size == 7 and not getattr(dcfg, "enable_confidence_head", False)
    eagle3, dspark = (json.load(open(os.path.join(embedded_path(n), "manifest.json"))) for n in ("eagle3", "dspark"))
    for key in ("steps", "batch_size", "seq_len", "learning_rate", "sequences"):
        assert eagle3[key] == dspark[key], key
    for option in ("--num-prompts 6144", "--prose-fraction 0.25", "--regen-temperature 1 1 0", "--block-size 7",
                   "--export-dtype bfloat16", "--no-embedding-copies"):
        assert option in eagle3["recipe"] and option in dspark["recipe"], option


def test_greedy_speculative_equals_ar_on_held_out_code_for_every_drafter(pair):
    target, tcfg, drafters, tok = pair
    docs = stdlib_code("held-out")
    prompts = [p[:n] for p, n in zip(prompts_from_documents(docs, 48, tok.encode)[:3], (48, 17, 33))]
    ar = generate_ar(target, tcfg, prompts, max_new_tokens=40)
    taus = {}
    for name, (draft, dcfg) in drafters.items():
        res = speculative_generate(target, tcfg, draft, dcfg, prompts, max_new_tokens=40)
        assert res.samples == ar, name
        taus[name] = res.stats["tau"]
    # trained drafters: well above the tau = 1 of a drafter that is never accepted
    assert taus["dspark"] > 2.5 and taus["dflash"] > 1.9 and taus["eagle3"] > 3.0, taus  # measured: 2.98, 2.22, 3.57


def test_main_job_prints_text_first_then_tau_speed_and_speedup(capsys):
    cli.main(["generate", "--prompt", "import os\n\ndef ", "--max-new-tokens", "24", "--compare-ar"])
    out = capsys.readouterr().out
    assert out.startswith("[sample 0] import os")
    assert out.index("[sample 0]") < out.index("tau=") < out.index("speedup")
    assert "output identical to ar: yes" in out
    out = json.loads(_run_json(capsys, ["generate", "--prompt", "import os\n\ndef ", "--max-new-tokens", "24",
                                        "--compare-ar", "--json"]))
    assert out["mode"] == "speculative" and out["matches_ar"] is True and out["tau"] > 1.8  # measured: 2.09
    assert out["texts"][0] and out["tokens_per_second"] > 0 and out["speedup_over_ar"] > 0


def _run_json(capsys, argv):
    cli.main(argv)
    return capsys.readouterr().out


def test_eval_compares_the_embedded_drafters_on_held_out_code_and_prose(tmp_path, capsys):
    out = json.loads(_run_json(capsys, [
        "eval", "--draft", embedded_path("dspark"), "--draft", embedded_path("dflash"), "--num-prompts", "4",
        "--max-new-tokens", "24", "--batch-size", "4", "--out", str(tmp_path), "--json"]))
    got = {(r["drafter"], r["domain"]) for r in out["results"]}
    assert got == {(d, p) for d in ("dspark", "dflash") for p in ("held-out-code", "held-out-prose")}
    assert all(r["tau"] >= 1.0 and len(r["accept_rate_by_position"]) == 7 for r in out["results"])
    for path in out["figures"].values():
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_quickstart_notebook_runs_against_the_embedded_pair():
    import nbclient
    import nbformat

    nb = nbformat.read(os.path.join(REPO, "colab", "quickstart.ipynb"), as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": REPO}}).execute()
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "identical to ar: True" in text
    assert "DSpark  tau = " in text and "DFlash  tau = " in text
    assert not [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
