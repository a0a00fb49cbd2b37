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
