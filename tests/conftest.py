"""Shared test setup: make the repository root importable (the package is not installed)."""

import os
import sys

import pytest

# Eight fake CPU devices for the sharding tests; must be set before jax is imported.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

# One on-disk compilation cache for the whole run: this process, pytest-xdist's workers and the
# CLI / notebook subprocesses the tests start all inherit the variable, so a program compiled
# in one module or process is read back, not recompiled, in the next. A fresh directory per run
# (removed at exit by the process that made it): nothing carries over between runs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dspark-jax-tests-xla-")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop jax's compiled programs after each test module. XLA:CPU maps every executable's
    code into memory; the whole suite compiles so many that one process would pass the
    kernel's vm.max_map_count (65530) and crash inside XLA's compiler."""
    yield
    import gc

    import jax

    jax.clear_caches()
    gc.collect()
