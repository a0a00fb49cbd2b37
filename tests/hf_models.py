"""Tiny random transformers Qwen3 models, created and saved by the tests themselves."""

from __future__ import annotations

import numpy as np
import torch
from transformers import Qwen3Config as HFQwen3Config
from transformers import Qwen3ForCausalLM


def make_hf_qwen3(path, *, tie=False, kv_heads=2, heads=4, layers=3, vocab=97, hidden=32,
                  head_dim=8, intermediate=48, seed=0, rope_parameters=None, eos_token_id=None,
                  **config_fields):
    """Build a random Qwen3ForCausalLM (weights with non-trivial norms) and save it to ``path``."""
    torch.manual_seed(seed)
    kwargs = dict(config_fields)  # e.g. use_sliding_window, sliding_window, layer_types
    if rope_parameters is not None:
        kwargs["rope_parameters"] = rope_parameters
    cfg = HFQwen3Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=head_dim, tie_word_embeddings=tie, max_position_embeddings=256,
        eos_token_id=eos_token_id, bos_token_id=None, pad_token_id=None, **kwargs,
    )
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def hf_forward(model, ids: np.ndarray):
    """Full-sequence logits and hidden_states of a transformers model (no cache)."""
    with torch.no_grad():
        out = model(torch.tensor(ids), output_hidden_states=True)
    return out.logits.numpy(), [h.numpy() for h in out.hidden_states]


GEMMA4_LAYER_TYPES = ("sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention")


def make_hf_gemma4(path, *, layer_types=GEMMA4_LAYER_TYPES, window=8, kv_shared=2, k_eq_v=True, tie=True,
                   vocab=128, hidden=32, heads=4, kv_heads=2, head_dim=8, global_head_dim=16, intermediate=24,
                   seed=0, **text_fields):
    """Build a random ``Gemma4ForConditionalGeneration`` (tiny vision/audio towers, so the file has
    the released multimodal layout; weights, norms and layer scalars all non-trivial) and save it."""
    from transformers import Gemma4Config as HFGemma4Config
    from transformers import Gemma4ForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=len(layer_types),
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, global_head_dim=global_head_dim,
        num_global_key_value_heads=1, attention_k_eq_v=k_eq_v, layer_types=list(layer_types), sliding_window=window,
        num_kv_shared_layers=kv_shared, use_double_wide_mlp=True, final_logit_softcapping=10.0,
        hidden_size_per_layer_input=0, max_position_embeddings=256, tie_word_embeddings=tie,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5,
                                            "rope_theta": 1e6}},
        eos_token_id=None, bos_token_id=None, pad_token_id=0, **text_fields,
    )
    vision = dict(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                  num_key_value_heads=1, head_dim=8, patch_size=2, position_embedding_size=4)
    audio = dict(hidden_size=8, num_hidden_layers=1, num_attention_heads=1, output_proj_dims=8,
                 subsampling_conv_channels=[4, 2], conv_kernel_size=3, attention_chunk_size=2, attention_context_left=2)
    cfg = HFGemma4Config(text_config=text, vision_config=vision, audio_config=audio, tie_word_embeddings=tie)
    model = Gemma4ForConditionalGeneration._from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embed_tokens" in name:
                p.copy_(0.05 * torch.randn_like(p))  # x sqrt(hidden) in the forward
            elif "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.25 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(1 + 0.2 * torch.randn_like(b))
    model.save_pretrained(path)
    return model


def hf_gemma4_forward(model, ids: np.ndarray):
    """Logits and hidden_states of a Gemma 4 model's whole sequence (no cache)."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), output_hidden_states=True)
    return out.logits.numpy(), [h.numpy() for h in out.hidden_states]
