"""Training with optax and orbax: drafters (DSpark, DFlash) against a frozen target, and small
Qwen3 target LMs.

Draft step (spec section 3): the frozen target gives features at ``target_layer_ids`` and its
final hidden states (online, inside the step, or precomputed); up to ``num_anchors`` anchors per
sequence are sampled among positions whose token and next token are in the loss mask; the
blocks are packed into one draft forward whose mask lets block b read context positions < its
anchor and its own block; the Markov and confidence heads run teacher-forced. Loss =
ce * CE + l1 * ||q - p||_1 + conf * BCE(c, 1 - TV), each a w-weighted mean over supervised slots
(w_k = exp(-k / decay)). Only the drafter's parameters receive gradients: the embedding and
lm_head belong to the target and stay frozen by construction.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from . import draft as draft_model
from .attention import AttentionMask
from . import target as target_model
from .config import Qwen3Config
from .draft import DraftConfig, DraftParams
from .plugins import PluginError, Registry
from .validate import UsageError
from .target import Qwen3Params


# ---------------------------------------------------------------------------- optimiser


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 6e-4
    warmup_fraction: float = 0.04
    total_steps: int = 1000
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.95
    end_lr_fraction: float = 0.1


def make_optimizer(oc: OptimConfig) -> optax.GradientTransformation:
    """AdamW with linear warmup + cosine decay and global-norm clipping."""
    warmup = max(1, int(oc.warmup_fraction * oc.total_steps))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=oc.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(oc.total_steps, warmup + 1),
        end_value=oc.learning_rate * oc.end_lr_fraction,
    )
    return optax.chain(
        optax.clip_by_global_norm(oc.clip_norm),
        optax.adamw(schedule, b1=oc.b1, b2=oc.b2, weight_decay=oc.weight_decay),
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    params: Any
    opt_state: Any
    step: jax.Array  # [] int32


def init_train_state(params, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))


def apply_gradients(state: TrainState, grads, optimizer: optax.GradientTransformation) -> TrainState:
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    return TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1)


# ---------------------------------------------------------------------------- target LM


def lm_loss(params: Qwen3Params, cfg: Qwen3Config, tokens: jax.Array, loss_mask: jax.Array | None = None, remat=False):
    """Mean next-token cross-entropy of ``tokens [B, S]`` (targets tokens[:, 1:])."""
    out, _ = target_model.forward(params, cfg, tokens[:, :-1], None, remat=remat)
    logp = jax.nn.log_softmax(out.logits, -1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    mask = jnp.ones_like(nll) if loss_mask is None else loss_mask[:, 1:].astype(nll.dtype)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


@functools.partial(jax.jit, static_argnames=("cfg", "optimizer", "remat"), donate_argnames=("state",))
def target_train_step(state: TrainState, tokens: jax.Array, *, cfg: Qwen3Config, optimizer, remat: bool = False):
    loss, grads = jax.value_and_grad(lm_loss)(state.params, cfg, tokens, None, remat)
    return apply_gradients(state, grads, optimizer), {"loss": loss, "grad_norm": optax.tree.norm(grads)}


@functools.partial(jax.jit, static_argnames=("cfg",))
def target_eval_loss(params, tokens, *, cfg: Qwen3Config):
    return lm_loss(params, cfg, tokens)


# ---------------------------------------------------------------------------- draft: anchors and packing


def valid_anchor_mask(loss_mask: jax.Array) -> jax.Array:
    """Positions whose own token and next token are in the loss mask ``[B, S]``."""
    m = loss_mask.astype(bool)
    return jnp.concatenate([m[:, :-1] & m[:, 1:], jnp.zeros_like(m[:, :1])], axis=1)


def sample_anchors(key: jax.Array, loss_mask: jax.Array, num_anchors: int) -> tuple[jax.Array, jax.Array]:
    """Up to ``num_anchors`` distinct valid anchors per sequence, uniformly, sorted ascending.

    Returns anchors ``[B, n]`` and keep ``[B, n]``; when a sequence has fewer valid positions than
    ``num_anchors`` the extra slots have keep = False (and point at position 0)."""
    valid = valid_anchor_mask(loss_mask)
    n = min(num_anchors, loss_mask.shape[1])
    score = jnp.where(valid, jax.random.uniform(key, valid.shape), -1.0)
    top, idx = jax.lax.top_k(score, n)
    keep = top >= 0
    anchors = jnp.where(keep, idx, jnp.iinfo(jnp.int32).max)
    order = jnp.argsort(anchors, axis=-1)
    anchors = jnp.take_along_axis(anchors, order, -1)
    keep = jnp.take_along_axis(keep, order, -1)
    return jnp.where(keep, anchors, 0).astype(jnp.int32), keep


def training_attention_mask(anchors: jax.Array, keep: jax.Array, block: int) -> AttentionMask:
    """Packed training blocks ``[B, n*K]``: block j sits at positions anchor_j + 0..K-1, reads
    the context before its anchor and its own block (bidirectional), nothing of other blocks.
    A block that is not kept reads nothing (its rows come out as DeepSpec's: a uniform
    average) and the loss ignores it."""
    B, n = anchors.shape
    q_pos = (anchors[..., None] + jnp.arange(block)).reshape(B, n * block)
    context_len = jnp.repeat(jnp.where(keep, anchors, 0), block, axis=1)
    segment = jnp.repeat(jnp.where(keep, jnp.arange(n)[None, :], -1), block, axis=1)
    return AttentionMask.make(q_pos, context_len=context_len, segment=segment, causal=False)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DraftTrainOutput:
    draft_logits: jax.Array  # [B, n, K, V] teacher-forced, Markov bias included
    aligned_target_logits: jax.Array  # [B, n, K, V]
    confidence_logits: jax.Array  # [B, n, K]
    target_ids: jax.Array  # [B, n, K]
    eval_mask: jax.Array  # [B, n, K] bool: supervised slots (contiguous prefix)
    hidden: jax.Array  # [B, n*K, D] final-normed block hidden
    layer_out: jax.Array  # [L, B, n*K, D]


def draft_training_forward(
    params: DraftParams,
    dcfg: DraftConfig,
    target: Qwen3Params,
    tokens: jax.Array,
    loss_mask: jax.Array,
    features: jax.Array,
    last_hidden: jax.Array,
    anchors: jax.Array,
    keep: jax.Array,
) -> DraftTrainOutput:
    """Packed blocks at ``anchors [B, n]`` over sequences ``tokens [B, S]`` with target
    ``features [B, S, m*D]`` and final hidden ``last_hidden [B, S, D]``."""
    B, S = tokens.shape
    K = dcfg.block_size
    n = anchors.shape[1]
    k = jnp.arange(K)
    block_tokens = jnp.where(k == 0, jnp.take_along_axis(tokens, anchors, 1)[..., None], dcfg.mask_token_id)
    ctx_positions = jnp.broadcast_to(jnp.arange(S), (B, S))
    ctx_k, ctx_v = draft_model.context_kv(params, dcfg, features, ctx_positions)
    mask = training_attention_mask(anchors, keep, K)
    x = target_model.embed_tokens(target, block_tokens.reshape(B, n * K))
    # the whole context is live in training: the dense backend (differentiable, no loop)
    backend = "dense" if dcfg.layers.attention_backend == "auto" else dcfg.layers.attention_backend
    hidden, layer_out = draft_model.draft_layers(params, dcfg, x, mask, ctx_k, ctx_v, backend)

    label_pos = anchors[..., None] + k + 1  # [B, n, K]
    label_idx = jnp.minimum(label_pos, S - 1)
    target_ids = jnp.take_along_axis(tokens, label_idx.reshape(B, -1), 1).reshape(B, n, K)
    prev_tokens = jnp.concatenate([block_tokens[..., :1], target_ids[..., :-1]], -1)
    hidden4 = hidden.reshape(B, n, K, -1)
    base_logits = target_model.compute_logits(target, hidden4)
    draft_logits, conf = draft_model.teacher_forced_heads(params, dcfg, base_logits, hidden4, prev_tokens)
    aligned_hidden = jnp.take_along_axis(last_hidden, (label_idx - 1).reshape(B, -1)[..., None], 1)
    aligned = target_model.compute_logits(target, aligned_hidden).reshape(B, n, K, -1)
    in_mask = jnp.take_along_axis(loss_mask.astype(bool), label_idx.reshape(B, -1), 1).reshape(B, n, K)
    supervised = (label_pos < S) & in_mask & keep[..., None]
    eval_mask = jnp.cumprod(supervised, axis=-1).astype(bool)
    return DraftTrainOutput(draft_logits, aligned, conf, target_ids, eval_mask, hidden, layer_out)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """DeepSpec's three weights, the position decay, and plug-in terms ``((import path, weight), ...)``.

    A plug-in loss term is ``fn(draft_logits [B, n, K, V], target_probs [B, n, K, V],
    confidence_logits [B, n, K], supervision_mask [B, n, K] (float, 1 = supervised slot),
    position_weights [B, n, K] (mask * exp(-k / decay_gamma))) -> scalar``; DeepSpec's terms are
    ``sum(w * term) / sum(w)``. The loss adds ``weight * fn(...)``."""

    ce: float = 0.1
    l1: float = 0.9
    confidence: float = 1.0
    decay_gamma: float = 4.0
    extra_terms: tuple[tuple[str, float], ...] = ()


LOSS_TERMS = Registry("loss term", {})


def loss_terms_from_args(items) -> tuple[tuple[str, float], ...]:
    """``--loss-term PATH WEIGHT`` pairs, each importable and its weight a finite number."""
    import math

    out = []
    for path, weight in items or ():
        try:
            w = float(weight)
        except ValueError:
            raise UsageError(f"--loss-term {path}: the weight must be a number, got {weight!r}") from None
        if not math.isfinite(w):
            raise UsageError(f"--loss-term {path}: the weight must be finite, got {weight}")
        if not callable(LOSS_TERMS.resolve(path)):
            raise PluginError(f"loss term {path!r} is not a function")
        out.append((path, w))
    return tuple(out)


def loss_term_metric(path: str) -> str:
    return f"loss_term[{path}]"


def plugin_loss_terms(out: "DraftTrainOutput", p: jax.Array, mask: jax.Array, w: jax.Array, lc: LossConfig) -> dict:
    """The value of each plug-in term of ``lc`` on a batch (metric name -> scalar)."""
    values = {}
    for path, _ in lc.extra_terms:
        value = jnp.asarray(LOSS_TERMS.resolve(path)(out.draft_logits, p, out.confidence_logits, mask, w))
        if value.shape != ():
            raise PluginError(f"loss term {path!r} must return a scalar, got shape {value.shape}")
        values[loss_term_metric(path)] = value.astype(jnp.float32)
    return values


def draft_loss_terms(out: DraftTrainOutput, lc: LossConfig) -> tuple[jax.Array, dict]:
    """The weighted loss and the metrics of one packed batch."""
    K = out.eval_mask.shape[-1]
    logq = jax.nn.log_softmax(out.draft_logits, -1)
    q = jnp.exp(logq)
    p = jax.nn.softmax(out.aligned_target_logits, -1)
    ce = -jnp.take_along_axis(logq, out.target_ids[..., None], -1)[..., 0]
    l1 = jnp.sum(jnp.abs(q - p), -1)
    accept = 1.0 - 0.5 * l1  # 1 - TV: acceptance probability of slot k given the earlier ones
    conf_target = jax.lax.stop_gradient(jnp.clip(accept, 0.0, 1.0))
    bce = optax.sigmoid_binary_cross_entropy(out.confidence_logits, conf_target)

    mask = out.eval_mask.astype(jnp.float32)
    w = mask * jnp.exp(-jnp.arange(K) / lc.decay_gamma)
    den = jnp.sum(w) + 1e-6
    terms = {name: jnp.sum(w * t) / den for name, t in (("ce_loss", ce), ("l1_loss", l1), ("confidence_loss", bce))}
    loss = lc.ce * terms["ce_loss"] + lc.l1 * terms["l1_loss"] + lc.confidence * terms["confidence_loss"]
    extra = plugin_loss_terms(out, p, mask, w, lc)
    for (path, weight) in lc.extra_terms:
        loss = loss + weight * extra[loss_term_metric(path)]
    terms.update(extra)

    slots = jnp.sum(mask, axis=(0, 1))
    accept_at = jnp.sum(mask * accept, axis=(0, 1)) / jnp.maximum(slots, 1.0)
    blocks = mask[..., 0]
    tau = 1.0 + jnp.sum(jnp.cumprod(accept * mask, -1), -1)  # expected accepted length per block
    sigma = jax.nn.sigmoid(out.confidence_logits)
    top1 = jnp.argmax(out.draft_logits, -1) == out.target_ids
    metrics = {
        "loss": loss,
        **terms,
        "accept_rate_by_position": accept_at,
        "tau_probabilistic": jnp.sum(tau * blocks) / jnp.maximum(jnp.sum(blocks), 1.0),
        "confidence_abs_error": jnp.sum(w * jnp.abs(sigma - conf_target)) / den,
        "confidence_bias": jnp.sum(w * (sigma - conf_target)) / den,
        "teacher_forced_accuracy": jnp.sum(mask * top1) / jnp.maximum(jnp.sum(mask), 1.0),
    }
    return loss, metrics


def target_features(target: Qwen3Params, tcfg: Qwen3Config, dcfg: DraftConfig, tokens: jax.Array):
    """Online target pass: features at ``target_layer_ids`` and the final hidden states."""
    out, _ = target_model.forward(target, tcfg, tokens, None, feature_layers=dcfg.target_layer_ids, with_logits=False)
    return jax.lax.stop_gradient(out.features), jax.lax.stop_gradient(out.hidden)


def draft_step_loss(params, dcfg, target, tcfg, batch, key, lc: LossConfig):
    tokens, loss_mask = batch["tokens"], batch["loss_mask"]
    if "features" in batch:  # precomputed target cache
        features, last_hidden = batch["features"], batch["last_hidden"]
    else:
        features, last_hidden = target_features(target, tcfg, dcfg, tokens)
    anchors, keep = sample_anchors(key, loss_mask, dcfg.num_anchors)
    out = draft_training_forward(params, dcfg, target, tokens, loss_mask, features, last_hidden, anchors, keep)
    return draft_loss_terms(out, lc)


@functools.partial(
    jax.jit, static_argnames=("dcfg", "tcfg", "optimizer", "lc"), donate_argnames=("state",)
)
def draft_train_step(state: TrainState, target: Qwen3Params, batch: dict, key: jax.Array, *, dcfg, tcfg, optimizer, lc):
    """One optimiser step of the drafter; the target (and its embedding / lm_head) is frozen."""
    (_, metrics), grads = jax.value_and_grad(draft_step_loss, has_aux=True)(
        state.params, dcfg, target, tcfg, batch, key, lc
    )
    metrics["grad_norm"] = optax.tree.norm(grads)
    return apply_gradients(state, grads, optimizer), metrics


@functools.partial(jax.jit, static_argnames=("dcfg", "tcfg", "lc"))
def draft_eval_metrics(params, target, batch, key, *, dcfg, tcfg, lc):
    return draft_step_loss(params, dcfg, target, tcfg, batch, key, lc)[1]
