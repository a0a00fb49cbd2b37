"""Peak resident memory and time of loading a bf16 Qwen3 checkpoint saved sharded.

Writes random bf16 checkpoints of the Qwen3-0.6B and Qwen3-1.7B shapes (tied embeddings),
each as ``model.safetensors.index.json`` + several shards, then loads each in a fresh
subprocess (``load_target(dir, dtype="bfloat16")``) and reports the child's peak RSS
(``ru_maxrss`` from ``wait4``), the load time, the parameter bytes and the peak over them.
A baseline child (imports, backend started, nothing loaded) gives the fixed cost of the
interpreter + jax. With ``--before PATH`` the loader of another checkout (e.g. a worktree at
an older commit) runs too, alternating with the current one, in the same run.

    python bench/bench_loading.py --before /tmp/oldwt            # both shapes, before vs now
    python bench/bench_loading.py --shapes 0.6b --repeats 3 --keep

Checkpoints go under ``--dir`` (default /work/runs/bench_loading) and are deleted at the end
unless ``--keep``. Each child needs about the parameter bytes of free memory (the old loader
needs several times that); a child is not started when /proc/meminfo says there is not enough.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPES = {  # Qwen3-0.6B / 1.7B: 28 layers, 16 / 8 heads, head_dim 128, vocab 151936, tied
    "0.6b": dict(hidden_size=1024, intermediate_size=3072),
    "1.7b": dict(hidden_size=2048, intermediate_size=6144),
    "tiny": dict(hidden_size=64, intermediate_size=128),  # a smoke run of the script
}

CHILD = r"""
import json, os, resource, sys, time
t0 = time.perf_counter()
import jax, jax.numpy as jnp
jnp.zeros(1).block_until_ready()  # the backend started: part of the baseline
from dspark_jax.checkpoint import load_target
ready = time.perf_counter()
nbytes = 0
if sys.argv[1] != "-":
    params, _ = load_target(sys.argv[1], dtype="bfloat16")
    jax.block_until_ready(params)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(params))
print(json.dumps({"seconds": time.perf_counter() - ready, "param_bytes": nbytes}))
"""


def qwen3_config(shape: str):
    from dspark_jax.config import Qwen3Config

    return Qwen3Config(vocab_size=151936, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, tie_word_embeddings=True, max_position_embeddings=40960, **SHAPES[shape])


def random_bf16(shape, rng) -> np.ndarray:
    """Random finite bfloat16 values of magnitude in [2^-7, 2^-5) drawn as bits (no float32 copy)."""
    import ml_dtypes

    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    bits &= 0x80FF  # sign, the exponent's lowest bit and the mantissa
    bits |= 0x3C00  # exponent 120 or 121
    return bits.view(ml_dtypes.bfloat16)


def write_checkpoint(model_dir: str, shape: str, max_shard_size: str, seed: int = 0):
    """A random bf16 checkpoint of ``shape``, written tensor by tensor (the loader's own
    declarations give the names and shapes; each tensor exists only while it is written)."""
    import ml_dtypes

    from dspark_jax.params import checkpoint_tensors
    from dspark_jax.safetensors_io import save_tensors
    from dspark_jax.target import target_decl

    cfg = qwen3_config(shape)
    rng = np.random.default_rng(seed)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    entries = [(name, tuple(s), bf16, lambda s=s: random_bf16(s, rng))
               for name, s in checkpoint_tensors(target_decl(cfg)).items()]
    os.makedirs(model_dir, exist_ok=True)
    save_tensors(model_dir, entries, max_shard_size)
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(cfg.to_hf() | {"dtype": "bfloat16"}, f)
    return sum(math.prod(s) * 2 for _, s, _, _ in entries)


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def run_child(code_root: str, model_dir: str | None, need_bytes: int) -> dict:
    """Load in a fresh interpreter with ``code_root`` first on the path: its peak RSS and time."""
    while mem_available() < need_bytes:
        print(f"  (waiting: {mem_available() / 1e9:.1f} GB available, this load needs ~{need_bytes / 1e9:.1f} GB)",
              flush=True)
        time.sleep(20)
    env = dict(os.environ, PYTHONPATH=code_root, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, model_dir or "-"], env=env, stdout=subprocess.PIPE,
                            cwd=code_root)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"error: the loading child ({code_root}) exited with {proc.returncode}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    result["peak_rss"] = usage.ru_maxrss * 1024  # kilobytes on Linux
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["0.6b", "1.7b"], choices=list(SHAPES))
    p.add_argument("--before", help="a checkout whose loader is compared (e.g. a worktree at the old commit)")
    p.add_argument("--repeats", type=int, default=2, help="loads per loader and shape, alternating")
    p.add_argument("--max-shard-size", default="1GB")
    p.add_argument("--dir", default="/work/runs/bench_loading", help="where the checkpoints are written")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = p.parse_args(argv)

    loaders = {"now": ROOT} | ({"before": os.path.abspath(args.before)} if args.before else {})
    print(f"machine: {os.cpu_count()} CPUs, {mem_available() / 1e9:.1f} GB available now (shared machine: "
          "other processes' load moves the times)")
    baseline = {name: run_child(root, None, 1 << 30)["peak_rss"] for name, root in loaders.items()}
    print("baseline RSS (interpreter + jax, nothing loaded): "
          + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in baseline.items()))
    rows = []
    try:
        for shape in args.shapes:
            model_dir = os.path.join(args.dir, f"qwen3-{shape}-bf16")
            t0 = time.perf_counter()
            nbytes = write_checkpoint(model_dir, shape, args.max_shard_size)
            shards = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
            print(f"\n{shape}: {nbytes / 1e9:.2f} GB of bf16 parameters in {len(shards)} shards "
                  f"(written in {time.perf_counter() - t0:.0f} s)")
            results = {name: [] for name in loaders}
            for _ in range(args.repeats):
                for name, root in loaders.items():  # alternating: load on the machine moves both alike
                    need = nbytes * (5 if name == "before" else 1) + (1 << 30)
                    r = run_child(root, model_dir, need)
                    results[name].append(r)
                    print(f"  {name:6s}: peak RSS {r['peak_rss'] / 1e9:.2f} GB, {r['seconds']:.1f} s", flush=True)
            for name, rs in results.items():
                peak = max(r["peak_rss"] for r in rs)
                rows.append((shape, name, rs[0]["param_bytes"], peak, baseline[name],
                             statistics.median(r["seconds"] for r in rs)))
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)

    print("\nshape  loader  params GB  peak RSS GB  RSS-params GB  RSS-params-baseline GB  load s (median)")
    for shape, name, params, peak, base, seconds in rows:
        print(f"{shape:5s}  {name:6s}  {params / 1e9:9.2f}  {peak / 1e9:11.2f}  {(peak - params) / 1e9:13.2f}"
              f"  {(peak - params - base) / 1e9:22.2f}  {seconds:15.1f}")


if __name__ == "__main__":
    main()
