"""Tensor parallelism on a Gemma 4 target under jax.shard_map, on 8 fake CPU devices (see conftest).

The DeepSpec fixture's target has 4 query heads, 2 kv heads on its sliding layers and 1 on its
full (k_eq_v) layers, so tp-2 splits the sliding kv heads and replicates the full one, and tp-4
replicates both; its KV-shared, double-wide layers and the sliding ring (window 16, shorter
than the prompts here) run sharded too. The fixture's DSpark drafter stays replicated."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dspark_jax import target as target_model
from dspark_jax.checkpoint import load_draft, load_target
from dspark_jax.decoding import generate_ar
from dspark_jax.sharding import kv_replication, make_mesh, shard_target, sharded_forward, target_shardings
from dspark_jax.speculative import speculative_generate
from fixtures import require_fixture

FIXTURE = "deepspec_gemma4_vanilla"
TOL = dict(rtol=1e-4, atol=1e-4)
# ragged prompts, two longer than the sliding window
PROMPTS = [list(range(5, 27)), [7, 8, 9], list(range(40, 60)), [11]]


@pytest.fixture(scope="module")
def pair():
    fixture = require_fixture(FIXTURE, "target/config.json", "target/model.safetensors", "draft/config.json")
    target, tcfg = load_target(fixture / "target", "float32")
    draft, dcfg = load_draft(fixture / "draft", target, tcfg)
    return target, tcfg, draft, dcfg


@pytest.mark.parametrize("model,sliding_rep,full_rep", [(2, 1, 2), (4, 2, 4)])
def test_sharded_gemma4_forward_equals_unsharded_logits_features_and_cache(pair, model, sliding_rep, full_rep):
    target, cfg, _, _ = pair
    tokens = jax.random.randint(jax.random.key(1), (4, 6), 0, cfg.vocab_size)
    offsets = jnp.array([0, 19, 3, 30])  # two rows past the window: the ring has wrapped
    cache = target_model.init_cache(cfg, 4, 48).advance(offsets)
    ref, ref_cache = target_model.forward(target, cfg, tokens, cache, feature_layers=(-1, 2, 4))

    mesh = make_mesh(model=model, data=2)
    sparams, scfg = shard_target(target, cfg, mesh)
    reps = kv_replication(cfg, model)
    assert reps == {"num_key_value_heads": sliding_rep, "num_global_key_value_heads": full_rep}
    scache = target_model.init_cache(scfg, 4, 48).advance(offsets)
    fn = jax.jit(lambda p, t, c: sharded_forward(mesh, p, scfg, t, c, feature_layers=(-1, 2, 4)))
    out, new_cache = fn(sparams, tokens, scache)

    np.testing.assert_allclose(out.logits, ref.logits, **TOL)
    np.testing.assert_allclose(out.features, ref.features, **TOL)
    np.testing.assert_allclose(out.hidden, ref.hidden, **TOL)
    # replicated kv heads are copies: every copy equals the unsharded head, per layer type
    for name, rep in (("sliding", reps["num_key_value_heads"]), ("full", reps["num_global_key_value_heads"])):
        for copy in range(rep):
            for kv in ("k", "v"):
                np.testing.assert_allclose(getattr(new_cache, f"{name}_{kv}")[:, :, :, copy::rep],
                                           getattr(ref_cache, f"{name}_{kv}"), **TOL)
    np.testing.assert_array_equal(new_cache.lengths, ref_cache.lengths)


@pytest.mark.parametrize("model", [2, 4])
def test_gemma4_greedy_ar_and_speculative_with_a_mesh_equal_single_device(pair, model):
    target, cfg, draft, dcfg = pair
    ar = generate_ar(target, cfg, PROMPTS, max_new_tokens=16)
    spec = speculative_generate(target, cfg, draft, dcfg, PROMPTS, max_new_tokens=16)
    assert spec.samples == ar
    for data in (1, 2):
        mesh = make_mesh(model=model, data=data)
        assert generate_ar(target, cfg, PROMPTS, max_new_tokens=16, mesh=mesh) == ar
        spec_tp = speculative_generate(target, cfg, draft, dcfg, PROMPTS, max_new_tokens=16, mesh=mesh)
        assert spec_tp.samples == ar
        assert spec_tp.stats["rounds"] == spec.stats["rounds"]


def test_gemma4_loads_straight_onto_a_mesh_with_only_dividing_kv_heads_split(pair):
    target, cfg, _, _ = pair
    mesh = make_mesh(model=2, data=1)
    shardings = target_shardings(cfg, mesh)
    specs = {}
    for group in shardings.layers:
        for layer in group:
            if layer.k_proj is not None:
                specs.setdefault(layer.k_proj.spec, 0)
                specs[layer.k_proj.spec] += 1
    # sliding k_proj [R, D, 2 kv heads, Dh] split; full k_proj [R, D, 1 kv head, Dh] whole
    assert set(specs) == {jax.sharding.PartitionSpec(None, None, "model", None),
                          jax.sharding.PartitionSpec(None, None, None, None)}
    fixture = require_fixture(FIXTURE, "target/config.json")
    loaded, _ = load_target(fixture / "target", "float32", mesh=mesh)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(target)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert generate_ar(loaded, cfg, PROMPTS[:2], max_new_tokens=8, mesh=mesh) == \
        generate_ar(target, cfg, PROMPTS[:2], max_new_tokens=8)
