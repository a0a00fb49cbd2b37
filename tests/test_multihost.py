"""Multi-host: the same ``generate`` command run by two local processes under jax.distributed
(4 fake CPU devices each, gloo collectives, one mesh over all 8 devices) decodes exactly what
one process with 8 devices decodes, and each process reads only the slices its devices hold."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


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
    port = free_port()
    hosts = []
    for i in range(2):
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
                   PYTHONPATH=ROOT, READS_LOG=str(tmp_path / f"reads{i}.json"))
        argv = generate_argv(path) + ["--coordinator", f"localhost:{port}", "--num-processes", "2",
                                      "--process-id", str(i)]
        hosts.append(subprocess.Popen([sys.executable, "-c", HOST, *argv], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))

    # meanwhile, one process over this suite's 8 devices; the weights go straight onto the mesh
    meshes = []
    load_target = checkpoint.load_target

    def spy(path, dtype=None, *, mesh=None):
        meshes.append(None if mesh is None else dict(mesh.shape))
        return load_target(path, dtype, mesh=mesh)

    monkeypatch.setattr(checkpoint, "load_target", spy)
    cli.main(generate_argv(path))
    one = json.loads(capsys.readouterr().out)
    assert meshes == [{"data": 1, "model": 8}]

    outputs = []
    for host in hosts:
        out, err = host.communicate(timeout=240)
        assert host.returncode == 0, err[-3000:]
        outputs.append(out)
    def results(out):  # gloo itself prints "[Gloo] Rank ..." lines on stdout
        return [json.loads(line) for line in out.splitlines() if not line.startswith("[Gloo]")]

    assert results(outputs[1]) == []  # process 0 prints the result
    (two,) = results(outputs[0])
    assert len(two["samples"][0]) == 6
    assert two["samples"] == one["samples"]

    reads = [json.loads((tmp_path / f"reads{i}.json").read_text()) for i in range(2)]
    q = "model.layers.0.self_attn.q_proj.weight"  # heads split over 8 devices: 4 slices per host
    q_bytes = params.layers.q_proj[0].nbytes
    assert reads[0][q] == reads[1][q] == q_bytes // 2
    embed = "model.embed_tokens.weight"  # replicated: each host reads it once for its 4 devices
    assert reads[0][embed] == reads[1][embed] == params.embed.nbytes
