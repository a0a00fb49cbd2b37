"""Drafter families: what the speculative loop, the loader, training and eval call on a drafter.

A family is chosen by the drafter config's ``family`` (``DraftConfig``: "dspark", covering
DSpark and DFlash; ``eagle3.Eagle3Config``: "eagle3"), or, reading a checkpoint, by the
``architectures`` of its ``config.json``. Families live in one ``plugins.Registry``
(``DRAFTER_FAMILIES``): a research drafter is a ``DrafterFamily`` subclass named by its import
path ``package.module:Name`` in its config's ``family`` (or added as a built-in with
``register_family``); the loop stays the same ``lax.while_loop``, only these calls change.

The drafter's decoding state is whatever the family carries through the loop
(``SpecState.draft_cache``): DSpark's context cache (``KVCache``), Eagle-3's
``Eagle3State`` (cache + the hidden of the next proposal).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from . import draft as dspark
from . import eagle3
from .config import ConfigError
from .plugins import PluginError, Registry


class DrafterFamily:
    """The DSpark / DFlash family (parallel block drafting, Markov + confidence heads); the
    methods are the interface every family implements."""

    name = "dspark"
    architectures: tuple[str, ...] = ("DSpark", "DFlash")  # substrings of config.json "architectures"
    config_class: Any = dspark.DraftConfig

    def config_from_hf(self, raw, where):
        return self.config_class.from_hf(raw, where)

    def decl(self, dcfg):
        """The parameter declaration tree (``params.ParamDecl`` leaves, checkpoint names)."""
        return dspark.draft_decl(dcfg)

    def init_params(self, key, dcfg, dtype=None, std: float = 0.02):
        return dspark.init_draft_params(key, dcfg, *(() if dtype is None else (dtype,)), std=std)

    def check_compatible(self, dcfg, tcfg, where: str = "draft"):
        dspark.check_compatible(dcfg, tcfg, where)

    def init_state(self, params, dcfg, batch: int, cache_len: int, dtype):
        """The empty decoding state of a batch."""
        return dspark.init_context_cache(dcfg, batch, cache_len, dtype)

    def prefill_chunk_fn(self, params, dcfg, target, prompt_tokens, prompt_lengths):
        """``fn(state, features [B, C, F], num_new [B]) -> state`` for each prefill chunk."""
        return functools.partial(dspark.append_context, params, dcfg)

    def start(self, params, dcfg, target, state, first_token):
        """The state after the prefill, once the first token is sampled."""
        return state

    def propose(self, key, params, dcfg, target, state, anchor, sampling, num_drafts: int):
        """(``draft.DraftBlock`` of ``num_drafts`` tokens, state)."""
        block, _ = dspark.draft_block(key, params, dcfg, target, state, anchor, sampling, num_drafts)
        return block, state

    def commit(self, params, dcfg, target, state, features, tokens, num_new):
        """Fold the verified positions' target features ``[B, K+1, F]`` (with the tokens after
        them ``[B, K+1]``) into the state, committing the first ``num_new [B]``."""
        return dspark.append_context(params, dcfg, state, features, num_new)


class Eagle3Family(DrafterFamily):
    """Eagle-3: one layer drafting a chain (``eagle3``); no confidence head. One family for
    both targets: the config's layer is Qwen3's or Gemma 4's (``eagle3.layer_family`` reads the
    exact architecture name, ``Qwen3Eagle3Model`` / ``Gemma4Eagle3Model``)."""

    name = "eagle3"
    architectures = ("Eagle3",)  # both names; the layer family is chosen in Eagle3Config.from_hf
    config_class = eagle3.Eagle3Config

    def decl(self, dcfg):
        return eagle3.eagle3_decl(dcfg)

    def init_params(self, key, dcfg, dtype=None, std: float = 0.02):
        return eagle3.init_eagle3_params(key, dcfg, *(() if dtype is None else (dtype,)), std=std)

    def check_compatible(self, dcfg, tcfg, where: str = "draft"):
        eagle3.check_compatible(dcfg, tcfg, where)

    def init_state(self, params, dcfg, batch, cache_len, dtype):
        return eagle3.init_state(dcfg, batch, cache_len, dtype)

    def prefill_chunk_fn(self, params, dcfg, target, prompt_tokens, prompt_lengths):
        return functools.partial(eagle3.prefill_chunk, params, dcfg, target, prompt_tokens, prompt_lengths)

    def start(self, params, dcfg, target, state, first_token):
        return eagle3.start(params, dcfg, target, state, first_token)

    def propose(self, key, params, dcfg, target, state, anchor, sampling, num_drafts):
        return eagle3.propose(key, params, dcfg, target, state, anchor, sampling, num_drafts)

    def commit(self, params, dcfg, target, state, features, tokens, num_new):
        return eagle3.commit(params, dcfg, target, state, features, tokens, num_new)


def _check_family(obj, spec):
    if not (isinstance(obj, type) and issubclass(obj, DrafterFamily)):
        raise PluginError(f"drafter family {spec!r} is not a subclass of dspark_jax.drafters.DrafterFamily (got {obj!r})")


# built-in name -> the family (an instance); an import path names a DrafterFamily subclass
DRAFTER_FAMILIES = Registry("drafter family", check=_check_family)


def register_family(family: DrafterFamily) -> DrafterFamily:
    """Add (or replace) a built-in drafter family, keyed by ``family.name``."""
    return DRAFTER_FAMILIES.register(family.name, family)


register_family(DrafterFamily())
register_family(Eagle3Family())


@functools.lru_cache(maxsize=None)
def _family_instance(cls: type) -> DrafterFamily:
    return cls()  # families are stateless: one instance per class


def resolve_family(spec: str) -> DrafterFamily:
    """The family a built-in name (``dspark``, ``eagle3``) or an import path
    ``package.module:Name`` of a ``DrafterFamily`` subclass names (PluginError otherwise)."""
    obj = DRAFTER_FAMILIES.resolve(spec)
    return _family_instance(obj) if isinstance(obj, type) else obj


def family_of(dcfg) -> DrafterFamily:
    """The family of a drafter config: its ``family`` (a built-in name or an import path;
    ``DraftConfig`` has no ``family`` field: DSpark)."""
    return resolve_family(getattr(dcfg, "family", "dspark"))


def drafter_state_bytes(params, dcfg, batch: int, cache_len: int, dtype) -> int:
    """Bytes of a drafter's decoding state (its family's ``init_state``, from shapes only):
    what the memory check before a speculative run adds to the target's cache."""
    shapes = jax.eval_shape(lambda: family_of(dcfg).init_state(params, dcfg, batch, cache_len, dtype))
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(shapes))


def family_for_architectures(archs: Sequence[str], where: str = "config.json") -> DrafterFamily:
    """The built-in family whose architecture names match a ``config.json``'s (none given:
    DSpark, as older DeepSpec DSpark configs write none)."""
    if not archs:
        return resolve_family("dspark")
    families = [resolve_family(name) for name in DRAFTER_FAMILIES.names()]
    for family in families:
        if any(tag in a for a in archs for tag in family.architectures):
            return family
    known = ", ".join(tag for f in families for tag in f.architectures)
    raise ConfigError(f"{where}: architectures {list(archs)} is not a drafter this library runs ({known})")


def config_from_hf(raw, where: str = "config.json"):
    """A drafter config of the family its ``architectures`` name."""
    return family_for_architectures(raw.get("architectures") or [], where).config_from_hf(raw, where)
