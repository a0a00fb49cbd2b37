"""Tensor-parallel (and data-parallel) target forward with ``jax.shard_map``.

Megatron-style over a ``model`` mesh axis: q/k/v heads and MLP columns are split, o_proj and
down_proj rows are split and summed with one ``psum`` each per layer (``layers.tp_sum``). The
KV cache is split by kv heads over ``model`` and by batch over ``data``. Gemma 4 targets shard
the same way: every weight's logical axes come from its declaration (``gemma4.target_decl``),
whatever the layer geometry, and its cache's key/value stacks have the same layout.

Embedding and lm_head are replicated: sampling needs complete logits on every shard, and a
vocab-parallel head would add an all-gather of ``[B, T, V]`` per call to save memory that a
Qwen3-4B head (0.8 GB in bfloat16) does not need saved. The drafter stays replicated: it is
small, and a collective per Markov step would cost more than it saves.

KV heads fewer than the model axis: each kv head is repeated ``model / kv_heads`` times
(``expand_kv_heads``) so shard i holds the one kv head its query heads use; this needs
``model % kv_heads == 0``, per kv head count (Gemma 4: sliding and full layers apart).
Anything else that does not divide is refused with a clear error.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .config import Qwen3Config
from .params import map_decls, partition_specs
from .target import Qwen3Params, family_of, target_decl

DATA, MODEL = "data", "model"


def make_mesh(model: int = 1, data: int = 1, devices=None) -> Mesh:
    """A ``(data, model)`` mesh over the first data*model devices of any backend."""
    devices = list(jax.devices() if devices is None else devices)
    need = data * model
    if need < 1 or need > len(devices):
        raise ValueError(f"mesh data={data} x model={model} needs {need} devices, {len(devices)} available")
    return Mesh(np.asarray(devices[:need]).reshape(data, model), (DATA, MODEL))


def kv_head_replication(kv_heads: int, model: int, field: str = "kv heads") -> int:
    """How many times each of ``kv_heads`` heads is repeated so they split evenly over ``model``."""
    if kv_heads % model == 0:
        return 1
    if model % kv_heads == 0:
        return model // kv_heads
    raise ValueError(
        f"{field}={kv_heads} and model axis size {model}: one must divide the other "
        f"(kv heads are split when divisible, replicated when fewer)"
    )


def kv_head_fields(cfg: Qwen3Config) -> tuple[str, ...]:
    """The config fields holding a kv head count, one per attention geometry (Gemma 4: sliding
    and full layers)."""
    if family_of(cfg) is not None:
        return ("num_key_value_heads", "num_global_key_value_heads")
    return ("num_key_value_heads",)


def kv_replication(cfg: Qwen3Config, model: int) -> dict[str, int]:
    """Per kv head count field (``kv_head_fields``): how many times each kv head is repeated so
    they split evenly over ``model``. Query heads and MLP columns must divide."""
    H = cfg.num_attention_heads
    if H % model:
        raise ValueError(f"num_attention_heads={H} is not divisible by the model axis size {model}")
    if cfg.intermediate_size % model:  # Gemma 4's double-wide MLPs are twice as wide: they divide too
        raise ValueError(f"intermediate_size={cfg.intermediate_size} is not divisible by the model axis size {model}")
    return {f: kv_head_replication(getattr(cfg, f), model, f) for f in kv_head_fields(cfg)}


def sharded_config(cfg: Qwen3Config, model: int) -> Qwen3Config:
    """The config whose kv head counts match the expanded (replicated) kv weights."""
    return dataclasses.replace(cfg, **{f: getattr(cfg, f) * rep for f, rep in kv_replication(cfg, model).items()})


def expand_kv_heads(params: Qwen3Params, cfg: Qwen3Config, model: int) -> Qwen3Params:
    """Repeat the kv heads of every weight with a ``kv_heads`` axis (k_proj / v_proj, of any
    layer geometry) so they split evenly (identity where they already do). Repeating kv head
    j next to itself keeps query head h's kv head at h // (H / K')."""
    kv_replication(cfg, model)  # shapes that cannot split are refused before anything moves

    def expand(decl, a):
        if "kv_heads" not in decl.axes:
            return a
        axis = decl.axes.index("kv_heads")
        rep = kv_head_replication(decl.shape[axis], model)
        return a if rep == 1 else jnp.repeat(a, rep, axis=axis)

    return map_decls(expand, target_decl(cfg), params)


# Logical axes (``params.ParamDecl.axes``) -> mesh axes; any axis not named is replicated.
TENSOR_PARALLEL_RULES = {"heads": MODEL, "kv_heads": MODEL, "mlp": MODEL}


def param_specs(cfg: Qwen3Config) -> Qwen3Params:
    """The target's partition specs, from its declaration and the rule table."""
    return partition_specs(target_decl(cfg), TENSOR_PARALLEL_RULES)


def target_shardings(cfg: Qwen3Config, mesh: Mesh) -> Qwen3Params:
    """Where each weight of a loaded target goes on ``mesh``: heads and MLP columns split
    over ``model``. Kv heads fewer than the model axis stay whole (replicated) here, weight by
    weight (Gemma 4's sliding and full layers differ); ``shard_target`` repeats them to the
    split layout on the devices."""
    model = mesh.shape[MODEL]
    kv_replication(cfg, model)

    def spec(decl):
        return P(*(None if a == "kv_heads" and n % model else TENSOR_PARALLEL_RULES.get(a) if a else None
                   for a, n in zip(decl.axes, decl.shape)))

    return map_decls(lambda d: NamedSharding(mesh, spec(d)), target_decl(cfg))


def cache_spec(cache, data: str | None = DATA):
    """The partition spec of each array of a target cache (``KVCache``, ``gemma4.Gemma4Cache``):
    keys/values ``[L, B, S, K, Dh]`` split by batch over ``data`` and by kv heads over ``model``,
    lengths ``[B]`` by batch."""
    return jax.tree.map(lambda a: P(None, data, None, MODEL, None) if a.ndim == 5 else P(data), cache)


def shard_target(params: Qwen3Params, cfg: Qwen3Config, mesh: Mesh) -> tuple[Qwen3Params, Qwen3Config]:
    """Expand kv heads if needed and place the weights on the mesh. Returns (params, config)
    to use with this mesh (the config carries the expanded kv head count)."""
    model = mesh.shape[MODEL]
    params = expand_kv_heads(params, cfg, model)
    scfg = sharded_config(cfg, model)
    # arrays loaded with target_shardings are already in place: device_put leaves them as they are
    params = jax.tree.map(lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), params, param_specs(scfg),
                          is_leaf=lambda x: isinstance(x, P))
    return params, scfg


def cache_sharding(cache, mesh: Mesh):
    """The ``NamedSharding`` of each array of ``cache`` (a cache of shardings)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), cache_spec(cache), is_leaf=lambda x: isinstance(x, P))


def constrain_cache(cache, mesh: Mesh | None):
    """Keep a cache created inside a jitted loop laid out as the sharded forward wants it."""
    if mesh is None:
        return cache
    return jax.tree.map(lambda a, s: jax.lax.with_sharding_constraint(a, NamedSharding(mesh, s)), cache,
                        cache_spec(cache))


def check_batch(batch: int, mesh: Mesh | None):
    if mesh is not None and batch % mesh.shape[DATA]:
        raise ValueError(f"batch {batch} is not divisible by the data axis size {mesh.shape[DATA]}")


def sharded_forward(mesh: Mesh, params: Qwen3Params, cfg: Qwen3Config, tokens, cache, *, feature_layers=(), with_logits=True):
    """``target.forward`` under ``jax.shard_map``: same arguments and results, heads and MLP
    columns split over ``model``, batch over ``data``. Outputs come back complete."""
    from .target import ForwardOutput, forward

    def local(params, tokens, cache):
        return forward(params, cfg, tokens, cache, feature_layers=feature_layers, with_logits=with_logits, tp_axis=MODEL)

    out_spec = ForwardOutput(hidden=P(DATA), features=P(DATA), logits=P(DATA) if with_logits else None)
    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(param_specs(cfg), P(DATA), cache_spec(cache)),
        out_specs=(out_spec, cache_spec(cache)),
        check_vma=False,
    )
    return fn(params, tokens, cache)


def sharded_forward_packed(mesh: Mesh, params: Qwen3Params, cfg: Qwen3Config, tokens, seq_ids, slots, cache, *, chunk_len: int, feature_layers=()):
    """``target.forward_packed`` under ``jax.shard_map`` (tensor parallel only): the packed
    token axis mixes sequences, so it is replicated, and the cache is split by kv heads."""
    from .target import ForwardOutput, forward_packed

    if mesh.shape[DATA] != 1:
        raise ValueError("packed verification shards the model axis only: use a mesh with data=1")

    def local(params, tokens, seq_ids, slots, cache):
        return forward_packed(params, cfg, tokens, seq_ids, slots, cache, chunk_len=chunk_len,
                              feature_layers=feature_layers, tp_axis=MODEL)

    new_kv_spec = P(None, None, MODEL, None)  # [L, N, kv_heads, Dh] (Gemma 4: per layer type)
    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(param_specs(cfg), P(), P(), P(), cache_spec(cache, data=None)),
        out_specs=(ForwardOutput(hidden=P(), features=P(), logits=P()), (new_kv_spec, new_kv_spec)),
        check_vma=False,
    )
    return fn(params, tokens, seq_ids, slots, cache)
