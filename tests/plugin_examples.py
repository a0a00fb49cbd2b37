"""Plug-ins defined outside the package, as a researcher would write them (used by
test_plugins.py through their import paths ``plugin_examples:Name``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dspark_jax.drafters import DrafterFamily
from dspark_jax.heads import MarkovHead, compute_bias
from dspark_jax.schedule import top_k_lengths


class TwoTokenHead(MarkovHead):
    """A Markov head conditioned on the two previous tokens: ``B_k = (E1[x_{k-1}] + E2[x_{k-2}]) @ W``.

    The carried state is x_{k-2} (an int32 id; ``vocab`` = "before the block", its own row of E2)."""

    def __init__(self, dcfg, *, rngs: nnx.Rngs, rank: int = 8, scale: float = 0.02):
        V = dcfg.layers.vocab_size
        self.vocab, self.feature_size = V, rank
        self.prev = nnx.Param(scale * jax.random.normal(rngs.params(), (V, rank)))
        self.prev2 = nnx.Param(scale * jax.random.normal(rngs.params(), (V + 1, rank)))
        self.out = nnx.Param(scale * jax.random.normal(rngs.params(), (rank, V)))

    def initial_state(self, lead):
        return jnp.full(lead, self.vocab, jnp.int32)

    def features(self, hidden, prev_token, state):
        return self.prev[prev_token] + self.prev2[state]

    def __call__(self, hidden, prev_token, state):
        bias = compute_bias(self.features(hidden, prev_token, state), self.out[...])
        return bias, prev_token.astype(jnp.int32)


class TokenConfidenceHead(nnx.Module):
    """A confidence head with a per-token prior: ``logit = [h_k, features] @ w + b[x_{k-1}]``."""

    def __init__(self, dcfg, feature_size: int, *, rngs: nnx.Rngs, scale: float = 0.02):
        self.w = nnx.Param(scale * jax.random.normal(rngs.params(), (dcfg.hidden_size + feature_size,)))
        self.token_bias = nnx.Param(jnp.zeros((dcfg.layers.vocab_size,)))

    def __call__(self, hidden, prev_token, features):
        return jnp.concatenate([hidden, features], -1) @ self.w[...] + self.token_bias[prev_token]


class ReplayFamily(DrafterFamily):
    """A drafter family defined outside the package (DSpark's calls, under another name)."""

    name = "plugin_examples:ReplayFamily"


def mean_confidence(draft_logits, target_probs, confidence_logits, mask, weights):
    """A loss term with a gradient easy to predict: the weighted mean confidence logit."""
    return jnp.sum(weights * confidence_logits) / (jnp.sum(weights) + 1e-6)


def kl_to_target(draft_logits, target_probs, confidence_logits, mask, weights):
    """KL(p || q) per supervised slot, position-weighted."""
    logq = jax.nn.log_softmax(draft_logits, -1)
    kl = jnp.sum(target_probs * (jnp.log(jnp.maximum(target_probs, 1e-30)) - logq), -1)
    return jnp.sum(weights * kl) / (jnp.sum(weights) + 1e-6)


def greedy_budget(survival, live, sched):
    """Verify the ``2 x live requests`` most probable drafts of the round (a fresh top-K budget;
    draft j of a request ranks before its draft j + 1, so deciding it never reads a[r, > j])."""
    return top_k_lengths(survival, live, 2 * jnp.sum(live).astype(jnp.int32))


# ---------------------------------------------------------------------------- malformed

NOT_A_CLASS = 3


class NotAHead(nnx.Module):  # not a MarkovHead subclass
    def __init__(self, dcfg, *, rngs):
        pass


class HeadWithRngs(MarkovHead):  # keeps its Rngs as state: refused
    def __init__(self, dcfg, *, rngs):
        self.rngs = rngs
        self.w = nnx.Param(jnp.zeros((dcfg.layers.vocab_size,)))

    def __call__(self, hidden, prev_token, state):
        return self.w[prev_token][..., None], state


class ConfidenceNotAModule:  # not an nnx.Module: refused
    def __init__(self, dcfg, feature_size, *, rngs):
        pass


class ConfidenceWithWrongCall(nnx.Module):  # reads h_k only: refused when built
    def __init__(self, dcfg, feature_size, *, rngs):
        self.w = nnx.Param(jnp.zeros((dcfg.hidden_size,)))

    def __call__(self, hidden):
        return hidden @ self.w[...]


class ConfidenceWithVectorOutput(nnx.Module):  # a vector per position, not a logit: refused
    def __init__(self, dcfg, feature_size, *, rngs):
        self.w = nnx.Param(jnp.zeros((dcfg.hidden_size, 2)))

    def __call__(self, hidden, prev_token, features):
        return hidden @ self.w[...]


def loss_with_a_vector(draft_logits, target_probs, confidence_logits, mask, weights):
    return jnp.sum(weights, axis=0)  # not a scalar: refused


def scheduler_with_wrong_shape(survival, live, sched):
    return jnp.zeros(survival.shape, jnp.int32)  # [B, K], not [B]
