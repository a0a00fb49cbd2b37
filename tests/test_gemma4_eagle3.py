"""Eagle-3 drafters for Gemma 4 targets (DeepSpec's ``Gemma4Eagle3Model``).

Parity: a PyTorch reference written here from transformers' Gemma 4 building blocks
(``Gemma4RMSNorm``, ``Gemma4TextMLP``, ``Gemma4TextRotaryEmbedding``, ``apply_rotary_pos_emb``)
in DeepSpec's module tree, its weights read by name from our export (so the tensor names,
shapes and layouts are checked too), on a tiny random config, float32, rtol = atol = 1e-4,
every argmax token exact:

* the layer over a prompt's entries written into an empty draft cache (every entry's output and
  its cached keys / values), then a K-token chain proposal reading that cache (each step's hidden,
  soft-capped logits and token), with ``attention_k_eq_v`` on (values = the raw keys, global kv
  heads, no v_proj) and off (v_proj, ``num_key_value_heads``);
* the training-time test on ragged rows: every step's logits on the rows some key sees, each
  step's soft cross-entropy (local mean) and their decayed sum.

Then, on the DeepSpec fixture's Gemma 4 target (sliding window 16, KV-shared layers, soft cap):
greedy speculative == greedy ar with a random drafter (batch 2, ragged, one prompt longer than
the window); export -> load (DeepSpec's key set without the embedding copies, bfloat16); the
``train-draft --drafter eagle3`` command line; and the one-line errors of unsupported drafters.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from dspark_jax import cli, eagle3, gemma4
from dspark_jax.cache import KVCache
from dspark_jax.checkpoint import load_draft, load_drafter, load_target, save_draft
from dspark_jax.config import ConfigError
from dspark_jax.decoding import generate_ar
from dspark_jax.sampling import Sampling
from fixtures import require_fixture
from spec_models import random_weights

TOL = dict(rtol=1e-4, atol=1e-4)
FIXTURE = "deepspec_gemma4_vanilla"
S, F = gemma4.SLIDING, gemma4.FULL
K_DRAFTS = 4


def tiny_target_config(k_eq_v: bool) -> gemma4.Gemma4Config:
    return gemma4.Gemma4Config(
        vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, global_head_dim=16, num_global_key_value_heads=1 if k_eq_v else 2,
        layer_types=(S, F, S, F), sliding_window=6, attention_k_eq_v=k_eq_v, num_kv_shared_layers=1,
        use_double_wide_mlp=True, final_logit_softcapping=10.0, max_position_embeddings=256)


def random_pair(tcfg, layer_ids=(0, 1, 2), ttt_length=3, seed=0):
    """A random target (embedding small: it is scaled by sqrt(hidden)) and a random drafter
    (norms and the layer scalar away from 1)."""
    target = random_weights(gemma4.target_decl(tcfg), seed, 0.25)
    target = dataclasses.replace(target, embed=target.embed * 0.2)
    dcfg = eagle3.Eagle3Config(layers=gemma4.draft_layers_config(tcfg, 1), target_layer_ids=layer_ids,
                               ttt_length=ttt_length, num_target_layers=tcfg.num_hidden_layers)
    return target, dcfg, random_weights(eagle3.eagle3_decl(dcfg), seed + 1, 0.2)


# ---------------------------------------------------------------------------- the PyTorch reference


def hf_text_config(dcfg: eagle3.Eagle3Config):
    """transformers' Gemma 4 text config of the drafter's one layer (num_kv_shared_layers 0:
    a one-layer draft's MLP is never double-wide under DeepSpec's pin, and newer transformers
    refuse a config sharing more layers than it has)."""
    from transformers.models.gemma4.configuration_gemma4 import Gemma4TextConfig

    c = dcfg.layers
    rope = {kind: gemma4._rope_to_hf(r) for kind, r in ((S, c.rope_sliding), (F, c.rope_full))}
    return Gemma4TextConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size, num_hidden_layers=1,
        num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        global_head_dim=c.global_head_dim, num_global_key_value_heads=c.num_global_key_value_heads,
        attention_k_eq_v=c.attention_k_eq_v, layer_types=[F], num_kv_shared_layers=0,
        use_double_wide_mlp=c.use_double_wide_mlp, hidden_size_per_layer_input=0, rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings, rope_parameters=rope)


class RefDraft(torch.nn.Module):
    """DeepSpec's Gemma4Eagle3Model module tree (names and shapes) over transformers' blocks;
    the embedding / lm_head are the target's, outside it."""

    def __init__(self, dcfg: eagle3.Eagle3Config):
        from transformers.models.gemma4 import modeling_gemma4 as hf

        super().__init__()
        nn, c, cfg = torch.nn, dcfg.layers, hf_text_config(dcfg)
        D, H = c.hidden_size, c.num_attention_heads
        self.k_eq_v = c.attention_k_eq_v
        self.kv_heads = c.num_global_key_value_heads if self.k_eq_v else c.num_key_value_heads
        self.head_dim = c.global_head_dim
        layer = nn.Module()
        attn = layer.self_attn = nn.Module()
        attn.q_proj = nn.Linear(2 * D, H * self.head_dim, bias=False)
        attn.k_proj = nn.Linear(2 * D, self.kv_heads * self.head_dim, bias=False)
        if not self.k_eq_v:
            attn.v_proj = nn.Linear(2 * D, self.kv_heads * self.head_dim, bias=False)
        attn.o_proj = nn.Linear(H * self.head_dim, D, bias=False)
        attn.q_norm = hf.Gemma4RMSNorm(self.head_dim, c.rms_norm_eps)
        attn.k_norm = hf.Gemma4RMSNorm(self.head_dim, c.rms_norm_eps)
        attn.v_norm = hf.Gemma4RMSNorm(self.head_dim, c.rms_norm_eps, with_scale=False)
        layer.mlp = hf.Gemma4TextMLP(cfg, 0)
        for name in ("hidden_norm", "input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            setattr(layer, name, hf.Gemma4RMSNorm(D, c.rms_norm_eps))
        layer.register_buffer("layer_scalar", torch.ones(1))
        self.layers = nn.ModuleList([layer])
        self.fc = nn.Linear(len(dcfg.target_layer_ids) * D, D, bias=False)
        self.norm = hf.Gemma4RMSNorm(D, c.rms_norm_eps)
        self.rotary = hf.Gemma4TextRotaryEmbedding(cfg)
        self.apply_rope = hf.apply_rotary_pos_emb

    def layer(self, embeds, hidden, positions, past_k, past_v, allowed):
        """The decoder layer over entries ``[B, T]`` reading ``past`` keys/values ``[B, K, P, Dh]``
        then its own, as ``allowed [B, T, P + T]`` says. Returns (output, its keys, its values)."""
        L = self.layers[0]
        a = L.self_attn
        B, T, _ = hidden.shape
        x = torch.cat([L.input_layernorm(embeds), L.hidden_norm(hidden)], -1)
        q = a.q_norm(a.q_proj(x).view(B, T, -1, self.head_dim)).transpose(1, 2)
        raw_k = a.k_proj(x).view(B, T, self.kv_heads, self.head_dim)
        k = a.k_norm(raw_k).transpose(1, 2)
        v = a.v_norm(raw_k if self.k_eq_v else a.v_proj(x).view(B, T, self.kv_heads, self.head_dim)).transpose(1, 2)
        cos, sin = self.rotary(x, positions, F)
        q, k = self.apply_rope(q, cos, sin), self.apply_rope(k, cos, sin)
        keys, values = torch.cat([past_k, k], 2), torch.cat([past_v, v], 2)
        g = q.shape[1] // self.kv_heads
        scores = q @ keys.repeat_interleave(g, 1).transpose(-1, -2)  # scaling 1.0
        # a query that may read nothing averages every key uniformly (eager attention's float mask)
        scores = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
        out = torch.softmax(scores, -1) @ values.repeat_interleave(g, 1)
        h = hidden + L.post_attention_layernorm(a.o_proj(out.transpose(1, 2).reshape(B, T, -1)))
        h = h + L.post_feedforward_layernorm(L.mlp(L.pre_feedforward_layernorm(h)))
        return h * L.layer_scalar, k, v


def reference_model(tmp_path, draft, dcfg, target):
    """The reference with the weights of our export (no embedding copies), loaded strictly."""
    save_draft(tmp_path, draft, dcfg, target, embedding_copies=False)
    ref = RefDraft(dcfg)
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in load_file(str(tmp_path / "model.safetensors")).items()},
                        strict=True)
    return ref.eval()


def reference_head(target, tcfg):
    """The target's scaled embedding (``Gemma4TextScaledWordEmbedding``) and soft-capped tied head."""
    embed = torch.from_numpy(np.array(target.embed))
    cap = tcfg.final_logit_softcapping
    return (lambda ids: embed[ids] * math.sqrt(tcfg.hidden_size)), (lambda h: cap * torch.tanh((h @ embed.T) / cap))


def causal(B, T, past=0):
    return torch.ones(B, T, past + T, dtype=torch.bool).tril(past)


# ---------------------------------------------------------------------------- parity


@functools.partial(jax.jit, static_argnames=("cfg",))
def _prefill_and_chain(params, target, features, tokens, *, cfg):
    B, P = tokens.shape
    kv, Dh, _ = cfg.attention_geometry()
    cache = KVCache.init(1, B, P + K_DRAFTS, kv, Dh)
    positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    fused = eagle3.fuse(params, features)
    out, _ = eagle3.forward_against_cache(params, cfg, target, cache, tokens, fused, positions)
    cache, last = eagle3.extend(params, cfg, target, cache, fused, tokens, jnp.full((B,), P, jnp.int32))
    state = eagle3.Eagle3State(cache, last, jnp.zeros_like(last))
    return out, cache, eagle3.chain(jax.random.key(0), params, cfg, target, state, Sampling(), K_DRAFTS)


@pytest.mark.parametrize("k_eq_v", [True, False])
def test_gemma4_eagle3_layer_cache_and_chain_match_a_transformers_reference(tmp_path, k_eq_v):
    tcfg = tiny_target_config(k_eq_v)
    target, dcfg, draft = random_pair(tcfg)
    assert (draft.layer.v_proj is None) == k_eq_v
    ref = reference_model(tmp_path, draft, dcfg, target)
    embed, head = reference_head(target, tcfg)
    B, P, m = 2, 10, len(dcfg.target_layer_ids)
    rng = np.random.default_rng(1)
    features = rng.normal(size=(B, P, m * tcfg.hidden_size)).astype(np.float32)
    tokens = rng.integers(0, tcfg.vocab_size, (B, P)).astype(np.int32)
    out, cache, chain = _prefill_and_chain(draft, target, jnp.asarray(features), jnp.asarray(tokens), cfg=dcfg)
    with torch.no_grad():
        hidden = ref.fc(torch.from_numpy(features))
        h, k, v = ref.layer(embed(torch.from_numpy(tokens).long()), hidden, torch.arange(P).expand(B, P),
                            hidden.new_zeros(B, ref.kv_heads, 0, ref.head_dim),
                            hidden.new_zeros(B, ref.kv_heads, 0, ref.head_dim), causal(B, P))
        np.testing.assert_allclose(np.asarray(out), h.numpy(), **TOL)
        np.testing.assert_allclose(np.asarray(cache.k[0, :, :P]), k.transpose(1, 2).numpy(), **TOL)
        np.testing.assert_allclose(np.asarray(cache.v[0, :, :P]), v.transpose(1, 2).numpy(), **TOL)
        step_h, step_logits, step_tokens = h[:, -1:], [], []
        for s in range(K_DRAFTS):  # step s: logits of h_s, token d_(s+1), then h_(s+1) at position P + s
            np.testing.assert_allclose(np.asarray(chain.hidden[:, s]), step_h[:, 0].numpy(), **TOL, err_msg=f"step {s}")
            logits = head(ref.norm(step_h))
            step_logits.append(logits[:, 0])
            step_tokens.append(logits[:, 0].argmax(-1))
            step_h, k_s, v_s = ref.layer(embed(step_tokens[-1][:, None]), step_h, torch.full((B, 1), P + s), k, v,
                                         torch.ones(B, 1, P + s + 1, dtype=torch.bool))
            k, v = torch.cat([k, k_s], 2), torch.cat([v, v_s], 2)
    np.testing.assert_allclose(np.asarray(chain.block.logits), torch.stack(step_logits, 1).numpy(), **TOL)
    np.testing.assert_array_equal(np.asarray(chain.block.tokens), torch.stack(step_tokens, 1).numpy())
    assert float(jnp.max(jnp.abs(chain.block.logits))) < tcfg.final_logit_softcapping  # soft-capped


@functools.partial(jax.jit, static_argnames=("cfg",))
def _ttt(params, target, tokens, loss_mask, seq_len, features, last_hidden, *, cfg):
    out = eagle3.ttt_forward(params, cfg, target, tokens, seq_len, features)
    return out, eagle3.ttt_loss(params, cfg, target, tokens, loss_mask, seq_len, features, last_hidden)


def test_gemma4_eagle3_training_time_test_matches_a_transformers_reference(tmp_path):
    tcfg = tiny_target_config(True)
    target, dcfg, draft = random_pair(tcfg, ttt_length=3)
    dcfg = dataclasses.replace(dcfg, step_loss_decay=0.7)
    ref = reference_model(tmp_path, draft, dcfg, target)
    embed, head = reference_head(target, tcfg)
    B, Sq, D, T = 2, 12, tcfg.hidden_size, dcfg.ttt_length
    lengths = np.array([12, 9])
    real = np.arange(Sq)[None] < lengths[:, None]
    rng = np.random.default_rng(2)
    tokens = np.where(real, rng.integers(0, tcfg.vocab_size, (B, Sq)), 0).astype(np.int32)
    loss_mask = (real & (np.arange(Sq)[None] >= 2)).astype(np.int32)
    features = (rng.normal(size=(B, Sq, 3 * D)) * real[..., None]).astype(np.float32)
    last_hidden = (rng.normal(size=(B, Sq, D)) * real[..., None]).astype(np.float32)
    out, (loss, metrics) = _ttt(draft, target, *map(jnp.asarray, (tokens, loss_mask, lengths.astype(np.int32), features,
                                                                   last_hidden)), cfg=dcfg)
    with torch.no_grad():
        V = tcfg.vocab_size
        p = torch.softmax(head(torch.from_numpy(last_hidden)), -1)  # the target's (final-normed) next-token law
        p = torch.cat([p[:, 1:], torch.full((B, T + 1, V), 1.0 / V)], 1)
        m = torch.from_numpy(loss_mask).float()
        m[torch.arange(B), torch.from_numpy(lengths - 1)] = 0  # nothing follows the last real token
        hidden, ids = ref.fc(torch.from_numpy(features)), torch.from_numpy(tokens).long()
        keys, values, total = [], [], 0.0
        for k in range(T):
            ids = torch.cat([ids[:, 1:], torch.zeros_like(ids[:, :1])], 1)  # tokens[i + k + 1]
            n = torch.from_numpy(lengths - k)
            valid = torch.arange(Sq)[None] < n[:, None]  # [B, Sq]
            # DeepSpec's mask: step 0's keys causally, then the query's own position in later steps
            grids = [torch.ones(Sq, Sq, dtype=torch.bool).tril()] + [torch.eye(Sq, dtype=torch.bool)] * k
            allowed = torch.cat(grids, 1)[None] & valid[:, :, None]
            past_k = torch.cat(keys, 2) if keys else hidden.new_zeros(B, ref.kv_heads, 0, ref.head_dim)
            past_v = torch.cat(values, 2) if values else past_k
            hidden, k_new, v_new = ref.layer(embed(ids), hidden, (torch.arange(Sq) + k).expand(B, Sq), past_k, past_v,
                                             allowed)
            keys.append(k_new)
            values.append(v_new)
            logits = head(ref.norm(hidden))
            rows = valid.numpy()
            np.testing.assert_array_equal(np.asarray(out.valid[k]), rows)
            np.testing.assert_allclose(np.asarray(out.logits[k])[rows], logits.numpy()[rows], **TOL, err_msg=f"step {k}")
            np.testing.assert_array_equal(np.asarray(out.logits[k]).argmax(-1)[rows], logits.argmax(-1).numpy()[rows])
            step = (m * -(p[:, k:k + Sq] * torch.log_softmax(logits, -1)).sum(-1)).sum()
            step = step / (B * Sq)  # DeepSpec's local mean
            np.testing.assert_allclose(float(metrics["step_losses"][k]), float(step), **TOL, err_msg=f"loss {k}")
            total += dcfg.step_loss_decay**k * step
            m = torch.cat([m[:, 1:], torch.zeros_like(m[:, :1])], 1)
    np.testing.assert_allclose(float(loss), float(total), **TOL)


# ---------------------------------------------------------------------------- the fixture target


@pytest.fixture(scope="module")
def fixture_dir():
    return require_fixture(FIXTURE, "reference.npz", "target/config.json", "target/model.safetensors")


@pytest.fixture(scope="module")
def fixture_pair(fixture_dir):
    """The fixture's Gemma 4 target and a random Eagle-3 drafter for it (target layers 1, 2, 4)."""
    target, tcfg = load_target(fixture_dir / "target", "float32")
    dcfg = eagle3.Eagle3Config(layers=gemma4.draft_layers_config(tcfg, 1), target_layer_ids=(1, 2, 4), ttt_length=3,
                               num_target_layers=tcfg.num_hidden_layers)
    return target, tcfg, random_weights(eagle3.eagle3_decl(dcfg), 3, 0.1), dcfg


def test_greedy_speculative_with_a_gemma4_eagle3_drafter_equals_greedy_ar(fixture_dir, fixture_pair):
    """Batch 2, ragged: the fixture's 40-token prompt (2.5 sliding windows) and a 7-token one."""
    from dspark_jax.speculative import speculative_generate

    target, tcfg, draft, dcfg = fixture_pair
    long_prompt = np.load(fixture_dir / "reference.npz")["prompt_ids"][0].tolist()
    assert len(long_prompt) > tcfg.sliding_window
    prompts = [long_prompt, long_prompt[5:12]]
    res = speculative_generate(target, tcfg, draft, dcfg, prompts, max_new_tokens=16, cache_len=64)
    assert res.samples == generate_ar(target, tcfg, prompts, max_new_tokens=16, cache_len=64)
    assert res.stats["rounds"] > 0 and res.stats["proposed_tokens"] == 3 * res.stats["rounds"]


def test_gemma4_eagle3_export_is_deepspecs_layout_and_loads_back(fixture_pair, tmp_path):
    """The full export is DeepSpec's Gemma4Eagle3Model key set (with the copies of the target's
    embedding / head); bfloat16 without the copies loads back to the same weights and config."""
    target, tcfg, draft, dcfg = fixture_pair
    save_draft(tmp_path / "full", draft, dcfg, target)
    save_draft(tmp_path / "half", draft, dcfg, target, dtype="bfloat16", embedding_copies=False)
    full, half = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(tmp_path / "half" / "model.safetensors"))
    ours = set(RefDraft(dcfg).state_dict())
    assert set(full) == ours | {"embed_tokens.weight", "lm_head.weight"} and set(half) == ours
    assert "layers.0.layer_scalar" in ours and "layers.0.self_attn.v_proj.weight" not in ours  # k_eq_v
    assert full["layers.0.self_attn.q_proj.weight"].shape == (4 * 32, 2 * 64)  # global head dim, from [embed ; hidden]
    assert full["layers.0.self_attn.k_proj.weight"].shape == (1 * 32, 2 * 64)  # global kv heads
    assert full["fc.weight"].shape == (64, 3 * 64)
    assert {str(a.dtype) for a in half.values()} == {"bfloat16"}
    saved = json.loads((tmp_path / "half" / "config.json").read_text())
    assert saved["architectures"] == ["Gemma4Eagle3Model"] and saved["model_type"] == "gemma4_text"
    assert saved["num_hidden_layers"] == saved["draft_num_hidden_layers"] == 1 and saved["layer_types"] == [F]
    assert saved["tie_word_embeddings"] is False and saved["target_layer_ids"] == [1, 2, 4]
    assert (saved["global_head_dim"], saved["num_global_key_value_heads"], saved["attention_k_eq_v"]) == (32, 1, True)
    assert saved["final_logit_softcapping"] == 5.0 and saved["rope_parameters"][F]["rope_type"] == "proportional"
    back, back_cfg = load_drafter(tmp_path / "full", target, tcfg, "float32")
    assert back_cfg == dcfg and back_cfg.is_gemma4
    jax.tree.map(np.testing.assert_array_equal, back, draft)
    back, back_cfg = load_draft(tmp_path / "half", target, tcfg, "float32")
    assert back_cfg == dcfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b.astype(jnp.bfloat16), np.float32)), back, draft)


def write_config(path, raw):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize("field, value, message", [
    ("hidden_size_per_layer_input", 256, "per-layer inputs"),
    ("enable_moe_block", True, "MoE block"),
    ("architectures", ["Qwen3Eagle3Model"], "name a qwen3 Eagle-3 layer but model_type is 'gemma4_text'"),
])
def test_unsupported_gemma4_eagle3_drafter_is_a_one_line_error(fixture_dir, fixture_pair, tmp_path, field, value,
                                                              message, capsys):
    target, tcfg, draft, dcfg = fixture_pair
    raw = dcfg.to_hf() | {field: value}
    bad = write_config(tmp_path / "bad", raw)
    with pytest.raises(ConfigError, match=message):
        load_draft(bad, target, tcfg)
    with pytest.raises(SystemExit):
        cli.main(["generate", "--target", str(fixture_dir / "target"), "--draft", str(bad), "--prompt-ids", "5,6",
                  "--max-new-tokens", "2"])
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_the_layer_family_is_the_exact_architecture_name_else_the_model_type():
    assert eagle3.layer_family({"architectures": ["Gemma4Eagle3Model"]}) == "gemma4"
    assert eagle3.layer_family({"architectures": ["Qwen3Eagle3Model"], "model_type": "qwen3"}) == "qwen3"
    assert eagle3.layer_family({"architectures": ["SomeEagle3"], "model_type": "gemma4_text"}) == "gemma4"
    assert eagle3.layer_family({"architectures": ["SomeEagle3"], "model_type": "qwen3"}) == "qwen3"
    with pytest.raises(ConfigError, match="name both"):
        eagle3.layer_family({"architectures": ["Gemma4Eagle3Model", "Qwen3Eagle3Model"]})


def test_a_gemma4_eagle3_drafter_refuses_a_qwen3_target_and_back(fixture_pair):
    from spec_models import target_config

    _, tcfg, _, dcfg = fixture_pair
    qwen = target_config(vocab=tcfg.vocab_size, hidden=tcfg.hidden_size, layers=6)
    with pytest.raises(ConfigError, match="a Gemma4Eagle3Model drafter runs on Gemma 4 targets, not on a qwen3"):
        eagle3.check_compatible(dcfg, qwen)
    qwen_draft = eagle3.Eagle3Config(layers=dataclasses.replace(qwen, num_hidden_layers=1), target_layer_ids=(1, 2))
    with pytest.raises(ConfigError, match="a Qwen3Eagle3Model drafter runs on Qwen3 targets, not on a gemma4"):
        eagle3.check_compatible(qwen_draft, tcfg)


# ---------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def trained(fixture_dir, tmp_path_factory):
    """``train-draft --drafter eagle3`` on the fixture target (a byte-level tokenizer of its
    vocabulary beside it): 2 steps, online target features, bfloat16 export without copies."""
    from test_gemma4_cli import target_with_prompts

    root = tmp_path_factory.mktemp("gemma4_eagle3_cli")
    target_dir, prompts = target_with_prompts(fixture_dir / "target", root)
    out = root / "run"
    cli.main(["train-draft", "--drafter", "eagle3", "--target", str(target_dir), "--out", str(out), "--prompts",
              str(prompts), "--num-prompts", "4", "--answer-tokens", "8", "--seq-len", "16", "--batch-size", "2",
              "--block-size", "3", "--target-layer-ids", "1,2,4", "--log-every", "1", "--no-progress",
              "--export-dtype", "bfloat16", "--no-embedding-copies", "--steps", "2"])
    return target_dir, out


def test_train_draft_eagle3_on_a_gemma4_target_exports_gemma4_eagle3_that_decodes_greedy_equal_to_ar(trained, capsys):
    target_dir, out = trained
    saved = json.loads((out / "draft" / "config.json").read_text())
    assert saved["architectures"] == ["Gemma4Eagle3Model"] and saved["ttt_length"] == 3
    assert saved["target_model_type"] == "gemma4" and saved["num_target_layers"] == 6
    log = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)
    target, tcfg = load_target(target_dir, "float32")
    draft, dcfg = load_draft(out / "draft", target, tcfg, "float32")
    assert dcfg.is_gemma4 and isinstance(draft.layer, gemma4.Gemma4LayerParams)
    assert set(load_file(str(out / "draft" / "model.safetensors"))) == set(RefDraft(dcfg).state_dict())
    prompt = [5, 6, 7, 8]
    capsys.readouterr()
    cli.main(["generate", "--target", str(target_dir), "--draft", str(out / "draft"), "--prompt-ids",
              ",".join(map(str, prompt)), "--max-new-tokens", "12", "--num-samples", "2", "--json"])
    spec = json.loads(capsys.readouterr().out)
    ar = generate_ar(target, tcfg, [prompt], max_new_tokens=12)[0]
    assert spec["mode"] == "speculative" and spec["samples"] == [ar, ar]
