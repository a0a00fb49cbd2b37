"""The released checkpoints' shapes, checked without downloading them: Qwen/Qwen3-4B and the
DSpark drafter DeepSpec builds for it (deepseek-ai/dspark_qwen3_4b_block7).

Each test writes the exact config.json and a header-only (sparse) safetensors file holding the
tensor names and shapes such a checkpoint holds, listed here independently of the loader (from
Hugging Face's Qwen3 naming and the DeepSpec fixture's keys), and checks that the loaders ask
for exactly those, then runs the forwards with ``jax.eval_shape``: no weight is ever read.
"""

from __future__ import annotations

import json
import math
import struct

import jax
import jax.numpy as jnp
import pytest

from dspark_jax.checkpoint import CheckpointError, abstract_draft, abstract_qwen3
from dspark_jax.draft import draft_block, init_context_cache
from dspark_jax.sampling import Sampling
from dspark_jax.target import forward, init_cache

# Qwen/Qwen3-4B config.json, as released
QWEN3_4B = {
    "architectures": ["Qwen3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2560,
    "initializer_range": 0.02,
    "intermediate_size": 9728,
    "max_position_embeddings": 40960,
    "max_window_layers": 36,
    "model_type": "qwen3",
    "num_attention_heads": 32,
    "num_hidden_layers": 36,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": None,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.51.0",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

# The drafter's config.json: the target's config as DeepSpec's build_draft_config writes it
# (transformers 5 names: rope_parameters, dtype) with the draft layers and the DSpark fields,
# the field set of the DeepSpec fixture's draft/config.json.
DSPARK_QWEN3_4B_BLOCK7 = {
    "architectures": ["Qwen3DSparkModel"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "block_size": 7,
    "bos_token_id": 151643,
    "confidence_head_with_markov": True,
    "dtype": "bfloat16",
    "enable_confidence_head": True,
    "eos_token_id": 151645,
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 2560,
    "initializer_range": 0.02,
    "intermediate_size": 9728,
    "layer_types": ["full_attention"] * 5,
    "markov_head_type": "vanilla",
    "markov_rank": 256,
    "mask_token_id": 151669,
    "max_position_embeddings": 40960,
    "max_window_layers": 36,
    "model_type": "qwen3",
    "num_anchors": 512,
    "num_attention_heads": 32,
    "num_hidden_layers": 5,
    "num_key_value_heads": 8,
    "num_target_layers": 36,
    "pad_token_id": None,
    "rms_norm_eps": 1e-06,
    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
    "sliding_window": None,
    "target_layer_ids": [1, 9, 17, 25, 33],
    "tie_word_embeddings": True,
    "transformers_version": "5.10.2",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}

V, D, H, K, DH, F = 151936, 2560, 32, 8, 128, 9728


def decoder_layer_tensors(prefix: str, layers: int) -> dict[str, tuple[int, ...]]:
    """Hugging Face Qwen3 decoder-layer tensors: linear weights [out, in]."""
    per_layer = {
        "input_layernorm.weight": (D,),
        "self_attn.q_proj.weight": (H * DH, D),
        "self_attn.k_proj.weight": (K * DH, D),
        "self_attn.v_proj.weight": (K * DH, D),
        "self_attn.o_proj.weight": (D, H * DH),
        "self_attn.q_norm.weight": (DH,),
        "self_attn.k_norm.weight": (DH,),
        "post_attention_layernorm.weight": (D,),
        "mlp.gate_proj.weight": (F, D),
        "mlp.up_proj.weight": (F, D),
        "mlp.down_proj.weight": (D, F),
    }
    return {f"{prefix}.{i}.{name}": shape for i in range(layers) for name, shape in per_layer.items()}


# Qwen3-4B: tied, so no lm_head.weight
QWEN3_4B_TENSORS = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,),
                    **decoder_layer_tensors("model.layers", 36)}

# The drafter: the DeepSpec fixture's key set (draft/keys.json) at these sizes
DRAFT_TENSORS = {
    "embed_tokens.weight": (V, D),
    "lm_head.weight": (V, D),
    "fc.weight": (D, 5 * D),
    "hidden_norm.weight": (D,),
    "norm.weight": (D,),
    "markov_head.markov_w1.weight": (V, 256),
    "markov_head.markov_w2.weight": (V, 256),
    "confidence_head.proj.weight": (1, D + 256),
    "confidence_head.proj.bias": (1,),
    **decoder_layer_tensors("layers", 5),
}


def write_header_only_checkpoint(model_dir, config: dict, tensors: dict[str, tuple[int, ...]]):
    """config.json and a bf16 ``model.safetensors`` whose data is a hole (a sparse file: its
    header is real, its 8 GB of zeros take no disk)."""
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(config))
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors.items():
        size = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(model_dir / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    root = tmp_path_factory.mktemp("released")
    write_header_only_checkpoint(root / "Qwen3-4B", QWEN3_4B, QWEN3_4B_TENSORS)
    write_header_only_checkpoint(root / "dspark_qwen3_4b_block7", DSPARK_QWEN3_4B_BLOCK7, DRAFT_TENSORS)
    return root


def test_qwen3_4b_loads_with_exactly_its_released_tensor_names_and_shapes(released):
    from dspark_jax.params import checkpoint_tensors
    from dspark_jax.target import target_decl

    abstract, cfg = abstract_qwen3(released / "Qwen3-4B", "bfloat16")
    assert checkpoint_tensors(target_decl(cfg)) == QWEN3_4B_TENSORS
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (D, F, 36)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size) == (H, K, DH, V)
    assert cfg.tie_word_embeddings and abstract.lm_head is None
    assert cfg.max_position_embeddings == 40960 and cfg.eos_token_ids == (151645,)
    assert cfg.rope.theta == 1e6
    assert abstract.layers.q_proj.shape == (36, D, H, DH) and abstract.layers.q_proj.dtype == jnp.bfloat16
    n_params = sum(x.size for x in jax.tree.leaves(abstract))
    assert n_params == sum(math.prod(s) for s in QWEN3_4B_TENSORS.values()) == 4_022_468_096

    tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
    cache = jax.eval_shape(lambda: init_cache(cfg, 1, 16, jnp.bfloat16))
    out, _ = jax.eval_shape(lambda p, t, c: forward(p, cfg, t, c, feature_layers=(1, 9, 17, 25, 33)), abstract, tokens, cache)
    assert out.logits.shape == (1, 8, V) and out.features.shape == (1, 8, 5 * D)


def test_dspark_qwen3_4b_block7_loads_with_exactly_its_tensor_names_and_shapes(released):
    from dspark_jax.draft import draft_decl
    from dspark_jax.params import checkpoint_tensors

    target, cfg = abstract_qwen3(released / "Qwen3-4B", "bfloat16")
    draft, dcfg = abstract_draft(released / "dspark_qwen3_4b_block7", cfg, "bfloat16")
    shared = {"embed_tokens.weight", "lm_head.weight"}  # the target's copies: checked, not loaded
    assert checkpoint_tensors(draft_decl(dcfg)) == {k: v for k, v in DRAFT_TENSORS.items() if k not in shared}
    assert (dcfg.block_size, dcfg.layers.num_hidden_layers, dcfg.target_layer_ids) == (7, 5, (1, 9, 17, 25, 33))
    assert (dcfg.mask_token_id, dcfg.markov_rank, dcfg.head_type) == (151669, 256, "vanilla")
    assert dcfg.enable_confidence_head and dcfg.confidence_uses_markov

    cache = jax.eval_shape(lambda: init_context_cache(dcfg, 1, 32, jnp.bfloat16))
    anchor = jax.ShapeDtypeStruct((1,), jnp.int32)
    block, hidden = jax.eval_shape(
        lambda k, p, t, c, a: draft_block(k, p, dcfg, t, c, a, Sampling(0.0)), jax.random.key(0), draft, target, cache, anchor)
    assert block.tokens.shape == (1, 7) and hidden.shape == (1, 7, D)


def test_a_drafter_whose_embedding_copy_has_another_shape_is_refused_before_reading(released, tmp_path):
    _, cfg = abstract_qwen3(released / "Qwen3-4B")
    wrong = dict(DRAFT_TENSORS, **{"lm_head.weight": (V, D // 2)})
    write_header_only_checkpoint(tmp_path / "d", DSPARK_QWEN3_4B_BLOCK7, wrong)
    with pytest.raises(CheckpointError, match=r"'lm_head\.weight' has shape \[151936, 1280\], expected \[151936, 2560\]"):
        abstract_draft(tmp_path / "d", cfg)
