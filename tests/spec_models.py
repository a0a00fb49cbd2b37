"""Tiny target/draft pairs for the speculative-decoding tests and benchmark.

The "near-bigram oracle": a small random Qwen3 target whose token embeddings dominate the
residual stream (the attention and MLP output projections are scaled down by ``context``), so
its next-token distribution depends mostly, but not only, on the current token. Its bigram
logit matrix ``M[t]`` (the target's logits for the one-token sequence ``[t]``) is then a good
but imperfect predictor of the next token. A DSpark drafter whose Markov head adds
``alpha * M[previous token]`` to nearly-zero backbone logits proposes tokens the target often
accepts and often rejects; ``alpha`` moves q away from (or towards) p.

Variants build the same kind of drafter with a gated, rnn or no ("none", DFlash) Markov
head from ``init_draft_params`` plus scaled weights, each with a random confidence head.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dspark_jax.config import Qwen3Config
from dspark_jax.draft import DraftConfig, DraftParams, init_draft_params
from dspark_jax.target import Qwen3Params, forward, init_cache, init_params

HEAD_TYPES = ("vanilla", "gated", "rnn", "none")


def target_config(
    vocab: int = 32,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 8,
    intermediate: int | None = None,
    eos: int | None = None,
) -> Qwen3Config:
    return Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        eos_token_ids=() if eos is None else (int(eos),),
    )


def with_eos(cfg: Qwen3Config, eos: int | None) -> Qwen3Config:
    """The same config with another EOS (Qwen3Config is frozen)."""
    return dataclasses.replace(cfg, eos_token_ids=() if eos is None else (int(eos),))


def make_target(
    cfg: Qwen3Config,
    seed: int = 0,
    *,
    context: float = 0.1,
    layer_std: float | None = None,
    logit_std: float = 2.5,
    dtype=jnp.float32,
) -> Qwen3Params:
    """Random target: unit-scale embeddings, ``layer_std`` projections (default
    0.3 * sqrt(32 / hidden), so activations keep their scale at any width) with the residual
    writes (o_proj, down_proj) scaled by ``context``, and an lm_head giving logits of about
    ``logit_std`` standard deviation (peaked enough at temperature 1 to be interesting)."""
    D, V = cfg.hidden_size, cfg.vocab_size
    k_embed, k_layers, k_head = jax.random.split(jax.random.key(seed), 3)
    base = init_params(k_layers, cfg, dtype, std=default_std(D) if layer_std is None else layer_std)
    layers = dataclasses.replace(
        base.layers, o_proj=base.layers.o_proj * context, down_proj=base.layers.down_proj * context
    )
    embed = jax.random.normal(k_embed, (V, D), jnp.float32).astype(dtype)
    lm_head = (logit_std / np.sqrt(D) * jax.random.normal(k_head, (D, V), jnp.float32)).astype(dtype)
    return Qwen3Params(embed=embed, layers=layers, final_norm=base.final_norm, lm_head=lm_head)


def default_std(hidden: int) -> float:
    return 0.3 * float(np.sqrt(32 / hidden))


def bigram_factors(params: Qwen3Params, cfg: Qwen3Config) -> tuple[jax.Array, jax.Array]:
    """``(H [V, D], W [D, V])`` with ``M = H @ W``: row t of M is the target's next-token logits
    for the one-token sequence [t] (H = its final-normed hidden state, W = the output head)."""
    V = cfg.vocab_size
    tokens = jnp.arange(V, dtype=jnp.int32)[:, None]
    out, _ = forward(params, cfg, tokens, init_cache(cfg, V, 1, params.embed.dtype), with_logits=False)
    head = params.embed.T if params.lm_head is None else params.lm_head
    return out.hidden[:, 0].astype(jnp.float32), head.astype(jnp.float32)


def bigram_logits(params: Qwen3Params, cfg: Qwen3Config) -> jax.Array:
    """``M [V, V]``: row t = the target's next-token logits for the one-token sequence [t]."""
    h, w = bigram_factors(params, cfg)
    return h @ w


def draft_config(
    tcfg: Qwen3Config,
    head: str = "vanilla",
    block_size: int = 4,
    target_layer_ids: tuple[int, ...] = (0, 1),
    confidence: bool = True,
    markov_rank: int | None = None,
    draft_layers: int = 1,
) -> DraftConfig:
    """``draft_layers`` layers of the target's width; markov_rank = vocab unless given (0 for
    head 'none')."""
    if head not in HEAD_TYPES:
        raise ValueError(f"head must be one of {HEAD_TYPES}, got {head!r}")
    layers = dataclasses.replace(tcfg, num_hidden_layers=draft_layers, eos_token_ids=())
    return DraftConfig(
        layers=layers,
        block_size=block_size,
        target_layer_ids=tuple(target_layer_ids),
        mask_token_id=tcfg.vocab_size - 1,
        markov_rank=0 if head == "none" else (markov_rank or tcfg.vocab_size),
        markov_head_type="vanilla" if head == "none" else head,
        enable_confidence_head=confidence,
    )


def make_draft(
    target: Qwen3Params,
    tcfg: Qwen3Config,
    dcfg: DraftConfig,
    seed: int = 1,
    *,
    alpha: float = 1.0,
    base_scale: float = 0.1,
    layer_std: float | None = None,
    context: float = 0.1,
    zero_mass_tokens: tuple[int, ...] = (),
    confidence_std: float = 1.0,
) -> DraftParams:
    """The near-bigram oracle drafter for ``dcfg.head_type``.

    vanilla: W1 = I, W2 = alpha * M, so the Markov bias for previous token t is alpha * M[t]
    (markov_rank = vocab); with markov_rank = hidden size the same bias comes from the exact
    factorisation M = H @ W (W1 = H, W2 = alpha * W), which keeps large vocabularies cheap.
    gated: the same W1/W2 with a gate biased open (sigmoid(3) ~ 0.95) plus small random G.
    rnn: the output slice of the joint linear maps the previous-token one-hot to 3 (tanh ~
    0.995), so B ~ alpha * M[prev], plus small random state / hidden terms.
    For these heads the draft's final norm is ``base_scale`` (backbone logits U_k nearly 0).
    none (DFlash): no Markov head; the draft layer's residual writes are scaled by
    ``context`` and the final norm is 1, so U_0 ~ M[anchor] (only position 0 is informed).
    ``zero_mass_tokens``: W2 columns set to -1e9, so q(x) = 0 exactly for those x.
    The confidence head is random (weights ``confidence_std``), so thresholds cut at
    varied places.
    """
    k_init, k_gate, k_joint, k_conf = jax.random.split(jax.random.key(seed), 4)
    std = default_std(dcfg.hidden_size) if layer_std is None else layer_std
    params = init_draft_params(k_init, dcfg, jnp.float32, std=std)
    layers = dataclasses.replace(
        params.layers, o_proj=params.layers.o_proj * context, down_proj=params.layers.down_proj * context
    )
    D, V, r = dcfg.hidden_size, tcfg.vocab_size, dcfg.markov_rank
    head = dcfg.head_type
    markov = None
    final_norm = params.final_norm
    if head != "none":
        if r == V:
            w1, w2 = jnp.eye(V, dtype=jnp.float32), alpha * bigram_logits(target, tcfg)
        elif r == tcfg.hidden_size:
            h, w = bigram_factors(target, tcfg)
            w1, w2 = h, alpha * w
        else:
            raise ValueError(f"markov_rank must be the vocab ({V}) or hidden size ({tcfg.hidden_size}), got {r}")
        if head == "rnn" and r != V:
            raise ValueError("the rnn oracle needs markov_rank = vocab (tanh of a one-hot)")
        if zero_mass_tokens:
            if r != V:
                raise ValueError("zero_mass_tokens needs markov_rank = vocab")
            w2 = w2.at[:, jnp.asarray(zero_mass_tokens)].set(-1e9)
        markov = {"w1": w1, "w2": w2}
        if head == "gated":
            markov["gate_w"] = 0.1 * jax.random.normal(k_gate, (D + r, r), jnp.float32)
            markov["gate_b"] = jnp.full((r,), 3.0, jnp.float32)
        elif head == "rnn":
            joint_w = 0.1 * jax.random.normal(k_joint, (2 * r + D, 3 * r), jnp.float32)
            markov["joint_w"] = joint_w.at[r : 2 * r, 2 * r :].add(3.0 * jnp.eye(r, dtype=jnp.float32))
            markov["joint_b"] = jnp.zeros((3 * r,), jnp.float32)
        final_norm = final_norm * base_scale
    confidence = params.confidence
    if confidence is not None:
        width = confidence["w"].shape[0]
        confidence = {**confidence, "w": confidence_std * jax.random.normal(k_conf, (width,), jnp.float32)}
    return dataclasses.replace(params, layers=layers, final_norm=final_norm, markov=markov, confidence=confidence)


@dataclasses.dataclass(frozen=True)
class SpecPair:
    tcfg: Qwen3Config
    target: Qwen3Params
    dcfg: DraftConfig
    draft: DraftParams


def make_pair(
    head: str = "vanilla",
    *,
    vocab: int = 32,
    block_size: int = 4,
    eos: int | None = None,
    alpha: float = 1.0,
    context: float = 0.1,
    target_seed: int = 0,
    draft_seed: int = 1,
    zero_mass_tokens: tuple[int, ...] = (),
    confidence: bool = True,
    **target_kwargs,
) -> SpecPair:
    """A tiny target and its near-bigram drafter with the given head."""
    tcfg = target_config(vocab=vocab, eos=eos, **target_kwargs)
    target = make_target(tcfg, target_seed, context=context)
    dcfg = draft_config(tcfg, head, block_size, confidence=confidence)
    draft = make_draft(target, tcfg, dcfg, draft_seed, alpha=alpha, zero_mass_tokens=zero_mass_tokens)
    return SpecPair(tcfg, target, dcfg, draft)


def random_prompts(n: int, vocab: int, min_len: int = 1, max_len: int = 16, seed: int = 0) -> list[list[int]]:
    """Ragged prompts of lengths in [min_len, max_len] (ids below vocab - 1, the mask id)."""
    rs = np.random.RandomState(seed)
    return [rs.randint(0, vocab - 1, rs.randint(min_len, max_len + 1)).tolist() for _ in range(n)]


def random_weights(decls, seed: int = 0, std: float = 0.3):
    """numpy-drawn weights for a declaration tree (no jax compile, unlike ``init_tree``): norms
    1 + 0.1 N(0, 1) (each distinct), zero-initialised weights N(0, 0.1^2), matrices N(0, std^2)."""
    from dspark_jax.params import map_decls

    rng = np.random.RandomState(seed)

    def draw(decl):
        noise = rng.standard_normal(decl.shape)
        w = {"ones": 1 + 0.1 * noise, "zeros": 0.1 * noise}.get(decl.init, std * noise)
        return jnp.asarray(w, jnp.float32)

    return map_decls(draw, decls)


# ---------------------------------------------------------------------------- Gemma 4


def gemma4_target_config(vocab: int = 256, hidden: int = 64, window: int = 8, layer_types: tuple[str, ...] | None = None,
                         kv_shared: int = 1):
    """A small Gemma 4 text config: sliding and full (k_eq_v, global geometry) layers, by
    default (sliding, full, sliding, full) with a KV-shared double-wide last layer; soft-capped,
    untied head."""
    from dspark_jax import gemma4

    S, F = gemma4.SLIDING, gemma4.FULL
    layer_types = tuple(layer_types or (S, F, S, F))
    return gemma4.Gemma4Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=len(layer_types),
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
        layer_types=layer_types, sliding_window=window, attention_k_eq_v=True, num_kv_shared_layers=kv_shared,
        use_double_wide_mlp=True, final_logit_softcapping=5.0, tie_word_embeddings=False)


def make_gemma4_target(cfg, seed: int = 0, *, context: float = 0.1, logit_std: float = 2.5):
    """The near-bigram Gemma 4 target. Gemma's sandwich norms rescale each residual write
    (attention, MLP) to its post-norm's weight, so those weights (not o_proj / down_proj, as for
    Qwen3) are scaled by ``context``; the scaled embedding has unit-scale entries and the untied
    head gives logits of about ``logit_std`` (before the soft cap). Numpy-drawn (no compile)."""
    from dspark_jax import gemma4

    params = random_weights(gemma4.target_decl(cfg), seed)
    rs = np.random.RandomState(seed + 1)
    D, V = cfg.hidden_size, cfg.vocab_size
    layers = tuple(tuple(dataclasses.replace(p, post_attention_norm=p.post_attention_norm * context,
                                             post_feedforward_norm=p.post_feedforward_norm * context) for p in group)
                   for group in params.layers)
    return dataclasses.replace(params, layers=layers,
                               embed=jnp.asarray(rs.standard_normal((V, D)) / np.sqrt(D), jnp.float32),
                               lm_head=jnp.asarray(logit_std / np.sqrt(D) * rs.standard_normal((D, V)), jnp.float32))


def gemma4_bigram_logits(params, cfg) -> np.ndarray:
    """``M [V, V]``: row t = the Gemma 4 target's (soft-capped) logits for the sequence [t]."""
    V = cfg.vocab_size
    run = jax.jit(lambda p, tokens: forward(p, cfg, tokens, None)[0].logits[:, 0])  # one program, not op by op
    return np.asarray(run(params, jnp.arange(V, dtype=jnp.int32)[:, None]), np.float64)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def make_gemma4_draft(target, tcfg, *, block_size: int = 4, alpha: tuple[float, float] = (0.0, 1.0),
                      base_scale: float = 0.1, overconfidence: float = 2.0, seed: int = 1):
    """A one-layer Gemma 4 DSpark drafter, the near-bigram oracle with an informative
    confidence head. Vanilla Markov head W1 = I, W2 = diag(alpha_t) M with alpha_t drawn in
    ``alpha`` per previous token t, so q_k ~ softmax(alpha_t M[t]) after t = x_{k-1} (the
    backbone's logits nearly 0): after some tokens the drafter is the bigram, after others a
    flattened one. The confidence head reads only the previous token's one-hot W1[x_{k-1}]: its
    logit for t is ``overconfidence`` x logit(a_t), with a_t = sum_v min(softmax(M[t]),
    softmax(alpha_t M[t])) the acceptance rate of a draft after t were the target exactly
    bigram. Context moves the target away from M: the head ranks rounds well but is
    overconfident, the case STS is for. Returns (params, config)."""
    from dspark_jax import gemma4
    from dspark_jax.draft import draft_decl

    V, D = tcfg.vocab_size, tcfg.hidden_size
    dcfg = DraftConfig(layers=gemma4.draft_layers_config(tcfg, 1), block_size=block_size, target_layer_ids=(-1, 1),
                       mask_token_id=V - 1, markov_rank=V, enable_confidence_head=True,
                       num_target_layers=tcfg.num_hidden_layers)
    params = random_weights(draft_decl(dcfg), seed)
    M = gemma4_bigram_logits(target, tcfg)
    scale = np.random.RandomState(seed).uniform(*alpha, size=(V, 1))
    a = np.clip(np.minimum(_softmax(M), _softmax(scale * M)).sum(-1), 0.01, 0.99)
    w = np.concatenate([np.zeros(D), overconfidence * np.log(a / (1 - a))])
    return dataclasses.replace(
        params, final_norm=params.final_norm * base_scale,
        markov={"w1": jnp.eye(V, dtype=jnp.float32), "w2": jnp.asarray(scale * M, jnp.float32)},
        confidence={"w": jnp.asarray(w, jnp.float32), "b": jnp.zeros((), jnp.float32)}), dcfg
