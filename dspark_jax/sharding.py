"""Tensor-parallel (and data-parallel) target forward with ``jax.shard_map``.

Megatron-style over a ``model`` mesh axis: q/k/v heads and MLP columns are split, o_proj and
down_proj rows are split and summed with one ``psum`` each per layer (``layers.tp_sum``). The
KV cache is split by kv heads over ``model`` and by batch over ``data``.

Embedding and lm_head are replicated: sampling needs complete logits on every shard, and a
vocab-parallel head would add an all-gather of ``[B, T, V]`` per call to save memory that a
Qwen3-4B head (0.8 GB in bfloat16) does not need saved. The drafter stays replicated: it is
small, and a collective per Markov step would cost more than it saves.

KV heads fewer than the model axis: each kv head is repeated ``model / kv_heads`` times
(``expand_kv_heads``) so shard i holds the one kv head its query heads use; this needs
``model % kv_heads == 0``. Anything else that does not divide is refused with a clear error.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .cache import KVCache
from .config import Qwen3Config
from .params import partition_specs
from .target import Qwen3Params, target_decl

DATA, MODEL = "data", "model"


def make_mesh(model: int = 1, data: int = 1, devices=None) -> Mesh:
    """A ``(data, model)`` mesh over the first data*model devices of any backend."""
    devices = list(jax.devices() if devices is None else devices)
    need = data * model
    if need < 1 or need > len(devices):
        raise ValueError(f"mesh data={data} x model={model} needs {need} devices, {len(devices)} available")
    return Mesh(np.asarray(devices[:need]).reshape(data, model), (DATA, MODEL))


def kv_replication(cfg: Qwen3Config, model: int) -> int:
    """How many times each kv head is repeated so kv heads split evenly over ``model``."""
    if getattr(cfg, "family", "qwen3") != "qwen3":
        raise ValueError(f"tensor parallelism (a mesh) is not supported for {cfg.family} targets yet; run without --tp / mesh")
    H, K = cfg.num_attention_heads, cfg.num_key_value_heads
    if H % model:
        raise ValueError(f"num_attention_heads={H} is not divisible by the model axis size {model}")
    if cfg.intermediate_size % model:
        raise ValueError(f"intermediate_size={cfg.intermediate_size} is not divisible by the model axis size {model}")
    if K % model == 0:
        return 1
    if model % K == 0:
        return model // K
    raise ValueError(
        f"num_key_value_heads={K} and model axis size {model}: one must divide the other "
        f"(kv heads are split when divisible, replicated when fewer)"
    )


def sharded_config(cfg: Qwen3Config, model: int) -> Qwen3Config:
    """The config whose kv head count matches the expanded (replicated) kv weights."""
    rep = kv_replication(cfg, model)
    return dataclasses.replace(cfg, num_key_value_heads=cfg.num_key_value_heads * rep)


def expand_kv_heads(params: Qwen3Params, cfg: Qwen3Config, model: int) -> Qwen3Params:
    """Repeat k_proj / v_proj / kv heads so they split evenly (identity when they already do).
    Repeating kv head j next to itself keeps query head h's kv head at h // (H / K')."""
    rep = kv_replication(cfg, model)
    if rep == 1:
        return params
    layers = dataclasses.replace(
        params.layers,
        k_proj=jnp.repeat(params.layers.k_proj, rep, axis=2),
        v_proj=jnp.repeat(params.layers.v_proj, rep, axis=2),
    )
    return dataclasses.replace(params, layers=layers)


# Logical axes (``params.ParamDecl.axes``) -> mesh axes; any axis not named is replicated.
TENSOR_PARALLEL_RULES = {"heads": MODEL, "kv_heads": MODEL, "mlp": MODEL}


def param_specs(cfg: Qwen3Config) -> Qwen3Params:
    """The target's partition specs, from its declaration and the rule table."""
    return partition_specs(target_decl(cfg), TENSOR_PARALLEL_RULES)


def target_shardings(cfg: Qwen3Config, mesh: Mesh) -> Qwen3Params:
    """Where each weight of a loaded target goes on ``mesh``: heads and MLP columns split
    over ``model``. When kv heads are fewer than the model axis, k/v projections stay whole
    (replicated) here; ``shard_target`` repeats them to the split layout on the devices."""
    kv_split = kv_replication(cfg, mesh.shape[MODEL]) == 1
    rules = TENSOR_PARALLEL_RULES if kv_split else {**TENSOR_PARALLEL_RULES, "kv_heads": None}
    specs = partition_specs(target_decl(cfg), rules)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


CACHE_SPEC = KVCache(k=P(None, DATA, None, MODEL, None), v=P(None, DATA, None, MODEL, None), lengths=P(DATA))


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


def cache_sharding(mesh: Mesh) -> KVCache:
    """The ``NamedSharding`` of each cache array, as a ``KVCache`` of shardings."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), CACHE_SPEC, is_leaf=lambda x: isinstance(x, P))


def constrain_cache(cache: KVCache, mesh: Mesh | None) -> KVCache:
    """Keep a cache created inside a jitted loop laid out as the sharded forward wants it."""
    if mesh is None:
        return cache
    return jax.tree.map(lambda a, s: jax.lax.with_sharding_constraint(a, NamedSharding(mesh, s)), cache, CACHE_SPEC)


def check_batch(batch: int, mesh: Mesh | None):
    if mesh is not None and batch % mesh.shape[DATA]:
        raise ValueError(f"batch {batch} is not divisible by the data axis size {mesh.shape[DATA]}")


def sharded_forward(mesh: Mesh, params: Qwen3Params, cfg: Qwen3Config, tokens, cache: KVCache, *, feature_layers=(), with_logits=True):
    """``target.forward`` under ``jax.shard_map``: same arguments and results, heads and MLP
    columns split over ``model``, batch over ``data``. Outputs come back complete."""
    from .target import ForwardOutput, forward

    def local(params, tokens, cache):
        return forward(params, cfg, tokens, cache, feature_layers=feature_layers, with_logits=with_logits, tp_axis=MODEL)

    out_spec = ForwardOutput(hidden=P(DATA), features=P(DATA), logits=P(DATA) if with_logits else None)
    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(param_specs(cfg), P(DATA), CACHE_SPEC),
        out_specs=(out_spec, CACHE_SPEC),
        check_vma=False,
    )
    return fn(params, tokens, cache)


def sharded_forward_packed(mesh: Mesh, params: Qwen3Params, cfg: Qwen3Config, tokens, seq_ids, slots, cache: KVCache, *, chunk_len: int, feature_layers=()):
    """``target.forward_packed`` under ``jax.shard_map`` (tensor parallel only): the packed
    token axis mixes sequences, so it is replicated, and the cache is split by kv heads."""
    from .target import ForwardOutput, forward_packed

    if mesh.shape[DATA] != 1:
        raise ValueError("packed verification shards the model axis only: use a mesh with data=1")

    def local(params, tokens, seq_ids, slots, cache):
        return forward_packed(params, cfg, tokens, seq_ids, slots, cache, chunk_len=chunk_len,
                              feature_layers=feature_layers, tp_axis=MODEL)

    cache_spec = KVCache(k=P(None, None, None, MODEL, None), v=P(None, None, None, MODEL, None), lengths=P())
    new_kv_spec = P(None, None, MODEL, None)  # [L, N, kv_heads, Dh]
    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(param_specs(cfg), P(), P(), P(), cache_spec),
        out_specs=(ForwardOutput(hidden=P(), features=P(), logits=P()), (new_kv_spec, new_kv_spec)),
        check_vma=False,
    )
    return fn(params, tokens, seq_ids, slots, cache)
