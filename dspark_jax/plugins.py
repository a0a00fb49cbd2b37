"""One registry design for everything a researcher may plug in: Markov heads and confidence
heads (``heads.MARKOV_HEADS``, ``heads.CONFIDENCE_HEADS``), loss terms (``train.LOSS_TERMS``),
schedulers (``schedule.SCHEDULER_PLUGINS``) and drafter families (``drafters.DRAFTER_FAMILIES``).
A plug-in is named either by a built-in name (``vanilla``) or by an import path
``package.module:Name`` of an object defined outside this package, which the registry checks
for the interface of its kind; configs record the import path, so a saved drafter rebuilds its
heads (or family) as long as the module is importable.
"""

from __future__ import annotations

import importlib
from typing import Any, Mapping

from .validate import UsageError


class PluginError(UsageError):
    """A plug-in that cannot be imported or does not have the interface its kind asks for."""


def is_import_path(spec: str) -> bool:
    return ":" in spec


def import_object(path: str, kind: str = "plug-in") -> Any:
    """The object at ``package.module:Name`` (``Name`` may be dotted: ``Outer.Inner``)."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr or not all(p.isidentifier() for p in module_name.split(".") + attr.split(".")):
        raise PluginError(f"{kind} {path!r} is not an import path of the form package.module:Name")
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or the module failing while it runs
        raise PluginError(f"{kind} {path!r}: cannot import module {module_name!r} ({type(e).__name__}: {e}); "
                          "it must be importable (on PYTHONPATH or installed)") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise PluginError(f"{kind} {path!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def import_path_of(obj: Any) -> str:
    """``package.module:Name`` of a class or function (what a config records)."""
    return f"{obj.__module__}:{obj.__qualname__}"


class Registry:
    """Built-in names for one kind of plug-in; anything else is an import path.

    A built-in maps to an import path (imported when first resolved), to the object itself
    (``register``, for built-ins defined in code), or to None: one its caller dispatches by name
    (the schedulers). ``check(obj, spec)`` validates what an import path resolves to (a
    subclass, a callable ...) and raises PluginError naming the spec when it is malformed.
    """

    def __init__(self, kind: str, builtins: Mapping[str, Any] = (), check=None):
        self.kind, self.builtins, self._check = kind, dict(builtins), check

    def register(self, name: str, obj: Any) -> Any:
        """Add (or replace) the built-in ``name``; returns ``obj``."""
        self.builtins[name] = obj
        return obj

    def names(self) -> tuple[str, ...]:
        return tuple(self.builtins)

    def is_builtin(self, spec: str) -> bool:
        return spec in self.builtins

    def resolve(self, spec: str) -> Any:
        """The object ``spec`` names (None for a built-in its caller dispatches by name)."""
        if spec in self.builtins:
            value = self.builtins[spec]
            return import_object(value, self.kind) if isinstance(value, str) else value
        if not is_import_path(spec):
            choices = f"choose one of {', '.join(self.builtins)} or give" if self.builtins else "give"
            raise PluginError(f"unknown {self.kind} {spec!r}: {choices} an import path package.module:Name")
        obj = import_object(spec, self.kind)
        if self._check is not None:
            self._check(obj, spec)
        return obj


def parse_plugin_args(items, option: str = "--head-arg") -> tuple[tuple[str, Any], ...]:
    """``["key=value", ...]`` -> sorted ``((key, value), ...)``; values are JSON (numbers,
    true/false, quoted strings) or else plain strings. Hashable, so a config holding it can be
    a static jit argument."""
    import json

    out = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"{option} must be key=value with key a Python identifier, got {item!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        if isinstance(parsed, (list, dict)):
            raise UsageError(f"{option} {key}: only numbers, booleans and strings are allowed, got {value!r}")
        out[key] = parsed
    return tuple(sorted(out.items()))
