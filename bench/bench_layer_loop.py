"""What a layer loop costs a weight-bound decode step: stacked weights under ``lax.scan`` vs
one array per layer, unrolled.

A decode step at batch 1 reads every weight once (matrix-vector products), so its floor is
weights / read bandwidth. The target's layers are stacked ``[L, ...]`` and run by ``lax.scan``;
XLA:CPU materialises the ``dynamic-slice`` of each layer's weights before the dot (a loop
fusion that writes a copy; printed below from the compiled HLO), so each weight is read, written
and read again. This script times a chain of ``L`` matrix-vector products of the 0.6B shape's
MLP width (``h = tanh(h @ W_l)[:, :D]``) three ways, alternating, and prints each time beside
the ``weights / bandwidth`` floor:

* ``scan``: stacked ``[L, D, F]``, ``lax.scan`` over it (the package's layout today);
* ``per-layer``: ``L`` separate ``[D, F]`` arrays, a Python loop (nothing to slice);
* ``fori``: stacked, ``lax.fori_loop`` with ``W[i]`` (a dynamic index, as scan).

    python bench/bench_layer_loop.py [--layers 28 --hidden 1024 --width 3072 --repeats 15]
"""

from __future__ import annotations

import argparse
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.timing import median_seconds


def read_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes/s of a jitted sum over a ``nbytes`` float32 array (all threads)."""
    a = jnp.ones((nbytes // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    return nbytes / median_seconds(total, a, repeats=5)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--width", type=int, default=3072)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=3, help="alternations of the three variants")
    args = ap.parse_args(argv)
    L, D, F = args.layers, args.hidden, args.width

    rng = np.random.default_rng(0)
    stacked = jnp.asarray(rng.standard_normal((L, D, F), dtype=np.float32) * 0.02)
    per_layer = [jnp.asarray(np.asarray(stacked[i])) for i in range(L)]
    x = jnp.asarray(rng.standard_normal((1, D), dtype=np.float32))
    step = lambda h, w: jnp.tanh((h @ w)[:, :D])

    scan = jax.jit(lambda h, ws: jax.lax.scan(lambda c, w: (step(c, w), None), h, ws)[0])
    fori = jax.jit(lambda h, ws: jax.lax.fori_loop(0, L, lambda i, c: step(c, ws[i]), h))

    @jax.jit
    def unrolled(h, ws):
        for w in ws:
            h = step(h, w)
        return h

    for a, b in ((scan, stacked), (fori, stacked)):
        np.testing.assert_allclose(np.asarray(a(x, b)), np.asarray(unrolled(x, per_layer)), rtol=1e-5, atol=1e-5)
    hlo = scan.lower(x, stacked).compile().as_text()
    copies = [l.strip() for l in hlo.splitlines() if "dynamic-slice" in l and "fusion(" in l and f"f32[{D},{F}]" in l]

    nbytes = stacked.nbytes
    floor = nbytes / read_bandwidth()
    print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.device_count()} devices) | {L} layers x "
          f"[{D}, {F}] float32 = {nbytes / 1e6:.0f} MB of weights | read floor {1e3 * floor:.1f} ms")
    print(f"scan body: {len(copies)} weight-sized dynamic-slice fusion(s) (a copy of the layer's weights per step)"
          + (f": {copies[0][:110]}..." if copies else ""))
    runs = {"scan": [], "per-layer": [], "fori": []}
    for _ in range(args.rounds):
        runs["scan"].append(median_seconds(scan, x, stacked, repeats=args.repeats))
        runs["per-layer"].append(median_seconds(unrolled, x, per_layer, repeats=args.repeats))
        runs["fori"].append(median_seconds(fori, x, stacked, repeats=args.repeats))
    for name, ts in runs.items():
        t = statistics.median(ts)
        print(f"{name:10s} {1e3 * t:7.1f} ms  ({t / floor:.2f}x the read floor; runs {', '.join(f'{1e3 * v:.1f}' for v in ts)})")
    print(f"scan / per-layer: {statistics.median(runs['scan']) / statistics.median(runs['per-layer']):.2f}x")


if __name__ == "__main__":
    main()
