"""Parameter declarations: each weight is declared once, everything else follows from it.

A declaration (``ParamDecl``) holds a weight's shape in our layout, its logical axes, its
checkpoint name and its initialiser. A model's declaration is its parameter pytree with a
``ParamDecl`` at every leaf (``layers.decoder_layer_decl``, ``target.target_decl``,
``draft.draft_decl``); from it come random init (``init_tree``), abstract shapes for
``jax.eval_shape`` / orbax (``abstract_tree``), shardings (``partition_specs`` with a
logical-axis -> mesh-axis rule table) and the checkpoint's tensor names and shapes
(``checkpoint_tensors``), so loading, export, sharding and init cannot drift apart.

Checkpoint layout: Hugging Face stores linear weights ``[out, in]`` with heads fused into one
axis; we keep heads as their own axis (``q_proj [D, H, Dh]``). ``n_in`` is the number of
leading "input" axes of our layout: ``hf = ours.reshape(prod(shape[:n_in]), -1).T``.
A name with ``{layer}`` in it is one checkpoint tensor per index of the leading (layers) axis
(checkpoint layer i, or ``layer_ids[i]`` for a stack of non-consecutive layers).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

INITIALISERS = ("normal", "ones", "zeros")


@dataclasses.dataclass(frozen=True)
class ParamDecl:
    """One weight: shape (our layout), logical axes, checkpoint name, initialiser."""

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    name: str  # checkpoint name; "{layer}" = one tensor per index of the leading axis
    n_in: int = 0  # leading input axes (per tensor): hf = ours.reshape(prod(shape[:n_in]), -1).T
    init: str = "normal"
    hf_shape_override: tuple[int, ...] | None = None  # a checkpoint shape the rule above does not give
    layer_ids: tuple[int, ...] | None = None  # the checkpoint layer of each index of the leading axis (default: i)

    def __post_init__(self):
        if len(self.axes) != len(self.shape):
            raise ValueError(f"{self.name}: {len(self.axes)} axes for shape {self.shape}")
        if self.init not in INITIALISERS:
            raise ValueError(f"{self.name}: unknown initialiser {self.init!r}")
        if self.stacked and self.axes[0] != "layers":
            raise ValueError(f"{self.name}: a per-layer name needs a leading 'layers' axis")
        if self.layer_ids is not None and (not self.stacked or len(self.layer_ids) != self.shape[0]):
            raise ValueError(f"{self.name}: layer_ids {self.layer_ids} for a leading axis of {self.shape[:1]}")

    @property
    def stacked(self) -> bool:
        return "{layer}" in self.name

    @property
    def num_tensors(self) -> int:
        return self.shape[0] if self.stacked else 1

    @property
    def tensor_shape(self) -> tuple[int, ...]:
        """Our shape of one checkpoint tensor (one layer's, for a stacked weight)."""
        return tuple(self.shape[1:]) if self.stacked else tuple(self.shape)

    @property
    def hf_shape(self) -> tuple[int, ...]:
        """The shape of one checkpoint tensor."""
        if self.hf_shape_override is not None:
            return tuple(self.hf_shape_override)
        s = self.tensor_shape
        if self.n_in == 0:
            return s
        return (math.prod(s[self.n_in:]), math.prod(s[: self.n_in]))

    def tensor_name(self, layer: int | None = None) -> str:
        """The checkpoint name of index ``layer`` of the leading axis (of the weight, unstacked)."""
        if not self.stacked:
            return self.name
        return self.name.format(layer=layer if self.layer_ids is None else self.layer_ids[layer])

    def layer(self, i: int) -> "ParamDecl":
        """The declaration of index ``i`` of a stacked weight's leading axis on its own."""
        if not self.stacked:
            raise ValueError(f"{self.name}: not a per-layer weight")
        return dataclasses.replace(self, shape=self.tensor_shape, axes=tuple(self.axes[1:]), name=self.tensor_name(i),
                                   layer_ids=None)

    def tensor_names(self) -> list[str]:
        return [self.tensor_name(i) for i in range(self.num_tensors)] if self.stacked else [self.name]

    def to_hf(self, weight: np.ndarray) -> np.ndarray:
        """One tensor in our layout -> the checkpoint's layout."""
        if self.n_in == 0:
            return weight.reshape(self.hf_shape)
        return weight.reshape(math.prod(weight.shape[: self.n_in]), -1).T

    def from_hf(self, weight: np.ndarray) -> np.ndarray:
        """One checkpoint tensor -> our layout."""
        return weight.reshape(self.tensor_shape) if self.n_in == 0 else weight.T.reshape(self.tensor_shape)


def is_decl(x) -> bool:
    return isinstance(x, ParamDecl)


def decl_leaves(tree) -> list[ParamDecl]:
    return jax.tree.leaves(tree, is_leaf=is_decl)


def map_decls(fn, tree, *rest):
    """``jax.tree.map`` over the declarations of ``tree`` (and matching leaves of ``rest``)."""
    return jax.tree.map(fn, tree, *rest, is_leaf=is_decl)


def init_param(key: jax.Array | None, decl: ParamDecl, dtype=jnp.float32, std: float = 0.02) -> jax.Array:
    """normal(std) drawn in float32 then cast; ones / zeros in ``dtype``."""
    if decl.init == "ones":
        return jnp.ones(decl.shape, dtype)
    if decl.init == "zeros":
        return jnp.zeros(decl.shape, dtype)
    return (std * jax.random.normal(key, decl.shape, jnp.float32)).astype(dtype)


def init_tree(key: jax.Array, tree, dtype=jnp.float32, std: float = 0.02):
    """Random weights for every declaration of ``tree``, one key per leaf (in leaf order)."""
    keys = iter(jax.random.split(key, len(decl_leaves(tree))))
    return map_decls(lambda d: init_param(next(keys), d, dtype, std), tree)


def abstract_tree(tree, dtype, shardings=None):
    """``jax.ShapeDtypeStruct`` per declaration (with its sharding when given): what
    ``jax.eval_shape`` of the init returns, and what orbax restores into."""
    if shardings is None:
        return map_decls(lambda d: jax.ShapeDtypeStruct(d.shape, dtype), tree)
    return map_decls(lambda d, s: jax.ShapeDtypeStruct(d.shape, dtype, sharding=s), tree, shardings)


def partition_specs(tree, rules: Mapping[str, str | None]):
    """A ``PartitionSpec`` per declaration: each logical axis through the rule table
    (axes the table does not name are replicated)."""
    return map_decls(lambda d: P(*(rules.get(a) if a else None for a in d.axes)), tree)


def checkpoint_tensors(tree) -> dict[str, tuple[int, ...]]:
    """Every checkpoint tensor the declarations ask for: name -> shape."""
    return {name: d.hf_shape for d in decl_leaves(tree) for name in d.tensor_names()}


def export_tensors(decls, params, dtype=None) -> list[tuple[str, tuple[int, ...], np.dtype, Any]]:
    """``(name, shape, dtype, make)`` per checkpoint tensor: ``make()`` is the tensor in the
    checkpoint's layout (numpy, cast to ``dtype`` when given), made only when called."""
    decl_list, arrays = decl_leaves(decls), jax.tree.leaves(params)
    if len(decl_list) != len(arrays):
        raise ValueError(f"{len(arrays)} parameter arrays for {len(decl_list)} declared weights")

    def maker(decl, array, layer):
        def make():
            w = np.asarray(array if layer is None else array[layer])
            return np.ascontiguousarray(decl.to_hf(w if dtype is None else w.astype(dtype)))

        return make

    out = []
    for decl, array in zip(decl_list, arrays):
        if tuple(array.shape) != decl.shape:
            raise ValueError(f"{decl.name}: array of shape {tuple(array.shape)}, declared {decl.shape}")
        out_dtype = np.dtype(array.dtype if dtype is None else dtype)
        for i in range(decl.num_tensors):
            layer = i if decl.stacked else None
            out.append((decl.tensor_name(layer), decl.hf_shape, out_dtype, maker(decl, array, layer)))
    return out
