"""The drafter's sequential heads as Flax NNX modules, and how a drafter builds them.

A **Markov head** (``MarkovHead``) maps the backbone hidden ``h_k [..., D]``, the previous
token ``x_{k-1} [...]`` and a carried state (any pytree; ``initial_state``) to a logit bias
``B_k [..., V]`` (float32, added to the base logits U_k) and the new state; ``features`` gives
what it shares with the confidence head (``[..., feature_size]``). A **confidence head** maps
``(h_k, x_{k-1}, features)`` to the logit of the drafted token's survival ``[...]``.

Built-in heads (DeepSpec's): ``none`` (DFlash), ``vanilla`` / ``gated`` / ``rnn``, and
``ConfidenceHead``. Their weights are declared with ``params.ParamDecl`` (the DeepSpec
checkpoint names ride along as variable metadata), so loading and export follow from them. A
new head is a subclass of ``MarkovHead`` anywhere importable, constructed as
``Head(dcfg, *, rngs, **head_args)``, named by ``package.module:Name`` (``--head``).

In a drafter's parameter pytree each head is its NNX state as a pure dict
(``nnx.to_pure_dict``); the graph definition is static, derived from the config
(``head_graphdefs``), and ``nnx.merge`` rebuilds the module inside jitted functions.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .params import ParamDecl, init_param
from .plugins import PluginError, Registry


def compute_bias(latent: jax.Array, w2: jax.Array) -> jax.Array:
    """``latent [..., r] @ w2 [r, V]`` accumulated in float32."""
    return jnp.einsum("...r,rv->...v", latent, w2, preferred_element_type=jnp.float32)


def declared_param(decl: ParamDecl, rngs: nnx.Rngs, std: float, dtype) -> nnx.Param:
    """A parameter initialised from its declaration, which it carries as metadata (``decl``)."""
    key = rngs.params() if decl.init == "normal" else None
    return nnx.Param(init_param(key, decl, dtype, std), decl=decl)


class MarkovHead(nnx.Module):
    """Interface of a Markov head: ``(h_k, x_{k-1}, state) -> (bias B_k, new state)``."""

    feature_size: int = 0  # width of ``features`` (what the confidence head may read)

    def initial_state(self, lead: tuple[int, ...]) -> Any:
        """The carried state before block position 0, for leading shape ``lead`` (a pytree)."""
        return jnp.zeros(lead + (0,), jnp.float32)

    def __call__(self, hidden: jax.Array, prev_token: jax.Array, state: Any) -> tuple[jax.Array, Any]:
        raise NotImplementedError

    def features(self, hidden: jax.Array, prev_token: jax.Array, state: Any) -> jax.Array:
        """``[..., feature_size]`` for the confidence head (given the state before this step)."""
        return jnp.zeros(hidden.shape[:-1] + (0,), hidden.dtype)


class NoMarkovHead(MarkovHead):
    """DFlash: no bias."""

    def __init__(self, dcfg, *, rngs: nnx.Rngs, std: float = 0.02, dtype=jnp.float32):
        pass

    def __call__(self, hidden, prev_token, state):
        return jnp.zeros((), jnp.float32), state  # folded away by XLA


class VanillaHead(MarkovHead):
    """``B_k = W1[x_{k-1}] @ W2`` (a rank-r bigram)."""

    def __init__(self, dcfg, *, rngs: nnx.Rngs, std: float = 0.02, dtype=jnp.float32):
        V, r = dcfg.layers.vocab_size, dcfg.markov_rank
        self.feature_size = r
        self.w1 = declared_param(ParamDecl((V, r), ("vocab", "markov"), "markov_head.markov_w1.weight"), rngs, std, dtype)
        self.w2 = declared_param(ParamDecl((r, V), ("markov", "vocab"), "markov_head.markov_w2.weight", 1), rngs, std, dtype)

    def features(self, hidden, prev_token, state):
        return self.w1[prev_token]

    def __call__(self, hidden, prev_token, state):
        return compute_bias(self.w1[prev_token], self.w2[...]), state


class GatedHead(VanillaHead):
    """The previous token's embedding gated by ``sigmoid([h_k, e] @ G + g)``."""

    def __init__(self, dcfg, *, rngs: nnx.Rngs, std: float = 0.02, dtype=jnp.float32):
        super().__init__(dcfg, rngs=rngs, std=std, dtype=dtype)
        D, r = dcfg.hidden_size, dcfg.markov_rank
        self.gate_w = declared_param(ParamDecl((D + r, r), ("gate_in", "markov"), "markov_head.gate_proj.weight", 1),
                                     rngs, std, dtype)
        self.gate_b = declared_param(ParamDecl((r,), ("markov",), "markov_head.gate_proj.bias", init="zeros"),
                                     rngs, std, dtype)

    def __call__(self, hidden, prev_token, state):
        prev_emb = self.w1[prev_token]
        gate = jax.nn.sigmoid(jnp.concatenate([hidden, prev_emb], -1) @ self.gate_w[...] + self.gate_b[...])
        return compute_bias(gate.astype(prev_emb.dtype) * prev_emb, self.w2[...]), state


class RnnHead(VanillaHead):
    """A GRU-like state over the block: ``z = [s, e, h_k] @ J + j`` -> gate, candidate, output."""

    def __init__(self, dcfg, *, rngs: nnx.Rngs, std: float = 0.02, dtype=jnp.float32):
        super().__init__(dcfg, rngs=rngs, std=std, dtype=dtype)
        D, r = dcfg.hidden_size, dcfg.markov_rank
        self.rank = r
        self.joint_w = declared_param(
            ParamDecl((2 * r + D, 3 * r), ("joint_in", "joint_out"), "markov_head.joint_proj.weight", 1), rngs, std, dtype)
        self.joint_b = declared_param(
            ParamDecl((3 * r,), ("joint_out",), "markov_head.joint_proj.bias", init="zeros"), rngs, std, dtype)

    def initial_state(self, lead):
        return jnp.zeros(lead + (self.rank,), jnp.float32)

    def __call__(self, hidden, prev_token, state):
        prev_emb = self.w1[prev_token]
        z = jnp.concatenate([state.astype(prev_emb.dtype), prev_emb, hidden], -1) @ self.joint_w[...] + self.joint_b[...]
        gate_raw, candidate_raw, output_raw = jnp.split(z, 3, axis=-1)
        gate = jax.nn.sigmoid(gate_raw)
        state = gate * state + (1.0 - gate) * jnp.tanh(candidate_raw)
        return compute_bias(jnp.tanh(output_raw), self.w2[...]), state


class ConfidenceHead(nnx.Module):
    """``sigma^{-1}(c_k) = [h_k (, features)] @ w + b``; ``feature_size`` 0 reads h_k only."""

    def __init__(self, dcfg, feature_size: int, *, rngs: nnx.Rngs, std: float = 0.02, dtype=jnp.float32):
        self.feature_size = feature_size
        width = dcfg.hidden_size + feature_size
        self.w = declared_param(ParamDecl((width,), ("confidence_in",), "confidence_head.proj.weight", 1), rngs, std, dtype)
        self.b = declared_param(ParamDecl((), (), "confidence_head.proj.bias", init="zeros", hf_shape_override=(1,)),
                                rngs, std, dtype)

    def __call__(self, hidden: jax.Array, prev_token: jax.Array, features: jax.Array) -> jax.Array:
        feats = jnp.concatenate([hidden, features], -1) if self.feature_size else hidden
        return (feats @ self.w[...] + self.b[...]).astype(jnp.float32)


def _check_markov_head(obj, spec):
    if not (isinstance(obj, type) and issubclass(obj, MarkovHead)):
        raise PluginError(f"Markov head {spec!r} is not a subclass of dspark_jax.heads.MarkovHead (got {obj!r})")


MARKOV_HEADS = Registry("Markov head", {
    "none": "dspark_jax.heads:NoMarkovHead",
    "vanilla": "dspark_jax.heads:VanillaHead",
    "gated": "dspark_jax.heads:GatedHead",
    "rnn": "dspark_jax.heads:RnnHead",
}, check=_check_markov_head)


def build_heads(dcfg, rngs: nnx.Rngs, std: float = 0.02, dtype=jnp.float32) -> tuple[MarkovHead, ConfidenceHead | None]:
    """The drafter's Markov head (``dcfg.head_type``) and confidence head (or None), initialised.

    Built-in heads draw normal(std) weights in ``dtype``; a plug-in head is constructed as
    ``Head(dcfg, rngs=rngs, **dcfg.markov_head_args)`` with its own initialisers."""
    spec = dcfg.head_type
    cls = MARKOV_HEADS.resolve(spec)
    if MARKOV_HEADS.is_builtin(spec):
        markov = cls(dcfg, rngs=rngs, std=std, dtype=dtype)
    else:
        args = dict(dcfg.markov_head_args)
        try:
            markov = cls(dcfg, rngs=rngs, **args)
        except TypeError as e:
            raise PluginError(f"Markov head {spec!r} cannot be built with arguments {args} ({e})") from None
    feature_size = int(getattr(markov, "feature_size", 0))
    confidence = None
    if dcfg.enable_confidence_head:
        uses_features = dcfg.confidence_head_with_markov and feature_size > 0
        confidence = ConfidenceHead(dcfg, feature_size if uses_features else 0, rngs=rngs, std=std, dtype=dtype)
    return markov, confidence


@dataclasses.dataclass(frozen=True)
class HeadStructure:
    """What a config says about its heads without any weights: graph definitions (static) and
    a ``ParamDecl`` per parameter, as pure dicts shaped like the heads' states (None: no head)."""

    markov_graphdef: Any
    confidence_graphdef: Any
    markov_decls: dict | None
    confidence_decls: dict | None


def _set_path(tree: dict, path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _split_params(module, spec: str):
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    other = [".".join(map(str, path)) for path, _ in nnx.to_flat_state(rest)]
    if other:
        raise PluginError(f"head {spec!r} holds state other than nnx.Param ({', '.join(other[:4])}); a head's "
                          "state must be its parameters (carry run-time state through initial_state / __call__)")
    return graphdef, params


def _decls_of(params, prefix: str) -> dict | None:
    """A ParamDecl per parameter: its own (built-in heads) or one named ``prefix.<path>``."""
    out: dict = {}
    for path, var in nnx.to_flat_state(params):
        decl = var.get_metadata().get("decl")
        if decl is None:
            shape = tuple(var.shape)
            decl = ParamDecl(shape, (None,) * len(shape), ".".join([prefix, *map(str, path)]))
        _set_path(out, path, decl)
    return out or None


@functools.lru_cache(maxsize=64)
def head_structure(dcfg) -> HeadStructure:
    """The heads of ``dcfg``, built abstractly once per config (configs are hashable)."""
    markov, confidence = nnx.eval_shape(lambda: build_heads(dcfg, nnx.Rngs(0)))
    m_graph, m_params = _split_params(markov, dcfg.head_type)
    c_graph, c_decls = None, None
    if confidence is not None:
        c_graph, c_params = _split_params(confidence, "confidence")
        c_decls = _decls_of(c_params, "confidence_head")
    return HeadStructure(m_graph, c_graph, _decls_of(m_params, "markov_head"), c_decls)


def init_heads(key: jax.Array, dcfg, dtype=jnp.float32, std: float = 0.02) -> tuple[dict | None, dict | None]:
    """Initial head states (pure dicts, None for a head without parameters / no head)."""
    markov, confidence = build_heads(dcfg, nnx.Rngs(params=key), std, dtype)
    pure = lambda m: nnx.to_pure_dict(_split_params(m, dcfg.head_type)[1]) or None
    return pure(markov), None if confidence is None else pure(confidence)


def merge_heads(dcfg, markov_state: dict | None, confidence_state: dict | None) -> tuple[MarkovHead, ConfidenceHead | None]:
    """The head modules of ``dcfg`` holding the given states (inside jit: tracers)."""
    s = head_structure(dcfg)
    markov = nnx.merge(s.markov_graphdef, markov_state or {})
    confidence = None if s.confidence_graphdef is None else nnx.merge(s.confidence_graphdef, confidence_state)
    return markov, confidence
