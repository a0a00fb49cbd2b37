"""The drafter's sequential heads as Flax NNX modules, and how a drafter builds them.

A **Markov head** (``MarkovHead``) maps the backbone hidden ``h_k [..., D]``, the previous
token ``x_{k-1} [...]`` and a carried state (any pytree; ``initial_state``) to a logit bias
``B_k [..., V]`` (float32, added to the base logits U_k) and the new state; ``features`` gives
what it shares with the confidence head (``[..., feature_size]``). A **confidence head** maps
``(h_k, x_{k-1}, features)`` to the logit of the drafted token's survival ``[...]``.

Built-in heads (DeepSpec's): ``none`` (DFlash), ``vanilla`` / ``gated`` / ``rnn``, and the
``linear`` confidence head (``ConfidenceHead``). Their weights are declared with
``params.ParamDecl`` (the DeepSpec checkpoint names ride along as variable metadata), so
loading and export follow from them. A new Markov head is a subclass of ``MarkovHead`` anywhere
importable, constructed as ``Head(dcfg, *, rngs, **head_args)`` and named by
``package.module:Name`` (``--head``); a new confidence head is an ``nnx.Module`` constructed as
``Head(dcfg, feature_size, *, rngs, **head_args)`` (``--confidence-head``). Both kinds live in
``plugins.Registry`` instances (``MARKOV_HEADS``, ``CONFIDENCE_HEADS``).

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


def _check_confidence_head(obj, spec):
    if not (isinstance(obj, type) and issubclass(obj, nnx.Module)):
        raise PluginError(f"confidence head {spec!r} is not a subclass of flax.nnx.Module (got {obj!r})")


# a confidence head maps (h_k [..., D], x_{k-1} [...], features [..., feature_size]) to a logit [...]
CONFIDENCE_HEADS = Registry("confidence head", {"linear": "dspark_jax.heads:ConfidenceHead"},
                            check=_check_confidence_head)


def _check_markov_head(obj, spec):
    if not (isinstance(obj, type) and issubclass(obj, MarkovHead)):
        raise PluginError(f"Markov head {spec!r} is not a subclass of dspark_jax.heads.MarkovHead (got {obj!r})")


MARKOV_HEADS = Registry("Markov head", {
    "none": "dspark_jax.heads:NoMarkovHead",
    "vanilla": "dspark_jax.heads:VanillaHead",
    "gated": "dspark_jax.heads:GatedHead",
    "rnn": "dspark_jax.heads:RnnHead",
}, check=_check_markov_head)


def _build(registry: Registry, spec: str, args, builtin, plugin):
    """``builtin(cls)`` for a built-in spec, else ``plugin(cls, **args)`` (a bad constructor: PluginError)."""
    cls = registry.resolve(spec)
    if registry.is_builtin(spec):
        return builtin(cls)
    args = dict(args)
    try:
        return plugin(cls, **args)
    except TypeError as e:
        raise PluginError(f"{registry.kind} {spec!r} cannot be built with arguments {args} ({e})") from None


def build_heads(dcfg, rngs: nnx.Rngs, std: float = 0.02, dtype=jnp.float32) -> tuple[MarkovHead, nnx.Module | None]:
    """The drafter's Markov head (``dcfg.head_type``) and confidence head
    (``dcfg.confidence_head_type``; or None), initialised.

    Built-in heads draw normal(std) weights in ``dtype``; plug-in heads are constructed as
    ``Head(dcfg, rngs=rngs, **dcfg.markov_head_args)`` and ``Head(dcfg, feature_size,
    rngs=rngs, **dcfg.confidence_head_args)`` with their own initialisers."""
    markov = _build(MARKOV_HEADS, dcfg.head_type, dcfg.markov_head_args,
                    lambda cls: cls(dcfg, rngs=rngs, std=std, dtype=dtype),
                    lambda cls, **args: cls(dcfg, rngs=rngs, **args))
    confidence = None
    if dcfg.enable_confidence_head:
        size = confidence_feature_size(dcfg, markov)
        confidence = _build(CONFIDENCE_HEADS, dcfg.confidence_head_type, dcfg.confidence_head_args,
                            lambda cls: cls(dcfg, size, rngs=rngs, std=std, dtype=dtype),
                            lambda cls, **args: cls(dcfg, size, rngs=rngs, **args))
    return markov, confidence


def confidence_feature_size(dcfg, markov: MarkovHead) -> int:
    """Width of the Markov head's features the confidence head reads (0: h_k only)."""
    return int(getattr(markov, "feature_size", 0)) if dcfg.confidence_head_with_markov else 0


def _check_confidence_call(dcfg, confidence, feature_size: int):
    """A plug-in confidence head called as ``head(h [2, D], x [2], features [2, F])`` returns
    logits ``[2]`` (run under ``nnx.eval_shape``: no arrays are computed)."""
    spec = dcfg.confidence_head_type
    try:
        out = confidence(jnp.zeros((2, dcfg.hidden_size)), jnp.zeros((2,), jnp.int32), jnp.zeros((2, feature_size)))
    except TypeError as e:
        raise PluginError(f"confidence head {spec!r} must be callable as head(hidden [..., D], prev_token [...], "
                          f"features [..., {feature_size}]) -> logit [...] ({e})") from None
    if getattr(out, "shape", None) != (2,):
        raise PluginError(f"confidence head {spec!r} returned {getattr(out, 'shape', type(out).__name__)} for hidden "
                          f"[2, {dcfg.hidden_size}]; expected one logit per position, shape (2,)")


def _checked_heads(dcfg):
    markov, confidence = build_heads(dcfg, nnx.Rngs(0))
    if confidence is not None and not CONFIDENCE_HEADS.is_builtin(dcfg.confidence_head_type):
        _check_confidence_call(dcfg, confidence, confidence_feature_size(dcfg, markov))
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
    markov, confidence = nnx.eval_shape(lambda: _checked_heads(dcfg))
    m_graph, m_params = _split_params(markov, dcfg.head_type)
    c_graph, c_decls = None, None
    if confidence is not None:
        c_graph, c_params = _split_params(confidence, dcfg.confidence_head_type)
        c_decls = _decls_of(c_params, "confidence_head")
    return HeadStructure(m_graph, c_graph, _decls_of(m_params, "markov_head"), c_decls)


def init_heads(key: jax.Array, dcfg, dtype=jnp.float32, std: float = 0.02) -> tuple[dict | None, dict | None]:
    """Initial head states (pure dicts, None for a head without parameters / no head)."""
    markov, confidence = build_heads(dcfg, nnx.Rngs(params=key), std, dtype)
    pure = lambda m, spec: nnx.to_pure_dict(_split_params(m, spec)[1]) or None
    return pure(markov, dcfg.head_type), None if confidence is None else pure(confidence, dcfg.confidence_head_type)


def merge_heads(dcfg, markov_state: dict | None, confidence_state: dict | None) -> tuple[MarkovHead, nnx.Module | None]:
    """The head modules of ``dcfg`` holding the given states (inside jit: tracers)."""
    s = head_structure(dcfg)
    markov = nnx.merge(s.markov_graphdef, markov_state or {})
    confidence = None if s.confidence_graphdef is None else nnx.merge(s.confidence_graphdef, confidence_state)
    return markov, confidence
