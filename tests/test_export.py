"""export-draft: DeepSpec's key set exactly with --with-embeddings, loadable both ways."""

import json
import os

import jax
import numpy as np
from safetensors import safe_open

from dspark_jax import cli
from dspark_jax.checkpoint import embedded_path, load_drafter, load_target

from fixtures import require_fixture


def tensors(directory):
    with safe_open(os.path.join(directory, "model.safetensors"), "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_export_with_embeddings_holds_exactly_deepspecs_keys_and_tensors(tmp_path, capsys):
    fixture = require_fixture("deepspec_qwen3_vanilla", "target/config.json", "draft/keys.json")
    deepspec_keys = {t["name"] for t in json.load(open(fixture / "draft" / "keys.json"))["tensors"]}
    target = str(fixture / "target")
    cli.main(["export-draft", str(fixture / "draft"), str(tmp_path / "with"), "--target", target, "--with-embeddings"])
    cli.main(["export-draft", str(fixture / "draft"), str(tmp_path / "without"), "--target", target])
    assert "with the target's embed_tokens" in capsys.readouterr().out
    ours, theirs = tensors(tmp_path / "with"), tensors(fixture / "draft")
    assert set(ours) == deepspec_keys == set(theirs)
    for name, value in theirs.items():  # the fixture's copies are DeepSpec's initialize_embeddings_and_head
        assert ours[name].shape == value.shape and ours[name].dtype == value.dtype, name
        np.testing.assert_array_equal(ours[name], value, err_msg=name)
    assert set(tensors(tmp_path / "without")) == deepspec_keys - {"embed_tokens.weight", "lm_head.weight"}
    # both load, to the same drafter: the loader uses the target's arrays either way
    t, tcfg = load_target(target, "float32")
    (a, _), (b, _) = (load_drafter(tmp_path / d, t, tcfg, "float32") for d in ("with", "without"))
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_embedded_drafter_exported_with_embeddings_keeps_bfloat16_and_the_targets_arrays(tmp_path, capsys):
    cli.main(["export-draft", embedded_path("dspark"), str(tmp_path / "dspark"), "--with-embeddings"])
    capsys.readouterr()
    source, ours = tensors(embedded_path("dspark")), tensors(tmp_path / "dspark")
    assert set(ours) == set(source) | {"embed_tokens.weight", "lm_head.weight"}
    target = tensors(embedded_path("target"))
    np.testing.assert_array_equal(ours["embed_tokens.weight"], target["model.embed_tokens.weight"])
    np.testing.assert_array_equal(ours["lm_head.weight"], target["model.embed_tokens.weight"])  # tied target
    for name, value in source.items():
        assert str(ours[name].dtype) == "bfloat16"
        np.testing.assert_array_equal(ours[name], value, err_msg=name)
    assert os.path.isfile(tmp_path / "dspark" / "sts_calibration.json")


def test_export_of_a_missing_drafter_is_named(tmp_path):
    import pytest

    with pytest.raises(SystemExit, match=r"error: .*nowhere"):
        cli.main(["export-draft", str(tmp_path / "nowhere"), str(tmp_path / "out")])
