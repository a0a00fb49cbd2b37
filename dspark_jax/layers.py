"""The building blocks shared by the target and the drafter: one copy of each.

Weights keep heads and MLP columns as their own array axes (``q_proj [D, H, Dh]``,
``o_proj [H, Dh, D]``, ``gate_proj [D, F]``), so the same code runs unchanged under
``jax.shard_map`` with heads / MLP columns split over a ``model`` mesh axis; the only
tensor-parallel hook is ``tp_axis``, which sums the row-split projections across shards.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from .config import Qwen3Config, RopeConfig
from .params import ParamDecl


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecoderLayerParams:
    """Weights of Qwen3 decoder layers, stacked on a leading ``[layers]`` axis."""

    input_norm: jax.Array  # [L, D]
    q_proj: jax.Array  # [L, D, H, Dh]
    k_proj: jax.Array  # [L, D, K, Dh]
    v_proj: jax.Array  # [L, D, K, Dh]
    o_proj: jax.Array  # [L, H, Dh, D]
    q_norm: jax.Array  # [L, Dh]
    k_norm: jax.Array  # [L, Dh]
    post_norm: jax.Array  # [L, D]
    gate_proj: jax.Array  # [L, D, F]
    up_proj: jax.Array  # [L, D, F]
    down_proj: jax.Array  # [L, F, D]


def decoder_layer_decl(cfg: Qwen3Config, num_layers: int, prefix: str, attn_in: int | None = None,
                       per_layer: bool = False) -> DecoderLayerParams | tuple[DecoderLayerParams, ...]:
    """The declaration of ``num_layers`` stacked decoder layers whose checkpoint tensors are
    ``{prefix}.{i}.<Hugging Face name>``: shapes, logical axes, names, initialisers.
    ``attn_in`` is the width q/k/v project from (default hidden_size; Eagle-3: 2 x hidden).
    ``per_layer``: a tuple of one declaration per layer instead (each weight its own array:
    the decoding layout, see ``run_layers``)."""
    if per_layer:
        stacked = decoder_layer_decl(cfg, num_layers, prefix, attn_in)
        return tuple(jax.tree.map(lambda d, i=i: d.layer(i), stacked, is_leaf=lambda x: isinstance(x, ParamDecl))
                     for i in range(num_layers))
    L, D, H, K, Dh, F = (
        num_layers,
        cfg.hidden_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.intermediate_size,
    )
    A = attn_in or D

    def weight(hf_name, shape, axes, n_in=0, init="normal"):
        return ParamDecl((L, *shape), ("layers", *axes), f"{prefix}.{{layer}}.{hf_name}", n_in, init)

    return DecoderLayerParams(
        input_norm=weight("input_layernorm.weight", (D,), ("embed",), init="ones"),
        q_proj=weight("self_attn.q_proj.weight", (A, H, Dh), ("embed", "heads", "head_dim"), 1),
        k_proj=weight("self_attn.k_proj.weight", (A, K, Dh), ("embed", "kv_heads", "head_dim"), 1),
        v_proj=weight("self_attn.v_proj.weight", (A, K, Dh), ("embed", "kv_heads", "head_dim"), 1),
        o_proj=weight("self_attn.o_proj.weight", (H, Dh, D), ("heads", "head_dim", "embed"), 2),
        q_norm=weight("self_attn.q_norm.weight", (Dh,), ("head_dim",), init="ones"),
        k_norm=weight("self_attn.k_norm.weight", (Dh,), ("head_dim",), init="ones"),
        post_norm=weight("post_attention_layernorm.weight", (D,), ("embed",), init="ones"),
        gate_proj=weight("mlp.gate_proj.weight", (D, F), ("embed", "mlp"), 1),
        up_proj=weight("mlp.up_proj.weight", (D, F), ("embed", "mlp"), 1),
        down_proj=weight("mlp.down_proj.weight", (F, D), ("mlp", "embed"), 1),
    )


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, computed in float32 (as transformers does)."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def rope_inverse_frequencies(rope: RopeConfig, head_dim: int, max_positions: int) -> tuple[np.ndarray, float]:
    """Per-pair inverse frequencies ``[Dh/2]`` and the cos/sin scale, per rope type."""
    base = rope.theta
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim
    inv_freq = (1.0 / (base**exponents)).astype(np.float32)
    scale = 1.0
    if rope.rope_type == "proportional":
        # Gemma 4 global layers: the first partial_rotary_factor share of the pairs rotate with
        # the full head_dim's exponents; the rest get frequency 0 (cos 1, sin 0: they pass through)
        rotating = int(rope.partial_rotary_factor * head_dim // 2)
        inv_freq = np.where(np.arange(head_dim // 2) < rotating, inv_freq, 0.0).astype(np.float32) / rope.factor
    elif rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings or max_positions
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    elif rope.rope_type == "yarn":
        old_len = rope.original_max_position_embeddings or max_positions
        factor = rope.factor
        scale = rope.attention_factor
        if scale is None:
            scale = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0

        def correction_dim(rotations):
            return (head_dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
        if rope.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        extrapolation = 1 - ramp
        pos_freqs = base**exponents
        inv_freq = ((1 / (factor * pos_freqs)) * (1 - extrapolation) + (1 / pos_freqs) * extrapolation)
        inv_freq = inv_freq.astype(np.float32)
    return inv_freq, float(scale)


def rope_cos_sin(cfg: Qwen3Config, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin ``[..., Dh]`` for integer positions ``[...]`` (rotate-half layout)."""
    return rope_tables(cfg.rope, cfg.head_dim, cfg.max_position_embeddings, positions)


def rope_tables(rope: RopeConfig, head_dim: int, max_positions: int, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin ``[..., head_dim]`` of one rope type for integer positions ``[...]``."""
    inv_freq, scale = rope_inverse_frequencies(rope, head_dim, max_positions)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate ``x [B, T, heads, Dh]`` with ``cos, sin [B, T, Dh]``."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    x32 = x.astype(jnp.float32)
    out = x32 * cos[:, :, None, :] + rotated.astype(jnp.float32) * sin[:, :, None, :]
    return out.astype(x.dtype)


def tp_sum(x: jax.Array, tp_axis: str | None) -> jax.Array:
    """Sum partial results of row-split projections over the tensor-parallel axis."""
    return x if tp_axis is None else jax.lax.psum(x, tp_axis)


def layer_at(layers: DecoderLayerParams, i: int) -> DecoderLayerParams:
    return jax.tree.map(lambda a: a[i], layers)


def unstack_layers(layers):
    """Stacked layer weights ``[L, ...]`` as a tuple of ``L`` per-layer pytrees, each leaf its
    own array (a copy, made outside any jit: this is a layout, not a view)."""
    num = jax.tree.leaves(layers)[0].shape[0]
    return tuple(layer_at(layers, i) for i in range(num))


def stack_layers(layers):
    """The inverse of ``unstack_layers``: stacked ``[L, ...]`` weights (unchanged if stacked)."""
    if not isinstance(layers, tuple):
        return layers
    return jax.tree.map(lambda *a: jnp.stack(a), *layers)


PER_LAYER_MIN_BYTES = 16 << 20  # a layer's weights from which copying them per step costs more than branching


def per_layer_by_default(layer_bytes: int, platform: str | None = None) -> bool:
    """Whether decoding should hold layer weights one array per layer (``layer_bytes``: one
    layer's weights) on ``platform`` (default: JAX's default backend). On CPU, from 16 MiB a
    layer: there a scan over stacked weights copies each layer's slice before its dots
    (Qwen3-0.6B's 63 MB layers decode 1.4x faster per layer), while for small layers the
    copies are cheap and the branches are not (the embedded 3 MB layers: speculative decoding
    ~20% slower per layer). GPU and TPU fusions read a slice of the stack in place, and a
    ``lax.switch`` per layer would only add branches there (on GPU, a host read of the index)."""
    return (platform or jax.default_backend()) == "cpu" and layer_bytes >= PER_LAYER_MIN_BYTES


def layer_bytes(cfg: Qwen3Config, dtype) -> int:
    """Bytes of one decoder layer's weights in ``dtype``."""
    decl = decoder_layer_decl(cfg, 1, "model.layers")
    leaves = jax.tree.leaves(decl, is_leaf=lambda x: isinstance(x, ParamDecl))
    return sum(math.prod(d.shape) for d in leaves) * jnp.dtype(dtype).itemsize


@dataclasses.dataclass(frozen=True)
class LayerSwitch:
    """Layer ``index`` (traced) of per-layer weights ``layers`` (a tuple, ``unstack_layers``):
    what a layer-loop body gets in place of its weights. ``on_layer`` runs a function of the
    weights as a ``lax.switch`` whose branch l reads layer l's own arrays."""

    layers: tuple
    index: jax.Array


def on_layer(p, fn: Callable, *args):
    """``fn(weights, *args)`` for one layer's weights ``p``, or through a ``LayerSwitch``."""
    if not isinstance(p, LayerSwitch):
        return fn(p, *args)
    return jax.lax.switch(p.index, [functools.partial(fn, layer) for layer in p.layers], *args)


def run_layers(body, carry, layers, *xs):
    """``lax.scan(body, carry, (weights, *xs))`` over the layers: ``weights`` is each layer's
    slice of stacked weights ``[L, ...]``, or a ``LayerSwitch`` over a tuple of per-layer
    weights (``unstack_layers``). Returns ``(carry, outputs stacked on [L])``.

    Why two layouts: a scan body takes each layer's weights as a ``dynamic-slice`` of the
    stack, and XLA:CPU writes that slice out before every dot (``bench/bench_layer_loop.py``),
    so a weight-bound decode step reads every weight twice and writes it once. With per-layer
    weights the body's matrix products run inside ``lax.switch`` branches that read layer l's
    arrays where they lie; the loop stays a scan (one compiled body; the KV cache it reads is
    updated in place, which an unrolled Python loop over layers broke: XLA copied the cache).
    Decoding uses the per-layer layout; training keeps the stack."""
    if not isinstance(layers, tuple):
        return jax.lax.scan(body, carry, (layers, *xs))
    index = jnp.arange(len(layers), dtype=jnp.int32)
    return jax.lax.scan(lambda c, x: body(c, (LayerSwitch(layers, x[0]), *x[1:])), carry, (index, *xs))


def split_heads(h: jax.Array, w: jax.Array) -> jax.Array:
    """``h [..., D] @ w [D, N, Dh] -> [..., N, Dh]`` as one 2-D matrix product over the
    weight's contiguous ``[D, N * Dh]`` view. (A 3-axis einsum leaves XLA free to pick a
    weight layout, and XLA:CPU then copies whole weights before the dot: see ``merge_heads``.)"""
    D, N, Dh = w.shape
    return (h @ w.reshape(D, N * Dh)).reshape(*h.shape[:-1], N, Dh)


def merge_heads(out: jax.Array, w: jax.Array) -> jax.Array:
    """``out [..., N, Dh] @ w [N, Dh, D] -> [..., D]`` over the weight's ``[N * Dh, D]`` view.
    As the einsum ``"btnh,nhd->btd"`` XLA:CPU transposed every o_proj to ``[Dh, N, D]`` (a
    weight-sized copy per layer per decode step, ~13% of a Qwen3-0.6B step)."""
    N, Dh, D = w.shape
    return out.reshape(*out.shape[:-2], N * Dh) @ w.reshape(N * Dh, D)


def project_kv(p: DecoderLayerParams, cfg: Qwen3Config, h: jax.Array, cos, sin):
    """Keys (k_norm, then RoPE) and values for normed inputs ``h [B, T, D]`` of one layer."""
    k = rms_norm(split_heads(h, p.k_proj), p.k_norm, cfg.rms_norm_eps)
    v = split_heads(h, p.v_proj)
    return apply_rope(k, cos, sin), v


def project_q(p: DecoderLayerParams, cfg: Qwen3Config, h: jax.Array, cos, sin):
    q = rms_norm(split_heads(h, p.q_proj), p.q_norm, cfg.rms_norm_eps)
    return apply_rope(q, cos, sin)


AttendFn = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, object]]


def decoder_layer(
    p: DecoderLayerParams,
    cfg: Qwen3Config,
    x: jax.Array,
    cos: jax.Array,
    sin: jax.Array,
    attend: AttendFn,
    tp_axis: str | None = None,
    attn_input: jax.Array | None = None,
):
    """One Qwen3 decoder layer over ``x [B, T, D]``.

    ``attend(q, k, v) -> (out [B, T, H, Dh], aux)`` runs ``attention.attend`` with the
    caller's mask and context (the target's cache, the drafter's context + block, a packed
    batch) and returns whatever the caller keeps (``aux``, e.g. the chunk's keys/values for
    the cache). ``attn_input [B, T, A]`` replaces ``input_norm(x)`` as what q/k/v project
    from (Eagle-3: [input_norm(embedding) ; hidden_norm(x)]). Returns ``(x, aux)``.
    """
    q, k, v = on_layer(p, functools.partial(attention_inputs, cfg=cfg), x, cos, sin, attn_input)
    out, aux = attend(q, k, v)
    x = x + tp_sum(on_layer(p, lambda w, out: merge_heads(out, w.o_proj), out), tp_axis)
    return x + tp_sum(on_layer(p, functools.partial(mlp_partial, cfg=cfg), x), tp_axis), aux


def attention_inputs(p: DecoderLayerParams, x, cos, sin, attn_input=None, *, cfg: Qwen3Config):
    """q, k, v of one layer (q/k normed, RoPE applied) from ``x`` (or ``attn_input``)."""
    h = rms_norm(x, p.input_norm, cfg.rms_norm_eps) if attn_input is None else attn_input
    return (project_q(p, cfg, h, cos, sin), *project_kv(p, cfg, h, cos, sin))


def mlp_partial(p: DecoderLayerParams, x, *, cfg: Qwen3Config):
    """The post-norm MLP's output before the tensor-parallel sum."""
    h = rms_norm(x, p.post_norm, cfg.rms_norm_eps)
    return (jax.nn.silu(h @ p.gate_proj) * (h @ p.up_proj)) @ p.down_proj
