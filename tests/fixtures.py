"""Locating the shared reference fixtures (``../shared/fixtures`` beside the repository).

The fixtures are produced from the official DeepSpec PyTorch code by a generator kept outside
this repository; a plain clone does not have them. In CI (``CI=true``) they must be present
and a missing one fails the test; elsewhere the tests that need them are skipped with a
message saying where the data comes from. ``DSPARK_FIXTURES`` overrides the directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FIXTURES_ENV = "DSPARK_FIXTURES"
DEFAULT_FIXTURES_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def fixtures_dir() -> Path:
    override = os.environ.get(FIXTURES_ENV)
    return Path(override) if override else DEFAULT_FIXTURES_DIR


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require_fixture(name: str, *files: str) -> Path:
    """The directory of fixture ``name`` (checked to contain ``files``), or fail (CI) / skip."""
    path = fixtures_dir() / name
    if not path.is_dir():
        problem = "directory not found"
    else:
        missing = [f for f in files if not (path / f).exists()]
        problem = f"missing {', '.join(missing)}" if missing else ""
    if problem:
        message = (
            f"reference fixture {name!r} unavailable at {path} ({problem}); it is "
            f"part of the dspark-jax shared fixtures directory ../shared/fixtures/{name}, produced "
            f"from the official DeepSpec code (set {FIXTURES_ENV} to point elsewhere)"
        )
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return path
