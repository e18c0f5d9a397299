"""Retention metrics: residual norms and identity, logit lens, attention rollout, retention
curves and direct logit attribution, each against an independent computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformer_lens.tools.analysis.logit_lens import logit_lens as tl_logit_lens

from analysis import analyze, load_model
from analysis import retention as rt
from tests.conftest import ATOL

# Repeats, so that the random model's logit lens and rollout have something to chew on.
PROMPT = "The cat sat on the mat. The cat sat on the mat again."


@pytest.fixture
def pa(tiny_model_dir, store):
    return analyze(PROMPT, str(tiny_model_dir), allow_any_path=True, store=store)


@pytest.fixture
def fresh(pa, tiny_model_dir):
    """A float32 forward pass of the same tokens with every hook cached, and the model."""
    loaded = load_model(str(tiny_model_dir), allow_any_path=True)
    tokens = torch.as_tensor(pa.tokens)[None]
    with torch.no_grad():
        logits, cache = loaded.bridge.run_with_cache(tokens)
    return loaded, tokens, logits[0], cache


def fresh_resid_stack(cache, n_layers: int) -> torch.Tensor:
    stages = [cache[f"blocks.{layer}.hook_resid_pre"][0] for layer in range(n_layers)]
    return torch.stack([*stages, cache[f"blocks.{n_layers - 1}.hook_resid_post"][0]])


def no_hooks_left(bridge) -> bool:
    return all(not hp.fwd_hooks and not hp.bwd_hooks for hp in bridge.hook_dict.values())


# 1. Residual stream ------------------------------------------------------------------------


def test_resid_norms_are_the_l2_norms_of_the_cached_stream(pa):
    norms = rt.resid_norms(pa)

    assert norms.shape == (pa.n_layers + 1, pa.n_pos)
    for layer in range(pa.n_layers + 1):
        expected = np.sqrt((pa.resid(layer).astype(np.float64) ** 2).sum(-1))
        np.testing.assert_allclose(norms[layer], expected, rtol=ATOL)


def test_embedding_cosine_with_pos_is_one_before_the_first_block(pa):
    cosine = rt.embedding_cosine(pa, include_pos=True)

    np.testing.assert_allclose(cosine[0], 1.0, atol=ATOL)


def test_embedding_cosine_matches_torch_cosine_on_a_float32_run(pa, fresh):
    loaded, tokens, _, cache = fresh
    W_E = loaded.bridge.W_E.detach()
    resid = fresh_resid_stack(cache, pa.n_layers)
    expected = torch.nn.functional.cosine_similarity(resid, W_E[tokens[0]][None], dim=-1)

    cosine = rt.embedding_cosine(pa)

    assert cosine.shape == (pa.n_layers + 1, pa.n_pos)
    np.testing.assert_allclose(cosine, expected.numpy(), atol=ATOL)
    # Without W_pos the first stage is below 1: the stream there is W_E + W_pos.
    assert (cosine[0] < 1 - ATOL).all()


# 2. Logit lens -------------------------------------------------------------------------------


def test_logit_lens_final_stage_reproduces_the_model_logits(pa, fresh):
    loaded, tokens, logits, cache = fresh
    W_U, b_U, eps = rt.unembedding(loaded)
    final = cache[f"blocks.{pa.n_layers - 1}.hook_resid_post"][0]

    lens_logits = rt.apply_ln_final(final, eps) @ W_U + b_U

    np.testing.assert_allclose(lens_logits.numpy(), logits.numpy(), atol=ATOL, rtol=0)
    lens = rt.logit_lens_from_resid(
        fresh_resid_stack(cache, pa.n_layers), tokens[0], W_U, b_U, eps=eps, top_k=3
    )
    probs = logits.softmax(-1)
    own = probs.gather(-1, tokens[0][:, None])[:, 0]
    following = probs[:-1].gather(-1, tokens[0, 1:, None])[:, 0]
    np.testing.assert_allclose(lens.token_prob[-1], own.numpy(), atol=ATOL)
    np.testing.assert_allclose(lens.next_prob[-1], following.numpy(), atol=ATOL)
    np.testing.assert_allclose(lens.top_probs[-1], probs.topk(3).values.numpy(), atol=ATOL)


def test_logit_lens_matches_transformer_lens_at_every_stage(pa, fresh):
    loaded, tokens, _, cache = fresh
    W_U, b_U, eps = rt.unembedding(loaded)
    next_targets = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1)  # last column unused
    with torch.no_grad():
        own = tl_logit_lens(
            loaded.bridge, tokens, positions=None, return_type="probs", targets=tokens
        )
        nxt = tl_logit_lens(
            loaded.bridge, tokens, positions=None, return_type="probs", targets=next_targets
        )

    lens = rt.logit_lens_from_resid(
        fresh_resid_stack(cache, pa.n_layers), tokens[0], W_U, b_U, eps=eps
    )

    np.testing.assert_allclose(lens.token_prob, own.values[:, 0, :, 0].numpy(), atol=ATOL)
    np.testing.assert_allclose(lens.next_prob, nxt.values[:, 0, :-1, 0].numpy(), atol=ATOL)
    # Ranks may differ only where two logits are tied within float round-off.
    rank_gap = np.abs(lens.token_rank - own.rank_trajectory()[:, 0].numpy())
    assert (rank_gap <= 1).all() and rank_gap.mean() < 0.05
    rank_gap = np.abs(lens.next_rank - nxt.rank_trajectory()[:, 0, :-1].numpy())
    assert (rank_gap <= 1).all() and rank_gap.mean() < 0.05


def test_cached_logit_lens_is_within_tolerance_of_a_float32_run(pa, fresh):
    loaded, tokens, _, cache = fresh
    W_U, b_U, eps = rt.unembedding(loaded)
    expected = rt.logit_lens_from_resid(
        fresh_resid_stack(cache, pa.n_layers), tokens[0], W_U, b_U, eps=eps
    )

    # The cached stream is float16, so probabilities agree to the shared tolerance, not exactly.
    lens = rt.logit_lens(pa)

    assert lens.token_prob.shape == (pa.n_layers + 1, pa.n_pos)
    assert lens.next_prob.shape == (pa.n_layers + 1, pa.n_pos - 1)
    assert lens.top_ids.shape == (pa.n_layers + 1, pa.n_pos, rt.DEFAULT_LENS_TOP_K)
    np.testing.assert_allclose(lens.token_prob, expected.token_prob, atol=ATOL)
    np.testing.assert_allclose(lens.next_prob, expected.next_prob, atol=ATOL)
    np.testing.assert_allclose(lens.top_probs, expected.top_probs, atol=ATOL)
    np.testing.assert_allclose(lens.kl_to_final, expected.kl_to_final, atol=ATOL)


def test_logit_lens_kl_is_zero_at_the_final_stage_and_never_negative(pa):
    lens = rt.logit_lens(pa)

    np.testing.assert_allclose(lens.kl_to_final[-1], 0.0, atol=ATOL)
    assert (lens.kl_to_final >= 0).all()
    assert lens.mean_kl_to_final.shape == (pa.n_layers + 1,)
    assert lens.kl_to_final[:-1].max() > ATOL  # earlier stages do differ on a random model


def test_logit_lens_rank_zero_exactly_where_the_token_is_the_top_prediction(pa):
    lens = rt.logit_lens(pa, top_k=2)

    is_top = lens.top_ids[..., 0] == pa.tokens[None]
    np.testing.assert_array_equal(lens.token_rank == 0, is_top)
    assert (np.diff(lens.top_probs, axis=-1) <= 0).all()


def test_logit_lens_top_k_strings_decode_the_ids(pa):
    lens = rt.logit_lens(pa, top_k=2)
    tokenizer = load_model(pa.model_id, allow_any_path=True).tokenizer

    strings = rt.logit_lens_top_k_str(pa, lens)

    assert strings[1][3] == [tokenizer.decode([int(t)]) for t in lens.top_ids[1, 3]]


def test_logit_lens_second_call_reads_the_cache(pa, monkeypatch):
    first = rt.logit_lens(pa)
    monkeypatch.setattr(rt, "model_for", lambda _: pytest.fail("the model was needed again"))

    second = rt.logit_lens(pa)

    np.testing.assert_array_equal(first.token_rank, second.token_rank)
    np.testing.assert_array_equal(first.top_probs, second.top_probs)


# 3. Attention rollout ------------------------------------------------------------------------


def random_causal_patterns(n_layers=3, n_heads=2, n_pos=6, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(n_layers, n_heads, n_pos, n_pos))
    scores = np.where(np.tril(np.ones((n_pos, n_pos), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return weights / weights.sum(-1, keepdims=True)


def naive_rollout(patterns: np.ndarray, residual_weight: float) -> list[list[list[float]]]:
    """Abnar & Zuidema's recipe written out with loops, for comparison."""
    n_layers, n_heads, n_pos, _ = patterns.shape
    current = [[1.0 if q == k else 0.0 for k in range(n_pos)] for q in range(n_pos)]
    stages = [current]
    for layer in range(n_layers):
        mixed = []
        for q in range(n_pos):
            row = []
            for k in range(n_pos):
                mean = sum(patterns[layer, h, q, k] for h in range(n_heads)) / n_heads
                row.append((1 - residual_weight) * mean + residual_weight * (q == k))
            total = sum(row)
            mixed.append([value / total for value in row])
        current = [
            [sum(mixed[q][m] * current[m][k] for m in range(n_pos)) for k in range(n_pos)]
            for q in range(n_pos)
        ]
        stages.append(current)
    return stages


def test_rollout_matches_a_naive_loop():
    patterns = random_causal_patterns()

    rollout = rt.attention_rollout(patterns, residual_weight=0.3)

    np.testing.assert_allclose(rollout, np.array(naive_rollout(patterns, 0.3)), atol=ATOL)


def test_rollout_rows_sum_to_one_and_stay_causal(pa):
    rollout = rt.rollout(pa)

    assert rollout.shape == (pa.n_layers + 1, pa.n_pos, pa.n_pos)
    np.testing.assert_allclose(rollout.sum(-1), 1.0, atol=ATOL)
    assert np.abs(np.triu(rollout, k=1)).max() == 0.0
    np.testing.assert_array_equal(rollout[0], np.eye(pa.n_pos))


def test_identity_attention_gives_identity_rollout():
    n_layers, n_heads, n_pos = 3, 2, 5
    patterns = np.broadcast_to(np.eye(n_pos), (n_layers, n_heads, n_pos, n_pos))

    rollout = rt.attention_rollout(patterns)

    np.testing.assert_allclose(rollout, np.broadcast_to(np.eye(n_pos), rollout.shape), atol=ATOL)


def test_rollout_shares_and_memory_reach_are_a_row_and_a_column_of_the_rollout(pa):
    rollout = rt.rollout(pa)
    pos, source = pa.n_pos - 1, 2

    shares = rt.rollout_shares(pa, pos)
    reach = rt.memory_reach(pa, source)

    np.testing.assert_array_equal(shares, rollout[:, pos, :])
    np.testing.assert_array_equal(reach, rollout[-1, :, source])
    np.testing.assert_array_equal(rt.memory_reach(pa, source, layer=1), rollout[1, :, source])
    assert (reach[:source] == 0).all() and (reach[source:] > 0).all()


@pytest.mark.parametrize("bad", [-1, 10_000, 1.5, True])
def test_rollout_views_reject_positions_outside_the_prompt(pa, bad):
    with pytest.raises(ValueError, match="pos"):
        rt.rollout_shares(pa, bad)
    with pytest.raises(ValueError, match="source_pos"):
        rt.memory_reach(pa, bad)


# 4. Retention curves -------------------------------------------------------------------------


def test_retention_curves_follow_the_chosen_tokens(pa):
    positions = [1, 4, pa.n_pos - 1]

    curves = rt.retention_curves(pa, positions)

    assert set(curves) == {"embedding_cosine", "token_rank", "token_prob", "rollout_share"}
    for values in curves.values():
        assert values.shape == (len(positions), pa.n_layers + 1)
    np.testing.assert_array_equal(
        curves["token_rank"], rt.logit_lens(pa).token_rank[:, positions].T
    )
    np.testing.assert_array_equal(
        curves["embedding_cosine"], rt.embedding_cosine(pa)[:, positions].T
    )
    np.testing.assert_allclose(curves["rollout_share"][:, 0], 1.0)
    # Each block mixes in other tokens, so the share of the token itself never grows.
    assert (np.diff(curves["rollout_share"], axis=1) <= ATOL).all()


# 5. Direct logit attribution -----------------------------------------------------------------


@pytest.mark.parametrize("token", [None, 17])
def test_dla_parts_and_biases_add_up_to_the_model_logit(pa, fresh, token):
    _, _, logits, _ = fresh
    pos = 5

    dla = rt.direct_logit_attribution(pa, pos, token)

    expected_token = int(logits[pos].argmax()) if token is None else token
    assert dla.token == expected_token and dla.pos == pos
    assert dla.heads.shape == (pa.n_layers, pa.n_heads)
    assert dla.mlp.shape == dla.attn_bias.shape == dla.attn.shape == (pa.n_layers,)
    assert dla.logit == pytest.approx(float(logits[pos, expected_token]), abs=ATOL)
    assert dla.total == pytest.approx(dla.logit, abs=ATOL)


def test_dla_layers_and_heads_match_transformer_lens_decomposition(pa, fresh):
    loaded, _, _, cache = fresh
    W_U, _, _ = rt.unembedding(loaded)
    pos, token = 7, 123
    with torch.no_grad():
        layers, labels = cache.decompose_resid(apply_ln=True, pos_slice=pos, return_labels=True)
        heads = cache.stack_head_results(apply_ln=True, pos_slice=pos)
    by_label = dict(zip(labels, (layers[:, 0] @ W_U[:, token]).tolist(), strict=True))
    per_head = (heads[:, 0] @ W_U[:, token]).reshape(pa.n_layers, pa.n_heads)

    dla = rt.direct_logit_attribution(pa, pos, token)

    assert dla.embed == pytest.approx(by_label["embed"], abs=ATOL)
    assert dla.pos_embed == pytest.approx(by_label["pos_embed"], abs=ATOL)
    for layer in range(pa.n_layers):
        assert dla.attn[layer] == pytest.approx(by_label[f"{layer}_attn_out"], abs=ATOL)
        assert dla.mlp[layer] == pytest.approx(by_label[f"{layer}_mlp_out"], abs=ATOL)
    np.testing.assert_allclose(dla.heads, per_head.numpy(), atol=ATOL)


def test_compatibility_mode_writes_centred_components(pa, fresh):
    """The convention the DLA relies on: every part of the residual stream has zero mean over
    d_model, so ln_final's centring acts on each part separately without changing the sum."""
    loaded, _, _, cache = fresh
    names = ["hook_embed", "hook_pos_embed"]
    names += [f"blocks.{layer}.hook_attn_out" for layer in range(pa.n_layers)]
    names += [f"blocks.{layer}.hook_mlp_out" for layer in range(pa.n_layers)]

    for name in names:
        assert cache[name].mean(-1).abs().max() < ATOL, name
    for layer in range(pa.n_layers):
        assert loaded.bridge.blocks[layer].attn.b_O.mean().abs() < ATOL


def test_dla_runs_one_hooked_pass_then_reads_the_cache(pa, monkeypatch):
    loaded = load_model(pa.model_id, allow_any_path=True)
    first = rt.direct_logit_attribution(pa, 3)
    assert no_hooks_left(loaded.bridge)
    monkeypatch.setattr(
        loaded.bridge, "run_with_cache", lambda *a, **k: pytest.fail("a second forward pass")
    )

    again = rt.direct_logit_attribution(pa, 3)
    other = rt.direct_logit_attribution(pa, 6, 42)

    np.testing.assert_array_equal(first.heads, again.heads)
    assert other.total == pytest.approx(other.logit, abs=ATOL)


@pytest.mark.parametrize("token", [-1, 10**9, "cat"])
def test_dla_rejects_a_token_outside_the_vocabulary(pa, token):
    with pytest.raises(ValueError, match="token"):
        rt.direct_logit_attribution(pa, 2, token)
