"""Turning logits into the distributions we sample from, identically for target and draft.

Speculative decoding stays lossless only if the target's p and the draft's q are warped by
the same rule, so every distribution in the package comes from ``distribution``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to turn logits into a distribution. temperature 0 = greedy (one-hot argmax)."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = Sampling()


def distribution(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """Probabilities ``[..., V]`` (float32) to sample from for the given logits."""
    logits = logits.astype(jnp.float32)
    V = logits.shape[-1]
    if sampling.greedy:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), V, dtype=jnp.float32)
    logits = logits / sampling.temperature
    if sampling.top_k and sampling.top_k < V:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (always at least the top token)
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        keep = mass_before < sampling.top_p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.nn.softmax(logits, axis=-1)


def sample(key: jax.Array, probs: jax.Array) -> jax.Array:
    """One token id per row of ``probs [..., V]`` (int32)."""
    return jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32)


def sample_logits(key: jax.Array, logits: jax.Array, sampling: Sampling) -> jax.Array:
    """Sample from warped logits; greedy is an exact argmax (no randomness)."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return sample(key, distribution(logits, sampling))
