"""Loading at scale: sharded checkpoints, loading straight onto the mesh, bounded host reads,
and the errors of a broken sharded checkpoint (8 fake CPU devices, see conftest)."""

from __future__ import annotations

import json
import os
import stat

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding

from dspark_jax import safetensors_io
from dspark_jax.checkpoint import CheckpointError, load_draft, load_qwen3, save_draft, save_qwen3
from dspark_jax.draft import draft_decl
from dspark_jax.safetensors_io import INDEX_FILE, write_safetensors
from dspark_jax.sharding import make_mesh, param_specs, shard_target, target_shardings
from dspark_jax.target import target_decl
from spec_models import draft_config, random_weights, target_config

SHARD_BYTES = 6000  # small enough that the tiny pair is written in many shards


def tree_items(tree):
    return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def assert_bit_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), (_, y) in zip(tree_items(a), tree_items(b)):
        assert x.dtype == y.dtype and x.shape == y.shape, path
        np.testing.assert_array_equal(np.asarray(x).reshape(-1).view(np.uint8), np.asarray(y).reshape(-1).view(np.uint8), err_msg=path)


@pytest.fixture(scope="module")
def pair():
    """A tiny random target (8 heads, 4 kv heads: splits over a model axis of 4) and drafter."""
    cfg = target_config(vocab=256, hidden=32, layers=2, heads=8, kv_heads=4, head_dim=8, intermediate=64)
    target = random_weights(target_decl(cfg), seed=0)
    dcfg = draft_config(cfg, markov_rank=16)
    draft = random_weights(draft_decl(dcfg), seed=1)
    return target, cfg, draft, dcfg


@pytest.fixture(scope="module")
def saved(pair, tmp_path_factory):
    """The pair saved twice: one file each, and sharded (index + shards)."""
    target, cfg, draft, dcfg = pair
    root = tmp_path_factory.mktemp("saved")
    for layout, size in (("single", None), ("sharded", SHARD_BYTES)):
        save_qwen3(root / layout / "target", target, cfg, max_shard_size=size)
        save_draft(root / layout / "draft", draft, dcfg, target, max_shard_size=size)
    return root


def shard_files(model_dir):
    return sorted(f for f in os.listdir(model_dir) if safetensors_io.SHARD_PATTERN.match(f))


def test_sharded_save_writes_an_index_and_readable_shards(saved):
    for model in ("target", "draft"):
        d = saved / "sharded" / model
        assert not (d / "model.safetensors").exists()
        index = json.loads((d / INDEX_FILE).read_text())
        assert len(shard_files(d)) > 2
        assert set(index["weight_map"].values()) == set(shard_files(d))
        for f in shard_files(d) + [INDEX_FILE, "config.json"]:
            assert stat.S_IMODE(os.stat(d / f).st_mode) & 0o044 == 0o044, f  # readable by group and others


def test_sharded_checkpoint_loads_bit_equal_to_single_file(saved, pair):
    target, cfg, _, _ = pair
    single, cfg_single = load_qwen3(saved / "single" / "target", "float32")
    sharded, cfg_sharded = load_qwen3(saved / "sharded" / "target", "float32")
    assert cfg_single == cfg_sharded
    assert_bit_equal(sharded, single)
    assert_bit_equal(sharded, target)
    d_single, dcfg_single = load_draft(saved / "single" / "draft", single, cfg_single, "float32")
    d_sharded, dcfg_sharded = load_draft(saved / "sharded" / "draft", sharded, cfg_sharded, "float32")
    assert dcfg_single == dcfg_sharded
    assert_bit_equal(d_sharded, d_single)
    assert_bit_equal(d_sharded, pair[2])


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["kv-split", "kv-replicated"])
def test_loading_onto_a_mesh_places_each_weight_with_the_forward_sharding(saved, pair, kv_heads, tmp_path):
    target, cfg, _, _ = pair
    model_dir = saved / "sharded" / "target"
    if kv_heads != cfg.num_key_value_heads:  # fewer kv heads than the model axis
        cfg = target_config(vocab=256, hidden=32, layers=2, heads=8, kv_heads=kv_heads, head_dim=8, intermediate=64)
        target = random_weights(target_decl(cfg), seed=2)
        model_dir = tmp_path / "target"
        save_qwen3(model_dir, target, cfg, max_shard_size=SHARD_BYTES)
    mesh = make_mesh(model=4, data=2)
    loaded, _ = load_qwen3(model_dir, "float32", mesh=mesh)
    expected = target_shardings(cfg, mesh)
    for (path, array), (_, sharding) in zip(tree_items(loaded), tree_items(expected)):
        assert array.sharding.is_equivalent_to(sharding, array.ndim), path
    assert_bit_equal(jax.device_get(loaded), jax.device_get(target))

    sharded, scfg = shard_target(loaded, cfg, mesh)  # what the tensor-parallel forward takes
    specs = param_specs(scfg)
    for (path, array), (_, spec) in zip(tree_items(sharded), tree_items(specs)):
        assert array.sharding.is_equivalent_to(NamedSharding(mesh, spec), array.ndim), path
    if kv_heads == 4:  # already in place: the forward's layout is the loaded layout
        for (_, a), (_, b) in zip(tree_items(loaded), tree_items(sharded)):
            assert a is b


@pytest.fixture
def reads(monkeypatch):
    """Every host read of the loader: (tensor name, bytes read)."""
    log = []
    read_rows = safetensors_io.SafetensorsFile.read_rows

    def recording(self, name, start=0, stop=None, out=None):
        rows = read_rows(self, name, start, stop, out)
        log.append((name, rows.nbytes))
        return rows

    monkeypatch.setattr(safetensors_io.SafetensorsFile, "read_rows", recording)
    return log


@pytest.mark.parametrize("on_host", [True, False], ids=["cpu-buffers", "accelerator-pieces"])
def test_a_weight_larger_than_the_budget_is_read_in_pieces_no_larger_than_it(saved, pair, reads, on_host, monkeypatch):
    """On CPU each weight is filled in its host buffer; on an accelerator (its placement run
    here on CPU) each piece is written into the device buffer in place. Both read in pieces."""
    from dspark_jax import checkpoint

    monkeypatch.setattr(checkpoint, "_on_host", lambda sharding: on_host)
    target, _, _, _ = pair
    budget = 4096  # bytes; the embedding is 256 x 32 float32 = 32 KiB, one layer's MLP matrix 8 KiB
    assert target.embed.nbytes > 4 * budget
    loaded, _ = load_qwen3(saved / "sharded" / "target", "float32", chunk_bytes=budget)
    assert_bit_equal(loaded, target)
    embed_reads = [n for name, n in reads if name == "model.embed_tokens.weight"]
    assert sum(embed_reads) == target.embed.nbytes and max(embed_reads) <= budget
    largest_layer_tensor = max(x.nbytes // x.shape[0] for x in jax.tree.leaves(target.layers))
    assert max(n for _, n in reads) <= max(budget, largest_layer_tensor)


def test_on_a_mesh_each_device_reads_only_the_rows_its_slice_needs(saved, pair, reads):
    """A weight split along the checkpoint's rows (q/k/v, gate/up: output features) is read
    as each device's slice; one split along its columns (o_proj, down_proj: input features)
    is read a layer at a time, each device keeping its columns."""
    target, cfg, _, _ = pair
    mesh = make_mesh(model=4, data=1)
    load_qwen3(saved / "sharded" / "target", "float32", mesh=mesh)
    q_name = "model.layers.0.self_attn.q_proj.weight"  # heads split over model=4
    q_bytes = target.layers.q_proj[0].nbytes
    q_reads = [n for name, n in reads if name == q_name]
    assert len(q_reads) == 4 and all(n == q_bytes // 4 for n in q_reads)
    gate_reads = [n for name, n in reads if name == "model.layers.1.mlp.gate_proj.weight"]
    assert len(gate_reads) == 4 and all(n == target.layers.gate_proj[1].nbytes // 4 for n in gate_reads)
    down_reads = [n for name, n in reads if name == "model.layers.1.mlp.down_proj.weight"]
    assert len(down_reads) == 4 and all(n == target.layers.down_proj[1].nbytes for n in down_reads)


# --------------------------------------------------------------------------- broken sharded checkpoints


@pytest.fixture
def sharded_copy(saved, tmp_path):
    import shutil

    path = tmp_path / "target"
    shutil.copytree(saved / "sharded" / "target", path)
    return path


def entries_of(path) -> list:
    """The tensors of one safetensors file as ``write_safetensors`` entries."""
    f = safetensors_io.SafetensorsFile(str(path))
    out = [(name, f.shape(name), f.dtype(name), lambda rows=f.read_rows(name): rows) for name in f.tensors]
    f.close()
    return out


def test_a_missing_shard_file_is_named(sharded_copy):
    missing = shard_files(sharded_copy)[1]
    os.remove(sharded_copy / missing)
    with pytest.raises(FileNotFoundError, match=rf"{missing}: shard listed in .*{INDEX_FILE} not found"):
        load_qwen3(sharded_copy)


def test_an_index_naming_an_absent_file_is_named(sharded_copy):
    index = json.loads((sharded_copy / INDEX_FILE).read_text())
    name = "model.norm.weight"
    index["weight_map"][name] = "model-00042-of-00099.safetensors"
    (sharded_copy / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(FileNotFoundError, match=r"model-00042-of-00099\.safetensors: shard listed in"):
        load_qwen3(sharded_copy)


def test_an_index_leaving_out_a_shard_names_a_missing_tensor(sharded_copy):
    index = json.loads((sharded_copy / INDEX_FILE).read_text())
    left_out = shard_files(sharded_copy)[-1]
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != left_out}
    (sharded_copy / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"missing tensor '"):
        load_qwen3(sharded_copy)


def test_a_shard_holding_a_tensor_its_index_does_not_list_is_named(sharded_copy):
    shard = shard_files(sharded_copy)[0]
    extra = np.zeros((3,), np.float32)
    entries = entries_of(sharded_copy / shard)
    entries.append(("model.layers.0.self_attn.extra.weight", (3,), extra.dtype, lambda: extra))
    write_safetensors(str(sharded_copy / shard), entries)
    with pytest.raises(CheckpointError, match=rf"{shard}: shard holds tensor 'model\.layers\.0\.self_attn\.extra\.weight' "
                                              r"but .* does not list it"):
        load_qwen3(sharded_copy)


def test_a_shard_holding_a_tensor_another_shard_is_listed_for_is_named(sharded_copy):
    index = json.loads((sharded_copy / INDEX_FILE).read_text())
    files = list(index["weight_map"].values())
    first = next(f for f in shard_files(sharded_copy) if files.count(f) > 1)  # still listed after the move
    second = next(f for f in shard_files(sharded_copy) if f != first)
    moved = next(k for k, v in index["weight_map"].items() if v == first)
    index["weight_map"][moved] = second
    (sharded_copy / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{first}: shard holds tensor '{moved}' but .* lists it in {second}"):
        load_qwen3(sharded_copy)


# --------------------------------------------------------------------------- command line


def test_export_draft_max_shard_size_writes_shards_that_load_bit_equal(saved, pair, tmp_path, capsys):
    from dspark_jax import cli

    src = saved / "single"
    cli.main(["export-draft", str(src / "draft"), str(tmp_path / "out"), "--target", str(src / "target"),
              "--max-shard-size", "8KB"])
    assert (tmp_path / "out" / INDEX_FILE).exists() and len(shard_files(tmp_path / "out")) > 2
    target, cfg = load_qwen3(src / "target", "float32")
    assert_bit_equal(load_draft(tmp_path / "out", target, cfg)[0], pair[2])


def test_a_bad_max_shard_size_is_a_usage_error(saved, tmp_path, capsys):
    from dspark_jax import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["export-draft", str(saved / "single" / "draft"), str(tmp_path / "out"), "--target",
                  str(saved / "single" / "target"), "--max-shard-size", "lots"])
    assert e.value.code == 2
    assert "error: --max-shard-size: max shard size 'lots': expected bytes or a size like" in capsys.readouterr().err


# --------------------------------------------------------------------------- orbax on another mesh


@pytest.fixture(scope="module")
def on_tp4(saved):
    """The target loaded onto a (data 2, model 4) mesh."""
    mesh = make_mesh(model=4, data=2)
    params, cfg = load_qwen3(saved / "sharded" / "target", "float32", mesh=mesh)
    return params, cfg


@pytest.mark.parametrize("model", [8, 2])
def test_orbax_target_saved_from_one_mesh_restores_straight_onto_another(on_tp4, pair, model, tmp_path):
    from dspark_jax.checkpoint import load_target, save_qwen3_orbax

    params, cfg = on_tp4
    save_qwen3_orbax(tmp_path / "orbax", params, cfg)
    mesh = make_mesh(model=model, data=1)
    restored, _ = load_target(tmp_path / "orbax", "float32", mesh=mesh)
    for (path, array), (_, sharding) in zip(tree_items(restored), tree_items(target_shardings(cfg, mesh))):
        assert array.sharding.is_equivalent_to(sharding, array.ndim), path
    assert_bit_equal(jax.device_get(restored), jax.device_get(pair[0]))


def test_a_training_checkpoint_of_a_sharded_run_restores_on_another_mesh_shape(on_tp4, tmp_path):
    from dspark_jax.trainer import abstract_like, checkpoint_manager, restore_checkpoint, save_checkpoint

    params, cfg = on_tp4
    state = {"params": params, "step": jax.numpy.asarray(7)}
    with checkpoint_manager(str(tmp_path / "checkpoints")) as manager:
        save_checkpoint(manager, 7, state, {"step": 7}, force=True)
        manager.wait_until_finished()
    mesh = make_mesh(model=2, data=4)
    shardings = {"params": target_shardings(cfg, mesh), "step": NamedSharding(mesh, jax.sharding.PartitionSpec())}
    with checkpoint_manager(str(tmp_path / "checkpoints"), read_only=True) as manager:
        restored, meta = restore_checkpoint(manager, abstract_like(state, shardings))
    assert meta == {"step": 7} and int(restored["step"]) == 7
    for (path, array), (_, sharding) in zip(tree_items(restored["params"]), tree_items(shardings["params"])):
        assert array.sharding.is_equivalent_to(sharding, array.ndim), path
    assert_bit_equal(jax.device_get(restored["params"]), jax.device_get(params))


def test_a_nan_in_the_last_piece_of_a_weight_read_in_pieces_is_named(pair, tmp_path):
    import dataclasses

    from dspark_jax.validate import NonFiniteError

    target, cfg, _, _ = pair
    damaged = dataclasses.replace(target, embed=target.embed.at[-1, -1].set(np.nan))
    save_qwen3(tmp_path / "t", damaged, cfg)
    with pytest.raises(NonFiniteError, match=r"tensor 'model\.embed_tokens\.weight' \[256, 32\] holds 1 NaN"):
        load_qwen3(tmp_path / "t", "float32", chunk_bytes=4096)
