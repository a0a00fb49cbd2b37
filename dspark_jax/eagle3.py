"""The Eagle-3 drafter (DeepSpec's ``Qwen3Eagle3Model`` and ``Gemma4Eagle3Model``): one decoder
layer drafting a chain.

An entry at RoPE position p pairs "the hidden for p" with "the token at p + 1". The hidden
is the target's features at ``target_layer_ids`` fused by ``fc`` (``[B, T, m*D] -> [B, T, D]``,
not normalised: it is the layer's residual stream) or, while drafting, the layer's own output
for the previous position. The layer reads ``[input_norm(embed(token)) ; hidden_norm(hidden)]``
(2D wide, embedding first) and adds its attention and MLP to the hidden; logits are the
target's lm_head over ``norm(output)``; the output itself is fed back un-normed.

Decoding (DeepSpec's ``Qwen3Eagle3Evaluator``): the draft cache keeps entries of committed
positions only (prompt + every accepted token). A proposal drafts K tokens one by one from
the hidden of the last committed entry (``Eagle3State.hidden``); each of its forwards writes
a proposal entry past the committed length, where the next commit overwrites it (DeepSpec
crops them), so proposal entries never survive a round. After verification the n + 1
committed positions (anchor, d_1..d_n) enter the cache with their target features and the
tokens that follow them (d_1..d_n, bonus), and the layer output at the last one becomes the
next proposal's hidden. DeepSpec's K-th forward only extends the cache that is cropped right
after, so a proposal here runs K - 1 forwards (the same K tokens and logits).

Training: DeepSpec's training-time test (``ttt_loss``): ``ttt_length`` steps over whole
sequences, step k feeding step k - 1's outputs back with the tokens shifted by k + 1.

Target families: everything above is one code path; only the decoder layer follows its target
(``Eagle3Config.layers``). A Qwen3 target's drafter has a Qwen3 layer (``layers.decoder_layer``).
A Gemma 4 target's (``Gemma4Eagle3Model``) has a Gemma 4 layer of the full-attention geometry
(``gemma4.draft_layer``: global head dim, global kv heads and values = the raw keys with
``attention_k_eq_v``, q/k/v norms, proportional RoPE, unscaled scores, sandwich norms, the
gelu-tanh MLP, ``layer_scalar``); its embedding is the target's scaled one and its logits are
soft-capped, as the target's own (``target.embed_tokens`` / ``target.compute_logits``).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, Mapping

import jax
import jax.numpy as jnp
import optax

from .attention import MASKED_SCORE, AttentionMask, Context, attend
from .cache import KVCache, chunk_positions, write_layers
from . import gemma4
from .config import ConfigError, Qwen3Config
from .draft import DraftBlock
from .draft import check_compatible as draft_check_compatible
from .layers import DecoderLayerParams, decoder_layer, decoder_layer_decl, layer_at, rms_norm, rope_cos_sin
from .params import ParamDecl, init_tree
from .sampling import Sampling, distribution, sample
from .target import Qwen3Params, compute_logits, embed_tokens

ARCHITECTURE = "Qwen3Eagle3Model"
GEMMA4_ARCHITECTURE = "Gemma4Eagle3Model"
# config.json "architectures" -> the target family whose layer the drafter has
ARCHITECTURES = {ARCHITECTURE: "qwen3", GEMMA4_ARCHITECTURE: "gemma4"}


@dataclasses.dataclass(frozen=True)
class Eagle3Config:
    """A DeepSpec Eagle-3 ``config.json``: the target's attention shapes, one layer, and the
    Eagle-3 fields. ``block_size`` (drafts per round by default) is ``ttt_length``. ``layers``
    is a Qwen3 config, or a Gemma 4 text config (the target's, with one full-attention layer)."""

    layers: Qwen3Config | gemma4.Gemma4Config  # num_hidden_layers = 1
    target_layer_ids: tuple[int, ...]
    ttt_length: int = 7
    step_loss_decay: float = 0.8
    num_target_layers: int | None = None
    target_model_name_or_path: str | None = None

    family: ClassVar[str] = "eagle3"
    head_type: ClassVar[str] = "eagle3"

    def __post_init__(self):
        # the drafter's lm_head is the target's: there is no tying of its own (DeepSpec writes false)
        # (and its one layer's weights are never per-layer arrays: Qwen3Config.per_layer_weights)
        layout = {"per_layer_weights": False} if hasattr(self.layers, "per_layer_weights") else {}
        object.__setattr__(self, "layers", dataclasses.replace(self.layers, tie_word_embeddings=False, **layout))
        if self.ttt_length < 1:
            raise ConfigError(f"ttt_length must be >= 1, got {self.ttt_length}")
        if self.layers.num_hidden_layers != 1:
            raise ConfigError(f"an Eagle-3 drafter has one decoder layer, got num_hidden_layers {self.layers.num_hidden_layers}")
        ids = self.target_layer_ids
        if not ids or any(b <= a for a, b in zip(ids, ids[1:])) or ids[0] < 0:
            raise ConfigError(f"target_layer_ids {list(ids)} must be non-empty, >= 0 and strictly increasing")

    @property
    def block_size(self) -> int:
        return self.ttt_length

    @property
    def hidden_size(self) -> int:
        return self.layers.hidden_size

    @property
    def is_gemma4(self) -> bool:
        return isinstance(self.layers, gemma4.Gemma4Config)

    @property
    def architecture(self) -> str:
        return GEMMA4_ARCHITECTURE if self.is_gemma4 else ARCHITECTURE

    def attention_geometry(self) -> tuple[int, int, float | None]:
        """(kv heads, head dim, score scale) of the layer's attention (scale None: Dh ** -0.5).
        Gemma 4: the full-attention geometry, unscaled scores (q and k are normed)."""
        if self.is_gemma4:
            spec = gemma4.draft_layer_specs(self.layers)[0]
            return spec.kv_heads, spec.head_dim, 1.0
        return self.layers.num_key_value_heads, self.layers.head_dim, None

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any], where: str = "config.json") -> "Eagle3Config":
        if raw.get("target_layer_ids") is None:
            raise ConfigError(f"{where}: missing Eagle-3 field 'target_layer_ids'")
        layers = int(raw.get("draft_num_hidden_layers") or raw.get("num_hidden_layers") or 1)
        if layers != 1:
            raise ConfigError(f"{where}: draft_num_hidden_layers {layers}: an Eagle-3 drafter has one layer")
        one_layer = {**raw, "num_hidden_layers": 1, "layer_types": ["full_attention"]}
        return cls(
            layers=(gemma4.Gemma4Config.from_hf(one_layer, where) if layer_family(raw, where) == "gemma4"
                    else Qwen3Config.from_hf(one_layer, where)),
            target_layer_ids=tuple(int(i) for i in raw["target_layer_ids"]),
            ttt_length=int(raw.get("ttt_length") or 7),
            step_loss_decay=float(raw.get("step_loss_decay", 0.8)),
            num_target_layers=raw.get("num_target_layers"),
            target_model_name_or_path=raw.get("target_model_name_or_path"),
        )

    def to_hf(self) -> dict[str, Any]:
        out = self.layers.to_hf_text() if self.is_gemma4 else self.layers.to_hf()
        out.update(
            architectures=[self.architecture], num_hidden_layers=1, layer_types=["full_attention"],
            tie_word_embeddings=False, target_layer_ids=list(self.target_layer_ids), ttt_length=self.ttt_length,
            step_loss_decay=self.step_loss_decay, draft_num_hidden_layers=1,
        )
        if self.is_gemma4:  # as DeepSpec's Gemma 4 build_draft_config writes them
            out.update(target_model_type="gemma4", target_text_model_type="gemma4_text")
        if self.num_target_layers is not None:
            out["num_target_layers"] = self.num_target_layers
        if self.target_model_name_or_path is not None:
            out["target_model_name_or_path"] = self.target_model_name_or_path
        return out


def layer_family(raw: Mapping[str, Any], where: str = "config.json") -> str:
    """The target family of an Eagle-3 ``config.json``'s layer: named by its ``architectures``
    (``Qwen3Eagle3Model`` / ``Gemma4Eagle3Model``, exactly), else by its ``model_type``; an
    architecture that contradicts the model_type is an error."""
    named = {ARCHITECTURES[a] for a in raw.get("architectures") or [] if a in ARCHITECTURES}
    by_type = "gemma4" if gemma4.is_gemma4_config({"model_type": raw.get("model_type")}) else "qwen3"
    if len(named) > 1:
        raise ConfigError(f"{where}: architectures {raw['architectures']} name both a Qwen3 and a Gemma 4 Eagle-3 layer")
    if named and raw.get("model_type") is not None and named != {by_type}:
        raise ConfigError(f"{where}: architectures {raw['architectures']} name a {named.pop()} Eagle-3 layer but "
                          f"model_type is {raw['model_type']!r}")
    return named.pop() if named else by_type


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Eagle3Params:
    """Eagle-3 weights; the embedding and lm_head are the target's (passed in, never copied)."""

    fc: jax.Array  # [m * D, D]
    hidden_norm: jax.Array  # [D]
    # Qwen3: stacked over [1]; Gemma 4: the one layer (unstacked). q/k/v project from 2D
    layer: DecoderLayerParams | gemma4.Gemma4LayerParams
    final_norm: jax.Array  # [D]

    @property
    def confidence(self):
        """Eagle-3 has no confidence head."""
        return None


def eagle3_decl(cfg: Eagle3Config) -> Eagle3Params:
    """Every Eagle-3 weight with its name in a DeepSpec checkpoint (``embed_tokens`` /
    ``lm_head`` are the target's: ``draft.DRAFT_SHARED_TENSORS``)."""
    D, m = cfg.hidden_size, len(cfg.target_layer_ids)
    if cfg.is_gemma4:
        layer = gemma4.layer_decl(gemma4.draft_layer_specs(cfg.layers)[0], cfg.layers, "layers.0", attn_in=2 * D)
    else:
        layer = decoder_layer_decl(cfg.layers, 1, "layers", attn_in=2 * D)
    return Eagle3Params(
        fc=ParamDecl((m * D, D), ("features", "embed"), "fc.weight", 1),
        hidden_norm=ParamDecl((D,), ("embed",), "layers.0.hidden_norm.weight", init="ones"),
        layer=layer,
        final_norm=ParamDecl((D,), ("embed",), "norm.weight", init="ones"),
    )


def init_eagle3_params(key: jax.Array, cfg: Eagle3Config, dtype=jnp.float32, std: float = 0.02) -> Eagle3Params:
    return init_tree(key, eagle3_decl(cfg), dtype, std)


def check_compatible(cfg: Eagle3Config, tcfg: Qwen3Config, where: str = "draft"):
    """Clear errors when an Eagle-3 drafter cannot run against a target: its layer's family is
    the target's, and the DSpark drafter's checks (vocab, hidden size, the target it was trained
    for, target_layer_ids in range)."""
    target_family = "gemma4" if isinstance(tcfg, gemma4.Gemma4Config) else "qwen3"
    if (target_family == "gemma4") != cfg.is_gemma4:
        raise ConfigError(f"{where}: a {cfg.architecture} drafter runs on "
                          f"{'Gemma 4' if cfg.is_gemma4 else 'Qwen3'} targets, not on a {target_family} target")
    draft_check_compatible(cfg, tcfg, where)
    bad = [i for i in cfg.target_layer_ids if not 0 <= i < tcfg.num_hidden_layers]
    if bad:
        raise ConfigError(f"{where}: target_layer_ids {bad} out of range for a target with {tcfg.num_hidden_layers} "
                          f"layers (valid: 0..{tcfg.num_hidden_layers - 1})")


def default_target_layer_ids(num_layers: int, count: int = 5) -> tuple[int, ...]:
    """DeepSpec's pattern: layer 1, then every (L - 4) / (count - 1) layers (Qwen3-4B's 36:
    1, 9, 17, 25, 33; Qwen3-14B's 40: 1, 10, 19, 28, 37), never the last layer; a target too
    shallow for that gets its first ``count`` non-final layers."""
    if num_layers - 4 < count - 1:
        first = 1 if num_layers - 2 >= count else 0
        return tuple(range(first, max(num_layers - 1, 1)))[:count]
    step = (num_layers - 4) / (count - 1) if count > 1 else 0
    return tuple(1 + round(i * step) for i in range(count))


# ---------------------------------------------------------------------------- the layer


def fuse(params: Eagle3Params, features: jax.Array) -> jax.Array:
    """``fc(features [..., m*D]) -> [..., D]``: the residual stream the layer adds to."""
    return features @ params.fc


def layer_forward(params: Eagle3Params, cfg: Eagle3Config, target: Qwen3Params, tokens, hidden, positions, attend_fn):
    """The decoder layer over entries (``tokens [B, T]``, ``hidden [B, T, D]``) at RoPE
    ``positions [B, T]``. ``attend_fn(q, k, v) -> (out, aux)`` as in ``layers.decoder_layer``.
    Returns the layer output ``[B, T, D]`` (pre-norm) and ``aux``."""
    c = cfg.layers
    eps = c.rms_norm_eps
    layer = params.layer if cfg.is_gemma4 else layer_at(params.layer, 0)
    embedded = rms_norm(embed_tokens(target, tokens), layer.input_norm, eps)  # Gemma 4: the scaled embedding
    x = jnp.concatenate([embedded, rms_norm(hidden, params.hidden_norm, eps).astype(embedded.dtype)], -1)
    if cfg.is_gemma4:
        cos, sin = gemma4.draft_rope(c, positions)
        return gemma4.draft_layer(layer, eps, hidden, x, cos, sin, attend_fn)
    cos, sin = rope_cos_sin(c, positions)
    return decoder_layer(layer, c, hidden, cos, sin, attend_fn, attn_input=x)


def draft_logits(params: Eagle3Params, cfg: Eagle3Config, target: Qwen3Params, hidden: jax.Array) -> jax.Array:
    """float32 ``lm_head(norm(hidden))`` ``[..., V]`` (soft-capped as the target's, Gemma 4)."""
    return compute_logits(target, rms_norm(hidden, params.final_norm, cfg.layers.rms_norm_eps))


def forward_against_cache(params, cfg, target, cache: KVCache, tokens, hidden, positions):
    """Entries at ``positions [B, T]`` (causal among themselves) reading the draft cache's
    entries before ``positions[:, 0]``. Returns the outputs ``[B, T, D]`` and their (k, v)."""
    mask = AttentionMask.make(positions, context_len=positions[:, 0])
    context = Context(cache.k, cache.v, jnp.int32(0))
    backend = cfg.layers.attention_backend
    scale = cfg.attention_geometry()[2]
    return layer_forward(params, cfg, target, tokens, hidden, positions,
                         lambda q, k, v: (attend(q, k, v, mask, context, backend, scale=scale), (k, v)))


def extend(params, cfg, target, cache: KVCache, fused: jax.Array, tokens: jax.Array, num_new: jax.Array):
    """Append entries (``fused [B, T, D]`` hidden, ``tokens [B, T]``) at each row's length and
    commit the first ``num_new [B]``. Returns the cache and the layer output ``[B, D]`` at the
    last committed entry (garbage where ``num_new`` is 0)."""
    positions = chunk_positions(cache.lengths, tokens.shape[1])
    out, (k, v) = forward_against_cache(params, cfg, target, cache, tokens, fused, positions)
    cache = write_layers(cache, k[None], v[None], positions).advance(num_new)
    last = jnp.take_along_axis(out, jnp.maximum(num_new - 1, 0)[:, None, None], 1)[:, 0]
    return cache, last


# ---------------------------------------------------------------------------- decoding


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Eagle3State:
    """What the speculative loop carries for an Eagle-3 drafter."""

    cache: KVCache  # [1, B, S, K, Dh] entries of committed positions (proposal entries past lengths)
    hidden: jax.Array  # [B, D] layer output at the last committed entry: step 0's hidden
    pending: jax.Array  # [B, D] fused features of the prompt's last position (its token is sampled after the prefill)


def init_state(cfg: Eagle3Config, batch: int, max_len: int, dtype=jnp.float32) -> Eagle3State:
    kv_heads, head_dim, _ = cfg.attention_geometry()
    D = cfg.hidden_size
    return Eagle3State(KVCache.init(1, batch, max_len, kv_heads, head_dim, dtype),
                       jnp.zeros((batch, D), dtype), jnp.zeros((batch, D), dtype))


def prefill_chunk(params, cfg, target, prompt_tokens, prompt_lengths, state: Eagle3State, features, num_new):
    """Fold one prefill chunk's target features ``[B, C, m*D]`` into the cache: position i
    pairs with prompt token i + 1; the prompt's last position waits in ``pending`` for the
    first sampled token (``start``). ``num_new [B]``: the chunk's prompt tokens per row."""
    P, C = prompt_tokens.shape[1], features.shape[1]
    positions = chunk_positions(state.cache.lengths, C)
    next_tokens = jnp.take_along_axis(prompt_tokens, jnp.minimum(positions + 1, P - 1), 1)
    holds_last = (num_new > 0) & (state.cache.lengths + num_new == prompt_lengths)
    fused = fuse(params, features)
    cache, _ = extend(params, cfg, target, state.cache, fused, next_tokens, num_new - holds_last)
    last = jnp.take_along_axis(fused, jnp.maximum(num_new - 1, 0)[:, None, None], 1)[:, 0]
    return dataclasses.replace(state, cache=cache, pending=jnp.where(holds_last[:, None], last, state.pending))


def start(params, cfg, target, state: Eagle3State, anchor: jax.Array) -> Eagle3State:
    """After the prefill: the prompt's last entry takes the first sampled token ``anchor [B]``;
    its output is the first proposal's hidden."""
    cache, hidden = extend(params, cfg, target, state.cache, state.pending[:, None], anchor[:, None],
                           jnp.ones_like(anchor, jnp.int32))
    return dataclasses.replace(state, cache=cache, hidden=hidden)


def commit(params, cfg, target, state: Eagle3State, features, tokens, num_new) -> Eagle3State:
    """After verification: the verified positions' target features ``[B, K+1, m*D]`` with the
    tokens after them (``tokens [B, K+1]`` = d_1..d_n, bonus) overwrite the proposal entries;
    the first ``num_new [B]`` (n + 1) are committed, and the last one's output is the next hidden."""
    cache, last = extend(params, cfg, target, state.cache, fuse(params, features), tokens, num_new)
    return dataclasses.replace(state, cache=cache, hidden=jnp.where((num_new > 0)[:, None], last, state.hidden))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Chain:
    block: DraftBlock
    hidden: jax.Array  # [B, K, D] the hidden each step's logits came from
    cache: KVCache  # with the K - 1 proposal entries written past the committed length


def chain(key, params, cfg, target, state: Eagle3State, sampling: Sampling, num_drafts: int) -> Chain:
    """Draft K tokens one by one inside one ``lax.scan``: step s samples d_{s+1} from
    ``lm_head(norm(h_s))``; then ``h_{s+1}`` = the layer over (h_s, d_{s+1}) at position L + s,
    reading the committed entries and the proposal entries before it."""
    L = state.cache.lengths
    keys = jax.random.split(key, num_drafts)

    def pick(k, h):
        logits = draft_logits(params, cfg, target, h)
        probs = distribution(logits, sampling)
        token = jnp.argmax(probs, -1).astype(jnp.int32) if sampling.greedy else sample(k, probs)
        return token, probs, logits

    first = pick(keys[0], state.hidden)

    def step(carry, xs):
        cache, h, token = carry
        s, k = xs
        positions = (L + s)[:, None]
        out, (new_k, new_v) = forward_against_cache(params, cfg, target, cache, token[:, None], h[:, None], positions)
        cache = write_layers(cache, new_k[None], new_v[None], positions)
        h = out[:, 0]
        picked = pick(k, h)
        return (cache, h, picked[0]), (h, *picked)

    (cache, _, _), (hs, tokens, probs, logits) = jax.lax.scan(
        step, (state.cache, state.hidden, first[0]), (jnp.arange(num_drafts - 1, dtype=jnp.int32), keys[1:]))
    join = lambda a, rest: jnp.concatenate([a[:, None], jnp.moveaxis(rest, 0, 1)], 1)
    block = DraftBlock(tokens=join(first[0], tokens), probs=join(first[1], probs), logits=join(first[2], logits),
                       confidence_logits=jnp.zeros(L.shape + (num_drafts,), jnp.float32))
    return Chain(block, join(state.hidden, hs), cache)


def propose(key, params, cfg, target, state: Eagle3State, anchor, sampling: Sampling, num_drafts: int):
    """The drafter's work for one round: the drafted block and the state (its cache buffer
    now holds the proposal entries, past the committed length). The anchor is already the
    token of the last committed entry."""
    del anchor
    out = chain(key, params, cfg, target, state, sampling, num_drafts)
    return out.block, dataclasses.replace(state, cache=out.cache)


# ---------------------------------------------------------------------------- training (training-time test)


def ttt_attention(q, keys, values, valid, scale: float | None = None) -> jax.Array:
    """Attention of TTT step k = ``len(keys) - 1``: query i reads step 0's keys j <= i and
    its own position i in the chunk of every later step 1..k (DeepSpec's eagle3 mask_mod);
    a query with ``valid [B, S]`` False reads nothing (a uniform average, as eager attention).

    q ``[B, S, H, Dh]``; keys / values: one ``[B, S, K, Dh]`` chunk per step so far. The
    per-query keys of the later chunks are what no ``AttentionMask`` (a shared prefix
    context + a chunk) describes, hence this small dense softmax of its own. Scores are
    scaled by ``scale`` (default ``Dh ** -0.5``; Gemma 4: 1)."""
    B, S, H, Dh = q.shape
    kv = keys[0].shape[2]
    q5 = q.reshape(B, S, kv, H // kv, Dh)
    i = jnp.arange(S)
    scale = Dh**-0.5 if scale is None else scale
    scores = jnp.einsum("bikgd,bjkd->bkgij", q5, keys[0], preferred_element_type=jnp.float32) * scale
    visible = (i[None, :, None] >= i[None, None, :]) & valid[:, :, None]  # [B, S, S]
    scores = jnp.where(visible[:, None, None], scores, MASKED_SCORE)
    if len(keys) > 1:
        k_diag, v_diag = jnp.stack(keys[1:], 2), jnp.stack(values[1:], 2)  # [B, S, k, K, Dh]
        diag = jnp.einsum("bikgd,bickd->bkgic", q5, k_diag, preferred_element_type=jnp.float32) * scale
        diag = jnp.where(valid[:, None, None, :, None], diag, MASKED_SCORE)
        scores = jnp.concatenate([scores, diag], -1)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgij,bjkd->bikgd", probs[..., :S].astype(values[0].dtype), values[0])
    if len(keys) > 1:
        out = out + jnp.einsum("bkgic,bickd->bikgd", probs[..., S:].astype(v_diag.dtype), v_diag)
    return out.reshape(B, S, H, Dh).astype(q.dtype)


def shift_left(a: jax.Array, n: int) -> jax.Array:
    """``a[:, i + n]`` along axis 1, zero-filled past the end."""
    pad = [(0, 0)] * a.ndim
    pad[1] = (0, n)
    return jnp.pad(a[:, n:], pad)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TTTOutput:
    logits: jax.Array  # [T, B, S, V] float32 draft logits of every step
    hidden: jax.Array  # [T, B, S, D] layer outputs (pre-norm): the hidden of step k + 1
    valid: jax.Array  # [T, B, S] query rows some key is visible to


def ttt_forward(params: Eagle3Params, cfg: Eagle3Config, target: Qwen3Params, tokens: jax.Array,
                seq_len: jax.Array, features: jax.Array) -> TTTOutput:
    """The training-time test over right-padded sequences ``tokens [B, S]`` (``seq_len [B]``
    real tokens, target ``features [B, S, m*D]``): step k runs the layer over every position
    i with token ``tokens[i + k + 1]`` at RoPE position i + k, from fc(features) at k = 0 and
    from step k - 1's outputs after; query i reads step 0's entries j <= i and its own
    position in the entries of steps 1..k (``ttt_attention``)."""
    B, S = tokens.shape
    i = jnp.arange(S, dtype=jnp.int32)
    hidden = fuse(params, features)
    scale = cfg.attention_geometry()[2]
    keys, values, logits, hiddens, valids = [], [], [], [], []
    for k in range(cfg.ttt_length):
        valid = i[None, :] < (seq_len - k)[:, None]

        def attend_fn(q, new_k, new_v, valid=valid):
            keys.append(new_k)
            values.append(new_v)
            return ttt_attention(q, keys, values, valid, scale), None

        positions = jnp.broadcast_to(i + k, (B, S))
        hidden, _ = layer_forward(params, cfg, target, shift_left(tokens, k + 1), hidden, positions, attend_fn)
        hiddens.append(hidden)
        logits.append(draft_logits(params, cfg, target, hidden))
        valids.append(valid)
    return TTTOutput(jnp.stack(logits), jnp.stack(hiddens), jnp.stack(valids))


def position_masks(loss_mask: jax.Array, seq_len: jax.Array, steps: int) -> jax.Array:
    """``[T, B, S]`` float32: m_0 = loss_mask with the last real token zeroed (nothing
    follows it to predict), m_k[i] = m_0[i + k] (zero-filled)."""
    S = loss_mask.shape[1]
    m0 = loss_mask.astype(jnp.float32) * (jnp.arange(S)[None, :] != (seq_len - 1)[:, None])
    return jnp.stack([shift_left(m0, k) for k in range(steps)])


def step_targets(target: Qwen3Params, last_hidden: jax.Array, steps: int) -> jax.Array:
    """``[T, B, S, V]``: step k, row i learns the target's distribution after position
    i + k + 1 (softmax of lm_head over the final-normed ``last_hidden [B, S, D]``), uniform
    past the end of the sequence."""
    p = jax.nn.softmax(compute_logits(target, last_hidden), -1)
    B, S, V = p.shape
    padded = jnp.concatenate([p[:, 1:], jnp.full((B, steps + 1, V), 1.0 / V, p.dtype)], 1)  # [B, S + T, V]
    return jnp.stack([padded[:, k:k + S] for k in range(steps)])


def ttt_loss(params, cfg: Eagle3Config, target: Qwen3Params, tokens, loss_mask, seq_len, features, last_hidden):
    """DeepSpec's ``compute_eagle3_loss``: sum_k step_loss_decay^k * loss_k, loss_k = the soft
    cross-entropy against the target summed over the rows of m_k, divided by batch x sequence
    (the local mean, not the number of supervised rows). Returns (loss, metrics)."""
    T = cfg.ttt_length
    B, S = tokens.shape
    out = ttt_forward(params, cfg, target, tokens, seq_len, features)
    p = step_targets(target, last_hidden, T)
    masks = position_masks(loss_mask, seq_len, T)
    logq = jax.nn.log_softmax(out.logits, -1)
    step_losses = jnp.sum(masks * -jnp.sum(p * logq, -1), axis=(1, 2)) / (B * S)  # [T]
    loss = jnp.sum(cfg.step_loss_decay ** jnp.arange(T) * step_losses)
    accept = jnp.sum(jnp.minimum(p, jnp.exp(logq)), -1)  # [T, B, S]: 1 - TV, acceptance of step k's draft
    rows = jnp.sum(masks, axis=(1, 2))
    chained = jnp.cumprod(accept * masks, 0)  # all steps up to k of the chain from position i accepted
    tau = jnp.sum(masks[0] * (1.0 + jnp.sum(chained, 0))) / jnp.maximum(rows[0], 1.0)
    metrics = {
        "loss": loss,
        "step_losses": step_losses,
        "accept_rate_by_position": jnp.sum(masks * accept, axis=(1, 2)) / jnp.maximum(rows, 1.0),
        "tau_probabilistic": tau,
        "teacher_forced_accuracy": jnp.sum(masks[0] * (jnp.argmax(out.logits[0], -1) == jnp.argmax(p[0], -1)))
        / jnp.maximum(rows[0], 1.0),
    }
    return loss, metrics


def sequence_lengths(batch: Mapping[str, jax.Array]) -> jax.Array:
    """Real tokens per row ``[B]``: the attention mask's sum, or (regenerated answers, padded
    after the answer) one past the last supervised position."""
    if "attention_mask" in batch:
        return jnp.sum(batch["attention_mask"], -1).astype(jnp.int32)
    m = batch["loss_mask"].astype(bool)
    S = m.shape[1]
    last = S - 1 - jnp.argmax(m[:, ::-1], -1)
    return jnp.where(jnp.any(m, -1), last + 1, 0).astype(jnp.int32)


def batch_loss(params, cfg: Eagle3Config, target: Qwen3Params, tcfg: Qwen3Config, batch):
    """``ttt_loss`` of a batch: target features precomputed in the batch, or computed here by
    the frozen target (online)."""
    from .train import target_features

    tokens = batch["tokens"]
    if "features" in batch:
        features, last_hidden = batch["features"], batch["last_hidden"]
    else:
        features, last_hidden = target_features(target, tcfg, cfg, tokens)
    return ttt_loss(params, cfg, target, tokens, batch["loss_mask"], sequence_lengths(batch), features, last_hidden)


@functools.partial(jax.jit, static_argnames=("cfg", "tcfg", "optimizer"), donate_argnames=("state",))
def train_step(state, target: Qwen3Params, batch, key, *, cfg: Eagle3Config, tcfg: Qwen3Config, optimizer):
    """One optimiser step of the Eagle-3 drafter against the frozen target (``key`` unused:
    the training-time test has no sampling)."""
    from .train import apply_gradients

    del key
    (_, metrics), grads = jax.value_and_grad(batch_loss, has_aux=True)(state.params, cfg, target, tcfg, batch)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return apply_gradients(state, grads, optimizer), metrics
