"""Multi-host: two local processes under jax.distributed (4 fake CPU devices each, gloo
collectives, one mesh over all 8 devices) do what one process with 8 devices does. The same
``generate`` command decodes token for token the same, each process reading only the slices
its devices hold; data-parallel drafter training gives the same losses and parameters."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from dspark_jax.checkpoint import save_qwen3
from dspark_jax.target import target_decl
from spec_models import random_weights, target_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One host: the CLI, with every host read recorded (tensor name -> bytes) into $READS_LOG.
HOST = r"""
import atexit, collections, json, os, sys
from dspark_jax import cli, safetensors_io
read_bytes = collections.Counter()
read_rows = safetensors_io.SafetensorsFile.read_rows
def recording(self, name, start=0, stop=None, out=None):
    rows = read_rows(self, name, start, stop, out)
    read_bytes[name] += rows.nbytes
    return rows
safetensors_io.SafetensorsFile.read_rows = recording
atexit.register(lambda: json.dump(read_bytes, open(os.environ["READS_LOG"], "w")))
cli.main(sys.argv[1:])
"""


# One host of a training run: jax.distributed over localhost, then ``train_tiny`` (below).
TRAIN_HOST = r"""
import sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
coordinator, process_id, workdir, out = sys.argv[1:]
jax.distributed.initialize(coordinator, num_processes=2, process_id=int(process_id))
import numpy as np
import test_multihost
state = test_multihost.train_tiny(workdir)
if jax.process_index() == 0:
    np.savez(out, *[np.asarray(x) for x in jax.tree.leaves(state.params)])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_hosts(code: str, argv_of, tmp_path) -> list[subprocess.Popen]:
    """Two processes of ``code`` with 4 fake CPU devices each; ``argv_of(i, coordinator)`` is
    process i's command line (the coordinator is a free localhost port)."""
    coordinator = f"localhost:{free_port()}"
    hosts = []
    for i in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
                   PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
                   READS_LOG=str(tmp_path / f"reads{i}.json"))
        hosts.append(subprocess.Popen([sys.executable, "-c", code, *argv_of(i, coordinator)], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return hosts


def finish_hosts(hosts) -> list[str]:
    """The stdout of each host, once all exited successfully."""
    outputs = []
    for host in hosts:
        out, err = host.communicate(timeout=240)
        assert host.returncode == 0, err[-3000:]
        outputs.append(out)
    return outputs


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    cfg = target_config(vocab=64, hidden=32, layers=2, heads=8, kv_heads=4, head_dim=8, intermediate=64)
    path = tmp_path_factory.mktemp("multihost") / "target"
    params = random_weights(target_decl(cfg), seed=3)
    save_qwen3(path, params, cfg, max_shard_size=6000)
    return path, params, cfg


def generate_argv(target_dir) -> list[str]:
    return ["generate", "--mode", "ar", "--target", str(target_dir), "--prompt-ids", "5,6,7,9",
            "--max-new-tokens", "6", "--tensor-parallel", "8", "--no-warmup", "--json"]


def test_two_processes_decode_token_for_token_as_one_and_each_reads_only_its_slices(target_dir, tmp_path,
                                                                                   monkeypatch, capsys):
    from dspark_jax import checkpoint, cli

    path, params, cfg = target_dir
    hosts = start_hosts(HOST, lambda i, coordinator: generate_argv(path) + [
        "--coordinator", coordinator, "--num-processes", "2", "--process-id", str(i)], tmp_path)

    # meanwhile, one process over this suite's 8 devices; the weights go straight onto the mesh
    meshes = []
    load_target = checkpoint.load_target

    def spy(path, dtype=None, *, mesh=None, **kw):
        meshes.append(None if mesh is None else dict(mesh.shape))
        return load_target(path, dtype, mesh=mesh, **kw)

    monkeypatch.setattr(checkpoint, "load_target", spy)
    cli.main(generate_argv(path))
    one = json.loads(capsys.readouterr().out)
    assert meshes == [{"data": 1, "model": 8}]

    outputs = finish_hosts(hosts)

    def results(out):  # the --json result is one object per line; gloo itself prints "[Gloo] Rank ..." lines
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    assert results(outputs[1]) == [], outputs[1]  # process 0 prints the result
    assert len(results(outputs[0])) == 1, outputs[0]
    (two,) = results(outputs[0])
    assert len(two["samples"][0]) == 6
    assert two["samples"] == one["samples"]

    reads = [json.loads((tmp_path / f"reads{i}.json").read_text()) for i in range(2)]
    q = "model.layers.0.self_attn.q_proj.weight"  # heads split over 8 devices: 4 slices per host
    q_bytes = params.layers.q_proj[0].nbytes
    assert reads[0][q] == reads[1][q] == q_bytes // 2
    embed = "model.embed_tokens.weight"  # replicated: each host reads it once for its 4 devices
    assert reads[0][embed] == reads[1][embed] == params.embed.nbytes


def train_tiny(workdir: str, steps: int = 3):
    """A tiny drafter trained for a few steps, data-parallel over 8 devices (of however many
    processes): the final train state."""
    import jax

    from dspark_jax import data as data_lib
    from dspark_jax import train as train_lib
    from dspark_jax.draft import draft_decl
    from dspark_jax.trainer import data_parallel_mesh, replicate, run_training
    from spec_models import draft_config

    cfg = target_config(vocab=64, hidden=32, layers=2, heads=4, kv_heads=2, head_dim=8, intermediate=64)
    dcfg = dataclasses.replace(draft_config(cfg, markov_rank=8, confidence=False, block_size=2), num_anchors=4)
    rng = np.random.default_rng(0)
    data = data_lib.answers_dataset(rng.integers(0, 63, (16, 6)).tolist(), rng.integers(0, 63, (16, 10)).tolist(),
                                    16, pad_id=0)
    mesh = data_parallel_mesh(8)
    target = replicate(random_weights(target_decl(cfg), seed=3), mesh)  # every process's devices hold it
    optimizer = train_lib.make_optimizer(train_lib.OptimConfig(learning_rate=1e-2, total_steps=steps))
    state = train_lib.init_train_state(random_weights(draft_decl(dcfg), seed=4), optimizer)

    def step_fn(state, batch, key):
        return train_lib.draft_train_step(state, target, batch, key, dcfg=dcfg, tcfg=cfg, optimizer=optimizer,
                                          lc=train_lib.LossConfig())

    state, _ = run_training(state=state, step_fn=step_fn, batches=data_lib.BatchStream(data, 8, seed=1),
                            total_steps=steps, workdir=workdir, meta={"kind": "draft"}, save_every=steps,
                            log_every=1, progress=False, mesh=mesh)
    return state


def losses(workdir) -> list[float]:
    return [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_data_parallel_as_one(tmp_path):
    """Each process feeds its own devices' rows of the global batch (4 of 8) and holds the
    replicated state; the gradients are summed over both: the losses and the trained
    parameters equal one process's with all 8 devices."""
    import jax

    hosts = start_hosts(TRAIN_HOST, lambda i, coordinator: [coordinator, str(i), str(tmp_path / "two"),
                                                             str(tmp_path / "two.npz")], tmp_path)
    one = train_tiny(str(tmp_path / "one"))  # meanwhile, one process over this suite's 8 devices
    finish_hosts(hosts)
    assert len(losses(tmp_path / "one")) == 3
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=1e-6)
    with np.load(tmp_path / "two.npz") as two:
        trained = [two[f"arr_{i}"] for i in range(len(two.files))]
    expected = [np.asarray(x) for x in jax.tree.leaves(one.params)]
    assert len(trained) == len(expected)
    for a, b in zip(trained, expected):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
