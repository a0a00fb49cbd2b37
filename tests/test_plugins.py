"""Plug-ins by import path: a Markov head, a loss term and a scheduler defined outside the package
(tests/plugin_examples.py) work through the command line and the library; malformed ones fail
with one clear line."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax import cli
from dspark_jax import train as train_lib
from dspark_jax.decoding import generate_ar
from dspark_jax.heads import MARKOV_HEADS, head_structure
from dspark_jax.plugins import PluginError
from spec_models import draft_config, target_config
from test_cli import model_dirs, run_json  # noqa: F401  (the CLI's tiny target + tokenizer)
from test_speculative import (SAMPLING_CONTEXT, SAMPLING_PROMPT, assert_matches, budget_profile, exact_joint_2_3,
                              pair, run_spec)
from test_speculative import K as SPEC_K

HEAD = "plugin_examples:TwoTokenHead"
CONFIDENCE = "plugin_examples:TokenConfidenceHead"


def test_plugin_heads_train_save_reload_decode_losslessly_and_calibrate_through_the_cli(model_dirs, tmp_path, capsys):
    from dspark_jax.checkpoint import load_drafter, load_qwen3

    root, _, _ = model_dirs
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"text": t}) for t in ["def f(x):", "the quick", "return x", "brown fox"] * 2))
    out = tmp_path / "run"
    cli.main(["train-draft", "--target", str(root / "target"), "--out", str(out), "--prompts", str(prompts),
              "--num-prompts", "8", "--answer-tokens", "12", "--seq-len", "24", "--batch-size", "4", "--layers", "1",
              "--block-size", "3", "--num-anchors", "4", "--no-progress", "--target-layer-ids", "0,1",
              "--head", HEAD, "--head-arg", "rank=6", "--loss-term", "plugin_examples:kl_to_target", "0.5",
              "--confidence-head", CONFIDENCE, "--confidence-head-arg", "scale=0.05",
              "--steps", "4", "--lr", "3e-3"])
    assert f"head={HEAD}" in capsys.readouterr().out
    config = json.loads((out / "draft" / "config.json").read_text())
    assert config["markov_head_type"] == HEAD and config["markov_head_args"] == {"rank": 6}
    assert config["confidence_head_type"] == CONFIDENCE and config["confidence_head_args"] == {"scale": 0.05}
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert "loss_term[plugin_examples:kl_to_target]" in rows[-1]

    target, tcfg = load_qwen3(root / "target")
    draft, dcfg = load_drafter(out / "draft", target, tcfg)  # rebuilt from the recorded class path and args
    assert dcfg.head_type == HEAD and dict(dcfg.markov_head_args) == {"rank": 6}
    assert dcfg.confidence_head_type == CONFIDENCE and dict(dcfg.confidence_head_args) == {"scale": 0.05}
    assert draft.markov["prev2"].shape == (tcfg.vocab_size + 1, 6) and draft.confidence["w"].shape == (32 + 6,)
    assert np.asarray(draft.confidence["token_bias"]).any()  # its own parameter (zeros at init) trained
    latest, _ = load_drafter(out, target, tcfg)  # the run's latest checkpoint: the same NNX state
    for exported, restored in zip(jax.tree.leaves(draft), jax.tree.leaves(latest)):
        np.testing.assert_array_equal(np.asarray(exported), np.asarray(restored))

    # the threshold scheduler verifies the prefix the plug-in confidence head trusts
    got = run_json(capsys, ["generate", "--target", str(root / "target"), "--draft", str(out / "draft"),
                            "--prompt-ids", "5,6,7", "--max-new-tokens", "12", "--json", "--confidence-threshold", "0.5"])
    assert got["samples"] == [generate_ar(target, tcfg, [[5, 6, 7]], max_new_tokens=12)[0]]
    assert got["verification_budget_per_request"] < dcfg.block_size + 1, got  # the threshold cut some drafts
    cal = tmp_path / "cal.json"
    cli.main(["calibrate", "--target", str(root / "target"), "--draft", str(out / "draft"), "--prompts", str(prompts),
              "--max-new-tokens", "24", "--min-rounds", "8", "--out", str(cal)])
    assert "STS on" in capsys.readouterr().out and len(json.loads(cal.read_text())["temperatures"]) == 3

    with pytest.raises(SystemExit):
        cli.main(["export-draft", str(out / "draft"), str(tmp_path / "x"), "--target", str(root / "target")])
    assert "DeepSpec format is for the built-in heads" in capsys.readouterr().err


def tiny_loss_setup():
    from dspark_jax import draft as draft_model
    from dspark_jax import target as target_model

    tcfg = target_config(vocab=32, hidden=16, layers=2, heads=2, kv_heads=1, head_dim=8, intermediate=32)
    dcfg = draft_config(tcfg, "vanilla", 3, (0, 1), markov_rank=4)
    target = target_model.init_params(jax.random.key(0), tcfg, std=0.3)
    draft = draft_model.init_draft_params(jax.random.key(1), dcfg, std=0.3)
    rng = np.random.RandomState(0)
    batch = {"tokens": jnp.asarray(rng.randint(0, 31, (2, 12)), jnp.int32), "loss_mask": jnp.ones((2, 12), jnp.int32)}
    return target, tcfg, draft, dcfg, batch


@functools.partial(jax.jit, static_argnames=("tcfg", "dcfg", "lc"))
def _loss_grads(target, draft, batch, *, tcfg, dcfg, lc):
    loss = lambda p: train_lib.draft_step_loss(p, dcfg, target, tcfg, batch, jax.random.key(0), lc)
    return jax.grad(lambda p: loss(p)[0])(draft), loss(draft)[1]


def loss_grads(setup, lc):
    target, tcfg, draft, dcfg, batch = setup
    return _loss_grads(target, draft, batch, tcfg=tcfg, dcfg=dcfg, lc=lc)


def test_a_loss_term_adds_its_weighted_gradient_to_deepspecs_three():
    setup = tiny_loss_setup()
    path = "plugin_examples:mean_confidence"
    base, _ = loss_grads(setup, train_lib.LossConfig())
    both, metrics = loss_grads(setup, train_lib.LossConfig(extra_terms=((path, 0.5),)))
    alone, _ = loss_grads(setup, train_lib.LossConfig(ce=0.0, l1=0.0, confidence=0.0, extra_terms=((path, 1.0),)))
    for b, t, a in zip(jax.tree.leaves(base), jax.tree.leaves(both), jax.tree.leaves(alone)):
        np.testing.assert_allclose(np.asarray(t - b), 0.5 * np.asarray(a), rtol=1e-4, atol=1e-6)
    # the term reaches the confidence head, and not the Markov head's output matrix (it never reads the logits)
    assert np.abs(np.asarray(alone.confidence["w"])).max() > 1e-4
    assert not np.asarray(alone.markov["w2"]).any()
    assert np.isfinite(float(metrics["loss_term[plugin_examples:mean_confidence]"]))


def test_a_plugin_scheduler_keeps_speculative_sampling_lossless():
    from dspark_jax.sampling import Sampling

    sampling = Sampling(temperature=1.0)
    pr = pair("vanilla", context=SAMPLING_CONTEXT)
    joint = exact_joint_2_3(pr, sampling)
    rows = 4096
    res = run_spec(pr, [SAMPLING_PROMPT] * rows, max_new=4, cache_len=32, sampling=sampling, seed=3, trace=False,
                   scheduler="plugin_examples:greedy_budget", sps_profile=budget_profile(rows))
    assert 0 < res.stats["proposed_tokens"] < res.stats["rounds"] * SPEC_K  # it cut the drafts it verified
    S = np.array(res.samples)
    assert_matches(np.bincount(S[:, 1], minlength=32), joint.sum(1))
    assert_matches(np.bincount(S[:, 2], minlength=32), joint.sum(0))
    assert_matches(np.bincount(S[:, 1] * 32 + S[:, 2], minlength=32 * 32), joint)


def test_drafter_families_and_confidence_heads_resolve_by_import_path_and_refuse_other_objects():
    from types import SimpleNamespace

    import plugin_examples
    from dspark_jax.drafters import family_of, resolve_family
    from dspark_jax.heads import CONFIDENCE_HEADS, ConfidenceHead

    family = resolve_family("plugin_examples:ReplayFamily")
    assert isinstance(family, plugin_examples.ReplayFamily)
    assert family_of(SimpleNamespace(family="plugin_examples:ReplayFamily")) is family
    assert resolve_family("eagle3").name == "eagle3" and family_of(object()).name == "dspark"
    with pytest.raises(PluginError) as e:
        resolve_family("plugin_examples:NotAHead")
    assert "drafter family 'plugin_examples:NotAHead' is not a subclass of dspark_jax.drafters.DrafterFamily" in str(e.value)
    with pytest.raises(PluginError, match="unknown drafter family 'medusa': choose one of dspark, eagle3 or give"):
        resolve_family("medusa")

    assert CONFIDENCE_HEADS.resolve("linear") is ConfidenceHead
    assert CONFIDENCE_HEADS.resolve(CONFIDENCE) is plugin_examples.TokenConfidenceHead
    with pytest.raises(PluginError, match="confidence head 'plugin_examples:ConfidenceNotAModule' is not a subclass "
                                          "of flax.nnx.Module"):
        CONFIDENCE_HEADS.resolve("plugin_examples:ConfidenceNotAModule")


@pytest.mark.parametrize("spec,message", [
    ("no_such_module_xyz:Head", "cannot import module 'no_such_module_xyz' (ModuleNotFoundError"),
    ("plugin_examples:Missing", "module 'plugin_examples' has no attribute 'Missing'"),
    ("plugin_examples:NOT_A_CLASS", "is not a subclass of dspark_jax.heads.MarkovHead"),
    ("plugin_examples:NotAHead", "is not a subclass of dspark_jax.heads.MarkovHead"),
    ("lstm", "unknown Markov head 'lstm': choose one of none, vanilla, gated, rnn or give an import path"),
    ("plugin_examples:", "is not an import path of the form package.module:Name"),
])
def test_unimportable_or_malformed_heads_are_named(spec, message):
    with pytest.raises(PluginError, match=None) as e:
        MARKOV_HEADS.resolve(spec)
    assert message in str(e.value)


def test_malformed_plugins_fail_with_one_clear_line(model_dirs, tmp_path, capsys):
    import dataclasses

    from dspark_jax.checkpoint import CheckpointError, load_drafter, load_qwen3, save_draft, save_draft_orbax
    from dspark_jax.draft import init_draft_params

    base_dcfg = tiny_loss_setup()[3]
    with pytest.raises(PluginError, match="holds state other than nnx.Param .rngs.default.count"):
        head_structure(dataclasses.replace(base_dcfg, markov_head_type="plugin_examples:HeadWithRngs"))
    with pytest.raises(PluginError, match=r"cannot be built with arguments \{'depth': 2\}"):
        head_structure(dataclasses.replace(base_dcfg, markov_head_type=HEAD, markov_head_args=(("depth", 2),)))
    with pytest.raises(PluginError, match=r"confidence head 'plugin_examples:ConfidenceWithWrongCall' must be callable "
                                          r"as head\(hidden \[..., D\], prev_token \[...\], features \[..., 4\]\)"):
        head_structure(dataclasses.replace(base_dcfg, confidence_head_type="plugin_examples:ConfidenceWithWrongCall"))
    with pytest.raises(PluginError, match=r"'plugin_examples:ConfidenceWithVectorOutput' returned \(2, 2\) for hidden "
                                          r"\[2, 16\]; expected one logit per position"):
        head_structure(dataclasses.replace(base_dcfg, confidence_head_type="plugin_examples:ConfidenceWithVectorOutput"))
    with pytest.raises(PluginError, match=r"confidence head '.*TokenConfidenceHead' cannot be built with arguments"):
        head_structure(dataclasses.replace(base_dcfg, confidence_head_type=CONFIDENCE, confidence_head_args=(("n", 1),)))
    conf_dcfg = dataclasses.replace(base_dcfg, confidence_head_type=CONFIDENCE)
    with pytest.raises(CheckpointError, match=f"the plug-in head {CONFIDENCE!r} is saved as an orbax checkpoint"):
        save_draft(tmp_path / "x", init_draft_params(jax.random.key(0), conf_dcfg), conf_dcfg, tiny_loss_setup()[0])
    with pytest.raises(PluginError, match=r"loss term 'plugin_examples:loss_with_a_vector' must return a scalar"):
        loss_grads(tiny_loss_setup(), train_lib.LossConfig(extra_terms=(("plugin_examples:loss_with_a_vector", 1.0),)))
    with pytest.raises(PluginError, match=r"scheduler 'plugin_examples:scheduler_with_wrong_shape' returned lengths"):
        run_spec(pair("vanilla", context=SAMPLING_CONTEXT), [[1, 2, 3]], max_new=4,
                 scheduler="plugin_examples:scheduler_with_wrong_shape")

    # the command line says it in one line, before loading anything (the target does not exist)
    with pytest.raises(SystemExit):
        cli.main(["train-draft", "--target", str(tmp_path / "missing"), "--out", str(tmp_path / "run"),
                  "--head", "no_such_module_xyz:Head"])
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: Markov head 'no_such_module_xyz:Head': cannot import module") and "\n" not in err
    with pytest.raises(SystemExit):
        cli.main(["train-draft", "--target", str(tmp_path / "missing"), "--out", str(tmp_path / "run"),
                  "--head-arg", "rank=3"])
    assert "--head-arg is for plug-in heads" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train-draft", "--target", str(tmp_path / "missing"), "--out", str(tmp_path / "run"),
                  "--confidence-head", "gone_module:Confidence"])
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: confidence head 'gone_module:Confidence': cannot import module") and "\n" not in err

    # a saved drafter whose head module is gone names the module
    root, _, _ = model_dirs
    target, tcfg = load_qwen3(root / "target")
    dcfg = dataclasses.replace(base_dcfg, layers=dataclasses.replace(tcfg, num_hidden_layers=1), target_layer_ids=(0, 1),
                               mask_token_id=tcfg.vocab_size - 1, markov_head_type=HEAD, markov_head_args=(("rank", 4),))
    save_draft_orbax(tmp_path / "d", init_draft_params(jax.random.key(0), dcfg), dcfg)
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    (tmp_path / "d" / "config.json").write_text(json.dumps({**config, "markov_head_type": "gone_module:TwoTokenHead"}))
    with pytest.raises(PluginError, match="cannot import module 'gone_module'"):
        load_drafter(tmp_path / "d", target, tcfg)
