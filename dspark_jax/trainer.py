"""The training loop around a jitted step: orbax checkpoints, exact resume, metrics JSONL,
progress bar, Ctrl-C / kill handling, optional data parallelism over a ``data`` mesh axis.

Resume is exact because everything that decides step t is a function of t: the batch
(``data.BatchStream.batch(t)``) and the step's PRNG key (``fold_in(seed_key, t)``); the
checkpoint holds params, optimiser state and step, and metadata (data position, config).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


class Stop(Exception):
    pass


class Interrupted(Exception):
    """A run stopped by SIGINT / SIGTERM after saving its checkpoint (not finished: no export)."""

    def __init__(self, signum: int, step: int, workdir: str):
        self.signum, self.step = signum, step
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved in "
                         f"{workdir}/checkpoints (run the same command to resume)")


class Diverged(ValueError):
    """A non-finite loss or parameter: the run stops without saving over the last good checkpoint."""


class WorkdirLocked(ValueError):
    """Another live process trains in the same work directory."""


LOCK_FILE = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


@contextlib.contextmanager
def workdir_lock(workdir: str):
    """Hold ``workdir/.lock`` (this process's pid) while training: a second run into the same
    directory fails at once; the lock of a process that died (kill -9) is taken over. In a
    multi-host run process 0 holds it for all the processes sharing the directory."""
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() != 0:
        yield
        return
    path = os.path.join(workdir, LOCK_FILE)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                with open(path) as f:
                    pid = int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pid = None  # half-written by a process that died while writing it
            if pid is not None and pid != os.getpid() and _pid_alive(pid):
                raise WorkdirLocked(f"{workdir}: another run (pid {pid}) is training here ({path}); wait for it "
                                    "to finish, stop it, or choose another --out") from None
            print(f"taking over the stale lock of a stopped run (pid {pid}) in {workdir}")
            os.unlink(path)
    else:
        raise WorkdirLocked(f"{path}: could not take the lock")
    with os.fdopen(fd, "w") as f:
        f.write(f"{os.getpid()}\n")
    try:
        yield
    finally:
        if os.path.exists(path):
            os.unlink(path)


def drop_metrics_after(path: str, step: int):
    """Keep the rows of ``metrics.jsonl`` up to ``step`` (the restored checkpoint): the steps a
    killed run logged after its last checkpoint are trained again and logged again."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [l for l in f if l.strip()]
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        if row.get("step", 0) <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)


def _first_non_finite(metrics: dict) -> tuple[str, float] | None:
    """The first loss term that is NaN or infinite (other metrics may be undefined legitimately,
    e.g. an acceptance rate at a position no block reached)."""
    for k, v in metrics.items():
        if "loss" not in k:
            continue
        a = np.asarray(v, np.float64)
        if not np.isfinite(a).all():
            return k, float(a.ravel()[~np.isfinite(a.ravel())][0])
    return None


def checkpoint_manager(directory: str, save_every: int = 0, max_to_keep: int = 2, read_only: bool = False):
    """An orbax CheckpointManager; ``read_only`` reads a directory another process may be
    writing to (a run still training) without saving, creating or deleting anything."""
    import orbax.checkpoint as ocp

    if not read_only:
        options = ocp.CheckpointManagerOptions(save_interval_steps=save_every, max_to_keep=max_to_keep, create=True)
        return ocp.CheckpointManager(os.path.abspath(directory), options=options)
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # orbax warns that a read-only manager's directory is read only
    try:
        return ocp.CheckpointManager(os.path.abspath(directory), options=options)
    finally:
        absl_logger.setLevel(level)


def save_checkpoint(manager, step: int, state, meta: dict, force: bool = False):
    import orbax.checkpoint as ocp

    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    manager.save(step, args=args, force=force)


def abstract_like(tree, sharding=None):
    """``jax.ShapeDtypeStruct`` per array of ``tree``, placed with ``sharding`` (one sharding
    for every leaf, or a matching tree of them) when given: what orbax restores into."""
    if sharding is None or isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sharding)


def restore_checkpoint(manager, abstract_state) -> tuple[Any, dict] | None:
    """The latest checkpoint (state, metadata), or None when the directory has none; each
    array restored straight into the sharding its ``abstract_state`` leaf names (any mesh:
    orbax reads each device's slice, whatever mesh saved it)."""
    import orbax.checkpoint as ocp

    step = manager.latest_step()
    if step is None:
        return None
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    )
    return restored.state, dict(restored.meta)


def restore_latest_params(workdir: str, abstract_state_from_meta: Callable[[dict], Any]) -> tuple[Any, dict]:
    """The parameters and metadata of the latest checkpoint in ``workdir/checkpoints``, read
    without touching the directory, so a run that is still training can be evaluated.
    ``abstract_state_from_meta(meta)`` gives the abstract train state the metadata describes."""
    import orbax.checkpoint as ocp

    directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{workdir}: no training checkpoints here (expected {directory})")
    manager = checkpoint_manager(directory, read_only=True)
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"{directory}: no finished checkpoint yet")
    meta = dict(manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)
    state, meta = restore_checkpoint(manager, abstract_state_from_meta(meta))
    return state.params, meta


def data_parallel_mesh(n: int):
    if n <= 1:
        return None
    from .sharding import make_mesh

    return make_mesh(model=1, data=n)


def global_array(host, sharding) -> jax.Array:
    """An array with ``sharding`` from a host value that every process holds in full (the
    same batch, the same initial state): each process places only the slices its own devices
    hold, so under ``jax.distributed`` a process feeds its local part of a global batch."""
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place_batch(batch: dict, mesh) -> dict:
    """Split a host batch over the ``data`` axis (or just move it to the default device)."""
    if mesh is None:
        return {k: jax.numpy.asarray(v) for k, v in batch.items()}
    sharding = NamedSharding(mesh, P("data"))
    return {k: global_array(v, sharding) for k, v in batch.items()}


def replicate(tree, mesh):
    """Every array of ``tree`` on all of ``mesh``'s devices (those of every process); arrays
    already placed so stay as they are."""
    if mesh is None:
        return tree
    sharding = NamedSharding(mesh, P())

    def place(a):
        if isinstance(a, jax.Array) and a.sharding.is_equivalent_to(sharding, a.ndim):
            return a
        if jax.process_count() == 1:
            return jax.device_put(a, sharding)
        return global_array(a, sharding)  # from this process's host copy: the same on every process

    return jax.tree.map(place, tree)


def _scalar_metrics(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        a = np.asarray(v)
        out[k] = float(a) if a.ndim == 0 else [float(x) for x in a.ravel()]
    return out


def run_training(
    *,
    state,
    step_fn: Callable[[Any, dict, jax.Array], tuple[Any, dict]],
    batches,
    total_steps: int,
    workdir: str,
    meta: dict,
    seed: int = 0,
    save_every: int = 100,
    log_every: int = 10,
    mesh=None,
    progress: bool = True,
    eval_fn: Callable[[Any], dict] | None = None,
    eval_every: int = 0,
    description: str = "train",
):
    """Train from the latest checkpoint in ``workdir/checkpoints`` (or from ``state``) to
    ``total_steps``. ``step_fn(state, batch, key) -> (state, metrics)``; ``batches.batch(t)``
    returns host arrays. Returns the final state. SIGINT/SIGTERM save a checkpoint and stop."""
    from tqdm.auto import tqdm

    os.makedirs(workdir, exist_ok=True)
    manager = checkpoint_manager(os.path.join(workdir, "checkpoints"), save_every)
    restored = restore_checkpoint(manager, abstract_like(state, None if mesh is None else NamedSharding(mesh, P())))
    start = 0
    if restored is not None:
        state, saved_meta = restored
        start = int(saved_meta["step"])
        print(f"resuming from step {start} ({workdir}/checkpoints)")
    state = replicate(state, mesh)
    base_key = jax.random.key(seed)
    main = jax.process_index() == 0  # every process trains and checkpoints (orbax writes each one's slices); process 0 logs
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if main:
        drop_metrics_after(metrics_path, start)

    stop = {"flag": False, "signum": None}

    def on_signal(signum, frame):
        stop["flag"], stop["signum"] = True, signum

    def check_finite_state(step, metrics):
        from .validate import NonFiniteError, check_finite_tree

        bad = _first_non_finite(metrics) if metrics is not None else None
        problem = f"{bad[0]} is {bad[1]}" if bad else None
        if problem is None:
            try:
                check_finite_tree(state, "train state")
            except NonFiniteError as e:
                problem = str(e).split("; ")[0]
        if problem is not None:
            last = manager.latest_step()
            raise Diverged(f"{problem} at step {step}: training stopped without saving or exporting; the last good "
                           f"checkpoint ({'none' if last is None else f'step {last}'}) is kept in {workdir}/checkpoints "
                           "(lower --lr, or check the data)")

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    bar = tqdm(total=total_steps, initial=start, desc=description, disable=not (progress and main), dynamic_ncols=True)
    step = start
    t_last = time.perf_counter()
    try:
        with open(metrics_path, "a") if main else open(os.devnull, "w") as log:
            while step < total_steps and not stop["flag"]:
                batch = place_batch(batches.batch(step), mesh)
                state, metrics = step_fn(state, batch, jax.random.fold_in(base_key, step))
                step += 1
                bar.update(1)
                if step % log_every == 0 or step == total_steps:
                    row = {"step": step, **_scalar_metrics(metrics)}
                    if _first_non_finite(row):
                        check_finite_state(step, row)
                    now = time.perf_counter()
                    row["seconds_per_step"] = (now - t_last) / log_every
                    t_last = now
                    if eval_fn is not None and eval_every and (step % eval_every == 0 or step == total_steps):
                        row.update({f"eval_{k}": v for k, v in _scalar_metrics(eval_fn(state)).items()})
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    bar.set_postfix(loss=f"{row.get('loss', float('nan')):.4f}")
                if step % save_every == 0:
                    check_finite_state(step, metrics)
                    save_checkpoint(manager, step, state, {**meta, "step": step})
        if manager.latest_step() != step:
            check_finite_state(step, metrics if step > start else None)
            save_checkpoint(manager, step, state, {**meta, "step": step}, force=True)
        manager.wait_until_finished()
    finally:
        bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
        manager.close()
    if stop["flag"] and step < total_steps:
        raise Interrupted(stop["signum"], step, workdir)
    return state, step
