"""Head summaries against hand-built patterns and a loop-by-loop recomputation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from analysis.attention_stats import (
    STAT_TITLES,
    attention_entropy,
    first_token_attention,
    head_stats,
    max_attention_weight,
    mean_attention_distance,
    token_flow,
)
from tests.conftest import ATOL


def causal_uniform(n_pos: int) -> np.ndarray:
    """Each query spreads its weight evenly over itself and every earlier key."""
    pattern = np.tril(np.ones((n_pos, n_pos), dtype=np.float32))
    return pattern / pattern.sum(-1, keepdims=True)


def previous_token(n_pos: int) -> np.ndarray:
    """Each query (after the first) puts all its weight on the key just before it."""
    pattern = np.zeros((n_pos, n_pos), dtype=np.float32)
    pattern[0, 0] = 1.0
    pattern[np.arange(1, n_pos), np.arange(n_pos - 1)] = 1.0
    return pattern


def random_causal(rng: np.random.Generator, *shape: int) -> np.ndarray:
    """Softmax of random scores under a causal mask, ``[*shape[:-1], n, n]``."""
    n_pos = shape[-1]
    scores = rng.normal(size=(*shape[:-1], n_pos, n_pos)) * 3
    scores = np.where(np.tril(np.ones((n_pos, n_pos), dtype=bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return (weights / weights.sum(-1, keepdims=True)).astype(np.float32)


def test_uniform_attention_has_the_largest_entropy_and_half_the_distance():
    n_pos = 9
    pattern = causal_uniform(n_pos)
    queries = np.arange(1, n_pos)

    assert attention_entropy(pattern) == pytest.approx(np.log(queries + 1).mean(), abs=ATOL)
    assert mean_attention_distance(pattern) == pytest.approx((queries / 2).mean(), abs=ATOL)
    assert max_attention_weight(pattern) == pytest.approx((1 / (queries + 1)).mean(), abs=ATOL)
    assert first_token_attention(pattern) == pytest.approx((1 / (queries + 1)).mean(), abs=ATOL)


def test_previous_token_head_is_sharp_and_looks_back_one_position():
    pattern = previous_token(12)

    assert attention_entropy(pattern) == pytest.approx(0.0, abs=ATOL)
    assert mean_attention_distance(pattern) == pytest.approx(1.0, abs=ATOL)
    assert max_attention_weight(pattern) == pytest.approx(1.0, abs=ATOL)
    # Only query 1 looks at key 0: 1 of the 11 queries averaged.
    assert first_token_attention(pattern) == pytest.approx(1 / 11, abs=ATOL)


def test_attention_sink_head_puts_everything_on_the_first_token():
    n_pos = 7
    pattern = np.zeros((n_pos, n_pos), dtype=np.float32)
    pattern[:, 0] = 1.0

    assert first_token_attention(pattern) == pytest.approx(1.0, abs=ATOL)
    assert mean_attention_distance(pattern) == pytest.approx(np.arange(1, n_pos).mean(), abs=ATOL)


def test_stats_match_a_loop_over_queries_for_every_head():
    rng = np.random.default_rng(0)
    patterns = random_causal(rng, 2, 3, 10)  # [layer, head, q, k]

    stats = head_stats(patterns)

    assert stats.shape == (2, 3, len(STAT_TITLES))
    for layer in range(2):
        for head in range(3):
            rows = patterns[layer, head]
            entropies, distances, maxima, firsts = [], [], [], []
            for q in range(1, 10):
                row = rows[q, : q + 1]
                entropies.append(-sum(p * math.log(p) for p in row if p > 0))
                distances.append(sum(p * (q - k) for k, p in enumerate(row)))
                maxima.append(row.max())
                firsts.append(row[0])
            expected = [np.mean(entropies), np.mean(distances), np.mean(maxima), np.mean(firsts)]
            np.testing.assert_allclose(stats[layer, head], expected, atol=ATOL)


def test_single_position_uses_its_only_row():
    pattern = np.ones((3, 1, 1), dtype=np.float32)

    np.testing.assert_allclose(head_stats(pattern), [[0.0, 0.0, 1.0, 1.0]] * 3, atol=ATOL)


def test_token_flow_matches_a_loop_and_sent_is_one_minus_self_attention():
    rng = np.random.default_rng(1)
    n_pos = 8
    pattern = random_causal(rng, 4, n_pos)  # [head, q, k]

    received, sent = token_flow(pattern)

    assert received.shape == sent.shape == (4, n_pos)
    for head in range(4):
        for t in range(n_pos - 1):
            later = [pattern[head, q, t] for q in range(t + 1, n_pos)]
            assert received[head, t] == pytest.approx(np.mean(later), abs=ATOL)
        assert np.isnan(received[head, n_pos - 1])
    np.testing.assert_allclose(sent, 1 - np.diagonal(pattern, axis1=-2, axis2=-1), atol=ATOL)
    assert np.all(sent[:, 0] == 0)


def test_token_flow_of_previous_token_head_passes_everything_one_step():
    n_pos = 6
    received, sent = token_flow(previous_token(n_pos))

    # Key t is attended by query t+1 only: 1 out of its n_pos-1-t later queries.
    np.testing.assert_allclose(received[:-1], 1 / (n_pos - 1 - np.arange(n_pos - 1)), atol=ATOL)
    np.testing.assert_allclose(sent, [0, 1, 1, 1, 1, 1], atol=ATOL)


def test_non_square_patterns_are_refused_with_their_shape():
    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        attention_entropy(np.zeros((3, 4)))
