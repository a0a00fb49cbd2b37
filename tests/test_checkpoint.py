"""Checkpoint loading, export and orbax round trips, and every loading error path.

Checkpoints are tiny random transformers Qwen3 models that the tests save themselves; broken
checkpoints are made by editing copies of a good one (config.json or the safetensors file).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import Qwen3ForCausalLM

from dspark_jax.checkpoint import (
    CheckpointError,
    load_qwen3,
    load_target,
    restore_qwen3_orbax,
    save_qwen3,
    save_qwen3_orbax,
)
from dspark_jax.config import ConfigError
from dspark_jax.layers import DecoderLayerParams, decoder_layer_decl
from dspark_jax.target import Qwen3Params, forward, init_cache
from hf_models import hf_forward, make_hf_qwen3

ATOL = 1e-4
VOCAB = 97


def assert_params_equal(a: Qwen3Params, b: Qwen3Params):
    """Same tree structure (incl. a tied lm_head of None), dtypes, shapes and exact values."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for path, x, y in zip(
        [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(a)[0]],
        jax.tree.leaves(a),
        jax.tree.leaves(b),
    ):
        assert x.dtype == y.dtype, path
        assert x.shape == y.shape, path
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32), err_msg=path)


def our_logits(params, cfg, ids: np.ndarray) -> np.ndarray:
    out, _ = forward(params, cfg, jnp.asarray(ids, jnp.int32), init_cache(cfg, ids.shape[0], ids.shape[1]))
    return np.asarray(out.logits)


def edit_config(model_dir, **changes):
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        raw = json.load(f)
    raw.update(changes)
    with open(path, "w") as f:
        json.dump(raw, f)


def edit_tensors(model_dir, fn):
    path = os.path.join(model_dir, "model.safetensors")
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """A tied and an untied transformers checkpoint (single file), with their models."""
    out = {}
    for tie in (False, True):
        path = tmp_path_factory.mktemp(f"hf-tie{int(tie)}")
        model = make_hf_qwen3(path, tie=tie, layers=2, vocab=VOCAB, seed=10 + tie)
        out[tie] = (path, model)
    return out


@pytest.fixture
def broken(hf_dirs, tmp_path):
    """A fresh, editable copy of the untied checkpoint."""
    path = tmp_path / "ckpt"
    shutil.copytree(hf_dirs[False][0], path)
    return path


# --------------------------------------------------------------------------- error paths


def test_missing_directory_names_config_path(tmp_path):
    missing = tmp_path / "does-not-exist"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing / "config.json"))):
        load_qwen3(missing)
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing / "config.json"))):
        load_target(missing)


def test_directory_without_config_json_names_config_path(broken):
    os.remove(broken / "config.json")
    with pytest.raises(FileNotFoundError, match=re.escape(str(broken / "config.json")) + ".*not found"):
        load_qwen3(broken)


def test_missing_safetensors_names_directory_and_expected_files(broken):
    os.remove(broken / "model.safetensors")
    with pytest.raises(
        FileNotFoundError,
        match=re.escape(str(broken)) + r".*no model\.safetensors or model\.safetensors\.index\.json",
    ):
        load_qwen3(broken)


def test_invalid_json_config_is_reported(broken):
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=re.escape(str(broken / "config.json")) + ".*not valid JSON"):
        load_qwen3(broken)


def test_unsupported_architecture_names_model_type(broken):
    edit_config(broken, model_type="llama", architectures=["LlamaForCausalLM"])
    with pytest.raises(ConfigError, match=r"unsupported architecture \(model_type='llama'.*LlamaForCausalLM"):
        load_qwen3(broken)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"attention_bias": True}, r"attention_bias=true is not a Qwen3 layout"),
        ({"use_sliding_window": True, "sliding_window": 0}, r"sliding_window must be >= 1, got 0"),
        ({"hidden_act": "gelu"}, r"hidden_act 'gelu' is not supported"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}},
         r"rope_type 'dynamic' is not supported"),
        ({"num_key_value_heads": 3}, r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"),
    ],
    ids=["attention-bias", "sliding-window", "hidden-act", "rope-type", "kv-heads"],
)
def test_unsupported_config_field_is_named(broken, changes, message):
    edit_config(broken, **changes)
    with pytest.raises(ConfigError, match=message):
        load_qwen3(broken)


def test_config_missing_required_field_is_named(broken):
    path = broken / "config.json"
    raw = json.loads(path.read_text())
    del raw["hidden_size"]
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"missing field\(s\) hidden_size"):
        load_qwen3(broken)


def test_missing_tensor_is_named(broken):
    name = "model.layers.1.mlp.up_proj.weight"
    edit_tensors(broken, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=re.escape(f"missing tensor {name!r}")):
        load_qwen3(broken)


def test_untied_config_without_lm_head_names_lm_head(hf_dirs, tmp_path):
    shutil.copytree(hf_dirs[True][0], tmp_path / "c")  # a tied checkpoint has no lm_head tensor
    edit_config(tmp_path / "c", tie_word_embeddings=False)
    with pytest.raises(CheckpointError, match=re.escape("missing tensor 'lm_head.weight'")):
        load_qwen3(tmp_path / "c")


def test_unexpected_extra_tensor_is_named(broken):
    name = "model.layers.0.self_attn.q_proj.bias"
    edit_tensors(broken, lambda t: t.__setitem__(name, np.zeros(32, np.float32)))
    with pytest.raises(CheckpointError, match=re.escape(f"unexpected tensor(s) [{name!r}]")):
        load_qwen3(broken)


def test_config_with_fewer_layers_than_checkpoint_names_leftover_tensors(broken):
    edit_config(broken, num_hidden_layers=1)
    with pytest.raises(CheckpointError, match=r"unexpected tensor\(s\) \['model\.layers\.1\."):
        load_qwen3(broken)


def test_shape_mismatch_names_tensor_and_both_shapes(broken):
    name = "model.layers.0.self_attn.k_proj.weight"  # stored [K*Dh, D] = [16, 32]
    edit_tensors(broken, lambda t: t.__setitem__(name, np.zeros((24, 32), np.float32)))
    with pytest.raises(
        CheckpointError, match=re.escape(f"tensor {name!r} has shape [24, 32], expected [16, 32]")
    ):
        load_qwen3(broken)


def test_config_disagreeing_with_tensors_reports_shape_mismatch(broken):
    edit_config(broken, intermediate_size=64)  # tensors are 48 wide
    with pytest.raises(
        CheckpointError, match=re.escape("'model.layers.0.mlp.gate_proj.weight' has shape [48, 32], expected [64, 32]")
    ):
        load_qwen3(broken)


def test_index_without_weight_map_is_reported(broken):
    (broken / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: no 'weight_map' object"):
        load_qwen3(broken)


def test_index_listing_a_missing_shard_names_the_shard(broken):
    index = {"weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00002\.safetensors: shard listed in .* not found"):
        load_qwen3(broken)


def test_unsupported_dtype_is_named(hf_dirs):
    with pytest.raises(ValueError, match=r"unsupported dtype 'int8'"):
        load_qwen3(hf_dirs[False][0], dtype="int8")


def test_restore_orbax_from_a_directory_without_orbax_params_names_it(hf_dirs):
    path = hf_dirs[False][0]
    with pytest.raises(FileNotFoundError, match=re.escape(os.path.join(str(path), "params")) + ": no orbax checkpoint"):
        restore_qwen3_orbax(path)


def test_tied_checkpoint_with_redundant_lm_head_copy_loads(hf_dirs, tmp_path):
    shutil.copytree(hf_dirs[True][0], tmp_path / "c")
    edit_tensors(tmp_path / "c", lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].copy()))
    params, cfg = load_qwen3(tmp_path / "c")
    assert cfg.tie_word_embeddings and params.lm_head is None
    assert_params_equal(params, load_qwen3(hf_dirs[True][0])[0])


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_loaded_weights_give_transformers_logits(hf_dirs, tie):
    path, model = hf_dirs[tie]
    params, cfg = load_qwen3(path, dtype="float32")
    ids = np.random.RandomState(0).randint(0, VOCAB, (2, 9))
    assert np.max(np.abs(our_logits(params, cfg, ids) - hf_forward(model, ids)[0])) < ATOL


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_sharded_checkpoint_loads_like_single_file(hf_dirs, tie, tmp_path):
    path, model = hf_dirs[tie]
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert not os.path.exists(tmp_path / "model.safetensors")
    assert len(shards) > 2, shards
    sharded, cfg_sharded = load_qwen3(tmp_path)
    single, cfg_single = load_qwen3(path)
    assert cfg_sharded == cfg_single
    assert_params_equal(sharded, single)


def test_bfloat16_safetensors_load_exactly(hf_dirs, tmp_path):
    _, model = hf_dirs[False]
    model16 = Qwen3ForCausalLM.from_pretrained(hf_dirs[False][0], dtype=torch.bfloat16)
    model16.save_pretrained(tmp_path)
    assert load_file(str(tmp_path / "model.safetensors"))["model.norm.weight"].dtype.name == "bfloat16"

    params16, cfg = load_qwen3(tmp_path, dtype="bfloat16")
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(params16))
    params32, _ = load_qwen3(tmp_path, dtype="float32")
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params32))
    # upcasting bf16 -> f32 is exact, so both loads hold the same numbers
    assert_params_equal(jax.tree.map(lambda x: x.astype(jnp.float32), params16), params32)

    # and those numbers are transformers' bfloat16 weights, in our layout
    sd = {k: v.float().numpy() for k, v in model16.state_dict().items()}
    np.testing.assert_array_equal(np.asarray(params32.embed), sd["model.embed_tokens.weight"])
    np.testing.assert_array_equal(np.asarray(params32.lm_head), sd["lm_head.weight"].T)
    q1 = sd["model.layers.1.self_attn.q_proj.weight"]  # [H*Dh, D]
    np.testing.assert_array_equal(np.asarray(params32.layers.q_proj[1]).reshape(cfg.hidden_size, -1), q1.T)
    o0 = sd["model.layers.0.self_attn.o_proj.weight"]  # [D, H*Dh]
    np.testing.assert_array_equal(np.asarray(params32.layers.o_proj[0]).reshape(-1, cfg.hidden_size), o0.T)


# --------------------------------------------------------------------------- export


def random_params(cfg, seed: int) -> Qwen3Params:
    """Our own random weights (numpy-drawn, in our layout), every norm distinct from 1 and
    from the others, so a swapped or misplaced norm would change the logits."""
    rng = np.random.RandomState(seed)

    def draw(shape, norm):
        w = 1 + 0.1 * rng.randn(*shape) if norm else 0.3 * rng.randn(*shape)
        return jnp.asarray(w, jnp.float32)

    shapes = jax.tree.map(lambda d: d.shape, decoder_layer_decl(cfg, cfg.num_hidden_layers, "model.layers"), is_leaf=lambda d: not isinstance(d, DecoderLayerParams))
    layers = DecoderLayerParams(
        **{f.name: draw(getattr(shapes, f.name), f.name.endswith("norm")) for f in dataclasses.fields(shapes)}
    )
    D, V = cfg.hidden_size, cfg.vocab_size
    return Qwen3Params(
        embed=draw((V, D), False),
        layers=layers,
        final_norm=draw((D,), True),
        lm_head=None if cfg.tie_word_embeddings else draw((D, V), False),
    )


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_exported_params_open_in_transformers_with_same_logits(hf_dirs, tie, tmp_path):
    _, cfg = load_qwen3(hf_dirs[tie][0])
    params = random_params(cfg, seed=20 + tie)
    save_qwen3(tmp_path, params, cfg)
    model = Qwen3ForCausalLM.from_pretrained(tmp_path).eval()
    assert model.config.tie_word_embeddings == tie
    assert model.config.num_key_value_heads == cfg.num_key_value_heads
    ids = np.random.RandomState(1).randint(0, VOCAB, (2, 11))
    hf_logits, _ = hf_forward(model, ids)
    assert np.max(np.abs(our_logits(params, cfg, ids) - hf_logits)) < ATOL


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_load_save_load_round_trip_is_exact(hf_dirs, tie, tmp_path):
    path, model = hf_dirs[tie]
    params, cfg = load_qwen3(path)
    save_qwen3(tmp_path, params, cfg)
    again, cfg_again = load_qwen3(tmp_path)
    assert cfg_again == cfg
    assert_params_equal(again, params)
    # the exported tensors are bit-identical to the ones transformers saved
    original = load_file(str(path / "model.safetensors"))
    exported = load_file(str(tmp_path / "model.safetensors"))
    assert set(exported) == set(original)  # transformers drops a tied lm_head, so do we
    assert ("lm_head.weight" in exported) == (not tie)
    for name, value in exported.items():
        np.testing.assert_array_equal(value, original[name], err_msg=name)


def test_export_keeps_rope_scaling_and_eos(tmp_path):
    rope = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 500.0}
    make_hf_qwen3(tmp_path / "hf", layers=1, vocab=VOCAB, rope_parameters=rope, eos_token_id=[3, 7])
    params, cfg = load_qwen3(tmp_path / "hf")
    assert cfg.eos_token_ids == (3, 7)
    save_qwen3(tmp_path / "out", params, cfg)
    _, cfg_again = load_qwen3(tmp_path / "out")
    assert cfg_again == cfg
    hf_cfg = Qwen3ForCausalLM.from_pretrained(tmp_path / "out").config
    assert hf_cfg.rope_parameters["rope_type"] == "yarn"
    assert hf_cfg.rope_parameters["factor"] == 4.0
    assert hf_cfg.rope_parameters["original_max_position_embeddings"] == 64
    assert hf_cfg.eos_token_id == [3, 7]


def test_bfloat16_export_opens_in_transformers_as_bfloat16(hf_dirs, tmp_path):
    params16, cfg = load_qwen3(hf_dirs[False][0], dtype="bfloat16")
    save_qwen3(tmp_path, params16, cfg)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    model = Qwen3ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    sd = model.state_dict()
    assert sd["model.norm.weight"].dtype == torch.bfloat16
    np.testing.assert_array_equal(
        sd["model.layers.1.mlp.down_proj.weight"].float().numpy(),
        np.asarray(params16.layers.down_proj[1], np.float32).T,
    )


# --------------------------------------------------------------------------- orbax


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_orbax_round_trip_and_load_target_dispatch(hf_dirs, tie, tmp_path):
    path, _ = hf_dirs[tie]
    params, cfg = load_qwen3(path)
    save_qwen3_orbax(tmp_path / "orbax", params, cfg)
    assert os.path.isdir(tmp_path / "orbax" / "params")

    restored, cfg_restored = restore_qwen3_orbax(tmp_path / "orbax")
    assert cfg_restored == cfg
    assert (restored.lm_head is None) == tie
    assert_params_equal(restored, params)

    via_target, cfg_target = load_target(tmp_path / "orbax")  # orbax directory
    assert cfg_target == cfg
    assert_params_equal(via_target, params)
    via_hf, cfg_hf = load_target(path)  # Hugging Face directory
    assert cfg_hf == cfg
    assert_params_equal(via_hf, params)
    assert isinstance(via_target.layers, DecoderLayerParams)


def test_eos_ids_are_the_union_of_config_and_generation_config(tmp_path):
    """Qwen3 instruct checkpoints list one eos in config.json and two in generation_config.json;
    transformers' generate stops at the generation config's, so must we."""
    make_hf_qwen3(tmp_path, layers=1, vocab=VOCAB, eos_token_id=5)
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    gen["eos_token_id"] = [5, 9]
    (tmp_path / "generation_config.json").write_text(json.dumps(gen))
    _, cfg = load_qwen3(tmp_path)
    assert cfg.eos_token_ids == (5, 9)


def test_bfloat16_export_halves_the_file_and_loads_back_as_the_rounded_weights(hf_dirs, tmp_path):
    params, cfg = load_qwen3(hf_dirs[False][0])
    save_qwen3(tmp_path / "f32", params, cfg)
    save_qwen3(tmp_path / "bf16", params, cfg, dtype="bfloat16")
    size32 = os.path.getsize(tmp_path / "f32" / "model.safetensors")
    size16 = os.path.getsize(tmp_path / "bf16" / "model.safetensors")
    assert size16 < 0.55 * size32
    again, _ = load_qwen3(tmp_path / "bf16", dtype="float32")
    rounded = jax.tree.map(lambda a: np.asarray(a.astype(jnp.bfloat16).astype(jnp.float32)), params)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, again), rounded)
