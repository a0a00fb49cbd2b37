"""The Eagle-3 drafter against DeepSpec (``../shared/fixtures/deepspec_qwen3_eagle3``, reference
arrays of DeepSpec's evaluator and loss) and as a drafter of lossless speculative decoding.

Parity: fused features, the draft cache and hidden after the prefill, every proposal step's
logits / hidden / tokens in both rounds, the cache and hidden after the update, the
training-time test's per-step logits and losses (cases A and B). Tolerance 2e-4 (float32),
tokens exact, as the fixture's README states.
"""

from __future__ import annotations

import functools
import json
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import safe_open

from dspark_jax import eagle3
from dspark_jax import target as target_model
from dspark_jax.checkpoint import load_draft, load_drafter, load_qwen3, save_draft
from dspark_jax.sampling import Sampling
from dspark_jax.speculative import speculative_start

from fixtures import require_fixture

TOL = dict(rtol=2e-4, atol=2e-4)
NAME = "deepspec_qwen3_eagle3"


@pytest.fixture(scope="module")
def fx():
    path = require_fixture(NAME, "reference.npz", "target/config.json", "draft/config.json")
    ref = dict(np.load(path / "reference.npz"))
    target, tcfg = load_qwen3(path / "target", "float32")
    draft, dcfg = load_draft(path / "draft", target, tcfg, "float32")
    return path, ref, target, tcfg, draft, dcfg


def cache_entries(cache, n):
    """Our ``[1, B, S, K, Dh]`` cache's first n entries in DeepSpec's ``[layer, batch, kv_heads, n, Dh]``."""
    return np.asarray(cache.k)[:, :, :n].transpose(0, 1, 3, 2, 4), np.asarray(cache.v)[:, :, :n].transpose(0, 1, 3, 2, 4)


_chain = jax.jit(eagle3.chain, static_argnames=("cfg", "sampling", "num_drafts"))
_commit = jax.jit(eagle3.commit, static_argnames=("cfg",))


@pytest.fixture(scope="module")
def rounds(fx):
    """DeepSpec's two rounds: prefill (ours: the speculative prefill, in chunks of 16 so the
    prompt's last position lies in the second chunk), round 1, the simulated acceptance of 2,
    the update, round 2."""
    _, ref, target, tcfg, draft, dcfg = fx
    run = speculative_start(target, tcfg, draft, dcfg, [ref["prompt_ids"][0].tolist()], max_new_tokens=16,
                            block_size=4, cache_len=64, prefill_chunk=16)
    state = run.state.draft_cache
    r1 = _chain(jax.random.key(0), draft, dcfg, target, state, sampling=Sampling(), num_drafts=4)
    verify = jnp.concatenate([run.state.anchor[:, None], r1.block.tokens], 1)
    out, _ = target_model.forward(target, tcfg, verify, run.state.target_cache, feature_layers=dcfg.target_layer_ids)
    committed = jnp.asarray(np.pad(ref["u1_committed_tokens"], ((0, 0), (0, 2))), jnp.int32)
    after = _commit(draft, dcfg, target, eagle3.Eagle3State(r1.cache, state.hidden, state.pending), out.features,
                    committed, jnp.asarray([3], jnp.int32))
    r2 = _chain(jax.random.key(0), draft, dcfg, target, after, sampling=Sampling(), num_drafts=4)
    return dict(run=run, prefill=state, r1=r1, verify=out, update=after, r2=r2)


def test_eagle3_fused_features_match_deepspec(fx, rounds):
    """fc of DeepSpec's prompt features; the target's features of the verify forward (the
    features every update fuses)."""
    _, ref, target, tcfg, draft, dcfg = fx
    np.testing.assert_allclose(eagle3.fuse(draft, jnp.asarray(ref["context_features"])), ref["init_fc"], **TOL)
    np.testing.assert_allclose(rounds["verify"].features, ref["r1_verify_context_features"], **TOL)
    np.testing.assert_allclose(eagle3.fuse(draft, rounds["verify"].features[:, :3]), ref["u1_fc"], **TOL)


def test_eagle3_prefill_cache_and_hidden_match_deepspec(fx, rounds):
    _, ref, *_ = fx
    state = rounds["prefill"]
    assert int(rounds["run"].state.anchor[0]) == int(ref["greedy_ids"][0, 0])
    assert state.cache.lengths.tolist() == [24]
    k, v = cache_entries(state.cache, 24)
    np.testing.assert_allclose(k, ref["init_draft_cache_k"], **TOL)
    np.testing.assert_allclose(v, ref["init_draft_cache_v"], **TOL)
    np.testing.assert_allclose(state.hidden, ref["init_draft_hidden"][:, 0], **TOL)


@pytest.mark.parametrize("name", ["r1", "r2"])
def test_eagle3_proposal_steps_match_deepspec(fx, rounds, name):
    """Every step's hidden, logits and token; the proposal entries written past the committed
    length (ours skips DeepSpec's K-th forward, which only extends the cache it crops)."""
    _, ref, *_ = fx
    chain = rounds[name]
    np.testing.assert_array_equal(chain.block.tokens, ref[f"{name}_draft_tokens"])
    np.testing.assert_allclose(chain.block.logits, ref[f"{name}_step_logits"], **TOL)
    np.testing.assert_allclose(chain.hidden, ref[f"{name}_step_hidden"], **TOL)
    n = ref[f"{name}_draft_cache_k"].shape[3] - 1
    k, v = cache_entries(chain.cache, n)
    np.testing.assert_allclose(k, ref[f"{name}_draft_cache_k"][..., :n, :], **TOL)
    np.testing.assert_allclose(v, ref[f"{name}_draft_cache_v"][..., :n, :], **TOL)
    np.testing.assert_array_equal(chain.block.probs.argmax(-1), chain.block.tokens)  # one-hot at T=0


def test_eagle3_update_crops_proposals_and_matches_deepspec(fx, rounds):
    _, ref, *_ = fx
    np.testing.assert_allclose(rounds["verify"].logits, ref["r1_verify_logits"], **TOL)
    after = rounds["update"]
    assert after.cache.lengths.tolist() == [27]
    k, v = cache_entries(after.cache, 27)
    np.testing.assert_allclose(k, ref["u1_draft_cache_k"], **TOL)
    np.testing.assert_allclose(v, ref["u1_draft_cache_v"], **TOL)
    np.testing.assert_allclose(after.hidden, ref["u1_draft_hidden"][:, 0], **TOL)


def test_eagle3_released_layout_round_trip(fx, tmp_path):
    """Export with the embedding copies = DeepSpec's key set and tensors; without them the
    same minus the copies; both load back to the same weights and config."""
    path, _, target, tcfg, draft, dcfg = fx
    keys = {t["name"] for t in json.load(open(path / "draft" / "keys.json"))["tensors"]}
    save_draft(tmp_path / "with", draft, dcfg, target)
    save_draft(tmp_path / "without", draft, dcfg, target, embedding_copies=False, dtype="bfloat16")

    def tensors(d):
        with safe_open(str(d / "model.safetensors"), "np") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    ours, theirs = tensors(tmp_path / "with"), tensors(path / "draft")
    assert set(ours) == keys == set(theirs)
    for name, value in theirs.items():
        np.testing.assert_array_equal(ours[name], value, err_msg=name)
    assert set(tensors(tmp_path / "without")) == keys - {"embed_tokens.weight", "lm_head.weight"}
    back, back_cfg = load_drafter(tmp_path / "with", target, tcfg, "float32")
    assert back_cfg == dcfg and isinstance(back, eagle3.Eagle3Params)
    jax.tree.map(np.testing.assert_array_equal, back, draft)
    half, _ = load_drafter(tmp_path / "without", target, tcfg, "float32")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b.astype(jnp.bfloat16), np.float32)), half, draft)
    saved = json.load(open(tmp_path / "with" / "config.json"))
    original = json.load(open(path / "draft" / "config.json"))
    for key in ("architectures", "target_layer_ids", "ttt_length", "step_loss_decay", "draft_num_hidden_layers",
                "num_hidden_layers", "hidden_size", "num_key_value_heads", "head_dim", "tie_word_embeddings"):
        assert saved[key] == original[key], key


# ---------------------------------------------------------------------------- lossless decoding


def oracle_pair(sharp: float = 4.0, fc_scale: float = 0.01):
    """The near-bigram target of ``spec_models`` (kv heads = heads, so a value head can copy
    the embedding) and an Eagle-3 drafter built to predict it: q/k/v copy the normed embedding
    half of the layer input, the scaled q_norm makes each entry attend (almost) to itself,
    o_proj writes the copy into the residual and fc is nearly 0, so step 0 drafts from the
    anchor's embedding (often accepted) and later steps from a mix of the chain's tokens
    (often rejected)."""
    import dataclasses

    from spec_models import make_target, target_config

    tcfg = target_config(vocab=32, kv_heads=4)
    target = make_target(tcfg, 0, context=0.05)
    cfg = eagle3.Eagle3Config(layers=dataclasses.replace(tcfg, num_hidden_layers=1, eos_token_ids=()),
                              target_layer_ids=(0, 1), ttt_length=4)
    D, H, K, Dh = tcfg.hidden_size, tcfg.num_attention_heads, tcfg.num_key_value_heads, tcfg.head_dim
    p = eagle3.init_eagle3_params(jax.random.key(1), cfg, std=0.1)
    copy = jnp.concatenate([jnp.eye(D), jnp.zeros((D, D))]).reshape(2 * D, K, Dh)[None]
    layer = dataclasses.replace(p.layer, q_proj=copy, k_proj=copy, v_proj=copy, o_proj=jnp.eye(D).reshape(H, Dh, D)[None],
                                q_norm=jnp.full((1, Dh), sharp), down_proj=p.layer.down_proj * 0.1)
    return SimpleNamespace(target=target, tcfg=tcfg, draft=dataclasses.replace(p, fc=p.fc * fc_scale, layer=layer),
                           dcfg=cfg)


@functools.lru_cache(maxsize=None)
def pair():
    return oracle_pair()


def test_greedy_speculative_with_eagle3_equals_autoregressive_batched():
    from dspark_jax.decoding import generate_ar
    from dspark_jax.speculative import speculative_generate
    from spec_models import random_prompts

    pr = pair()
    prompts = random_prompts(8, 32, 1, 16, 0)
    res = speculative_generate(pr.target, pr.tcfg, pr.draft, pr.dcfg, prompts, max_new_tokens=16, cache_len=48, trace=True)
    assert res.samples == generate_ar(pr.target, pr.tcfg, prompts, max_new_tokens=16, cache_len=48)
    rounds = [r for sample in res.trace for r in sample]
    assert any(r["accepted"] == 4 for r in rounds) and any(r["accepted"] < 4 for r in rounds)  # both paths ran
    assert 0.3 < res.stats["accepted_tokens"] / res.stats["proposed_tokens"] < 0.9


def test_eagle3_speculative_sampling_matches_target_distribution():
    from test_speculative import SAMPLING_PROMPT, assert_matches, exact_joint_2_3
    from dspark_jax.speculative import speculative_generate

    pr = pair()
    sampling = Sampling(temperature=1.0)
    joint = exact_joint_2_3(pr, sampling)
    samples, accepted, proposed = [], 0, 0
    for seed in (1, 2):
        res = speculative_generate(pr.target, pr.tcfg, pr.draft, pr.dcfg, [SAMPLING_PROMPT] * 4096, max_new_tokens=4,
                                   cache_len=32, sampling=sampling, seed=seed)
        samples += res.samples
        accepted += res.stats["accepted_tokens"]
        proposed += res.stats["proposed_tokens"]
    assert 0.2 < accepted / proposed < 0.9  # both the accept and the residual paths run often
    S = np.array(samples)
    assert_matches(np.bincount(S[:, 1], minlength=32), joint.sum(1))
    assert_matches(np.bincount(S[:, 2], minlength=32), joint.sum(0))
    assert_matches(np.bincount(S[:, 1] * 32 + S[:, 2], minlength=32 * 32), joint)


@pytest.mark.parametrize("kw", [dict(scheduler="threshold"), dict(confidence_threshold=0.5),
                                dict(scheduler="algorithm1"), dict(scheduler="async")])
def test_confidence_schedulers_refuse_eagle3_before_compiling(kw, monkeypatch):
    from dspark_jax import speculative

    def must_not_compile(*a, **k):
        raise AssertionError("compiled before refusing")

    monkeypatch.setattr(speculative, "speculative_prefill", must_not_compile)
    pr = pair()
    with pytest.raises(ValueError, match="Eagle-3 has none.*'fixed' scheduler"):
        speculative_start(pr.target, pr.tcfg, pr.draft, pr.dcfg, [[1, 2, 3]], max_new_tokens=4, **kw)


# ---------------------------------------------------------------------------- training-time test


@functools.partial(jax.jit, static_argnames=("dcfg", "tcfg"))
def _ttt_all(draft, target, batch, *, dcfg, tcfg):
    """One compile for both cases: the TTT forward, its loss from the fixture's features, and
    the loss with the target run online (lengths from the attention mask)."""
    seq_len = eagle3.sequence_lengths(batch)
    out = eagle3.ttt_forward(draft, dcfg, target, batch["tokens"], seq_len, batch["features"])
    loss, metrics = eagle3.ttt_loss(draft, dcfg, target, batch["tokens"], batch["loss_mask"], seq_len,
                                    batch["features"], batch["last_hidden"])
    online, _ = eagle3.batch_loss(draft, dcfg, target, tcfg, {k: batch[k] for k in ("tokens", "loss_mask", "attention_mask")})
    return seq_len, out, loss, metrics, online


@pytest.mark.parametrize("case", ["A", "B"])
def test_ttt_logits_and_losses_match_deepspec(fx, case):
    """Case A: 16 real tokens; case B: 13 right-padded to 16. Online target features, every
    step's hidden and logits on the rows some key sees, the position masks, the per-step
    losses (local-mean normaliser) and their decayed sum."""
    from dspark_jax.train import target_features

    _, ref, target, tcfg, draft, dcfg = fx
    get = lambda name: ref[f"train{case}_{name}"]
    tokens, am = jnp.asarray(get("input_ids"), jnp.int32), get("attention_mask")
    n = int(am.sum())
    features, last_hidden = jax.jit(target_features, static_argnums=(1, 2))(target, tcfg, dcfg, tokens)
    np.testing.assert_allclose(np.asarray(features)[:, :n], get("target_hidden_states")[:, :n], **TOL)
    np.testing.assert_allclose(np.asarray(last_hidden)[:, :n], get("target_last_hidden_states")[:, :n], **TOL)
    batch = {"tokens": tokens, "loss_mask": jnp.asarray(get("loss_mask")), "attention_mask": jnp.asarray(am),
             "features": jnp.asarray(get("target_hidden_states")), "last_hidden": jnp.asarray(get("target_last_hidden_states"))}
    seq_len, out, loss, metrics, online = _ttt_all(draft, target, batch, dcfg=dcfg, tcfg=tcfg)
    valid = get("step_valid_query")
    np.testing.assert_array_equal(out.valid[:, 0], valid)
    for k in range(dcfg.ttt_length):
        np.testing.assert_allclose(np.asarray(out.logits[k, 0])[valid[k]], get("step_draft_logits")[k][valid[k]], **TOL)
        np.testing.assert_allclose(np.asarray(out.hidden[k, 0])[valid[k]], get("step_hidden")[k][valid[k]], **TOL)
    np.testing.assert_array_equal(eagle3.position_masks(batch["loss_mask"], seq_len, 4)[:, 0], get("step_position_mask"))
    np.testing.assert_allclose(metrics["step_losses"], get("step_loss"), **TOL)
    np.testing.assert_allclose(loss, get("loss"), **TOL)
    np.testing.assert_allclose(online, get("loss"), **TOL)  # the target run online on the batch's tokens
    meta = json.load(open(require_fixture(NAME) / "reference.json"))["training"][f"train{case}"]["metrics"]
    np.testing.assert_allclose(metrics["tau_probabilistic"], meta["train/tau_probabilistic"]["ratio"], **TOL)
    np.testing.assert_allclose(metrics["accept_rate_by_position"],
                               [meta[f"train/accept_rate@{k}"]["ratio"] for k in range(4)], **TOL)


def test_ttt_attention_reads_exactly_deepspecs_mask(fx):
    """ttt_attention on random q/k/v equals a dense softmax under the fixture's attention grid
    (DeepSpec's mask_mod over k + 1 chunks of S keys) on every valid query row."""
    _, ref, *_ = fx
    grid, valid = ref["trainB_step_attn_allowed"], ref["trainB_step_valid_query"]
    S, H, K, Dh = grid.shape[1], 4, 2, 8
    rng = np.random.default_rng(0)
    for k in range(grid.shape[0]):
        q = rng.normal(size=(1, S, H, Dh)).astype(np.float32)
        ks = [rng.normal(size=(1, S, K, Dh)).astype(np.float32) for _ in range(k + 1)]
        vs = [rng.normal(size=(1, S, K, Dh)).astype(np.float32) for _ in range(k + 1)]
        ours = np.asarray(eagle3.ttt_attention(jnp.asarray(q), [jnp.asarray(a) for a in ks], [jnp.asarray(a) for a in vs],
                                               jnp.asarray(valid[k])[None]))
        allowed = grid[k, :, : (k + 1) * S]  # [S, (k+1) S]
        keys, values = np.concatenate(ks, 1)[0], np.concatenate(vs, 1)[0]  # [(k+1) S, K, Dh]
        g = H // K
        scores = np.einsum("shd,thd->hst", q[0], np.repeat(keys, g, 1)) / np.sqrt(Dh)
        scores = np.where(allowed[None], scores, -1e30)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        want = np.einsum("hst,thd->shd", probs, np.repeat(values, g, 1))
        np.testing.assert_allclose(ours[0][valid[k]], want[valid[k]], rtol=1e-5, atol=1e-5)


TINY_TRAIN = dict(vocab=64, hidden=32, layers=3, heads=4, kv_heads=2, head_dim=8)


@pytest.fixture(scope="module")
def train_setup():
    import dataclasses

    from dspark_jax import train as train_lib
    from spec_models import make_target, target_config

    tcfg = target_config(**TINY_TRAIN)
    target = make_target(tcfg, 3)
    cfg = eagle3.Eagle3Config(layers=dataclasses.replace(tcfg, num_hidden_layers=1, eos_token_ids=()),
                              target_layer_ids=(0, 1), ttt_length=3)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 64, (32, 16)).astype(np.int32)
    lengths = rng.integers(8, 17, 32)
    mask = ((np.arange(16)[None] >= 4) & (np.arange(16)[None] < lengths[:, None])).astype(np.int32)
    tokens = np.where(np.arange(16)[None] < lengths[:, None], tokens, 0)
    optimizer = train_lib.make_optimizer(train_lib.OptimConfig(learning_rate=3e-3, total_steps=6))
    return target, tcfg, cfg, {"tokens": tokens, "loss_mask": mask}, optimizer


def eagle3_run(setup, workdir, total_steps):
    from dspark_jax import data as data_lib
    from dspark_jax import train as train_lib
    from dspark_jax.trainer import run_training

    target, tcfg, cfg, data, optimizer = setup
    state = train_lib.init_train_state(eagle3.init_eagle3_params(jax.random.key(5), cfg), optimizer)

    def step_fn(state, batch, key):
        return eagle3.train_step(state, target, batch, key, cfg=cfg, tcfg=tcfg, optimizer=optimizer)

    return run_training(state=state, step_fn=step_fn, batches=data_lib.BatchStream(data, 8, seed=1),
                        total_steps=total_steps, workdir=str(workdir), meta={"kind": "draft", "config": cfg.to_hf()},
                        save_every=2, log_every=1, progress=False)


def test_eagle3_training_lowers_the_loss_and_resumes_exactly(train_setup, tmp_path):
    """Online against the frozen target; 4 steps, stop, then on to 6 = 6 steps straight; the
    work directory loads as an Eagle-3 drafter (its latest checkpoint)."""
    straight, step = eagle3_run(train_setup, tmp_path / "straight", 6)
    assert step == 6
    assert eagle3_run(train_setup, tmp_path / "resumed", 4)[1] == 4
    resumed, step = eagle3_run(train_setup, tmp_path / "resumed", 6)
    assert step == 6
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), resumed.params, straight.params)
    log = [json.loads(l) for l in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 7))
    assert log[-1]["loss"] < log[0]["loss"]
    target, tcfg, cfg, *_ = train_setup
    restored, restored_cfg = load_drafter(tmp_path / "resumed", target, tcfg, "float32")
    assert restored_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, restored, resumed.params)
