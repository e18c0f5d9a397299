"""Comparing two prompts: token alignment, and A - B differences on aligned positions."""

from __future__ import annotations

import numpy as np
import pytest

from analysis import analyze
from analysis.compare import (
    align_tokens,
    aligned_difference,
    aligned_labels,
    attention_difference,
    embedding_cosine_difference,
    residual_norm_difference,
)
from analysis.retention import embedding_cosine, resid_norms
from analysis.testing import make_random_gpt2
from tests.conftest import ATOL

PROMPT_A = "The cat sat on the mat."
PROMPT_B = "The big cat sat on a mat."


def analyses(model_dir, store, *prompts):
    return [analyze(p, str(model_dir), allow_any_path=True, store=store) for p in prompts]


def test_end_alignment_pairs_positions_from_the_last_token():
    a = ["<bos>", "A", "B", "C"]
    b = ["<bos>", "X", "Y", "B", "C"]

    assert align_tokens(a, b, "end") == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert align_tokens(b, a, "end") == [(1, 0), (2, 1), (3, 2), (4, 3)]


def test_end_alignment_is_the_identity_for_equal_counts():
    tokens = ["<bos>", "x", "y", "z"]
    assert align_tokens(tokens, ["<bos>", "p", "q", "r"], "end") == [(i, i) for i in range(4)]


def test_match_alignment_pairs_only_equal_tokens_in_order():
    a = ["<bos>", "The", " cat", " sat", " on", " the", " mat"]
    b = ["<bos>", "The", " big", " cat", " sat", " on", " a", " mat"]

    pairs = align_tokens(a, b, "match")

    assert pairs == [(0, 0), (1, 1), (2, 3), (3, 4), (4, 5), (6, 7)]
    assert all(a[i] == b[j] for i, j in pairs)


def test_match_alignment_of_disjoint_prompts_is_empty():
    assert align_tokens(["a", "b"], ["c", "d", "e"], "match") == []


def test_unknown_alignment_mode_is_refused():
    with pytest.raises(ValueError, match="end, match"):
        align_tokens(["a"], ["a"], "start")


def test_labels_show_both_tokens_only_where_they_differ():
    pairs = [(0, 0), (1, 1)]
    assert aligned_labels(["<bos>", " cat"], ["<bos>", " dog"], pairs) == ["<bos>", " cat |  dog"]


def test_comparing_a_prompt_with_itself_is_zero_everywhere(tiny_model_dir, store):
    a, b = analyses(tiny_model_dir, store, PROMPT_A, PROMPT_A)

    for pairs in (None, align_tokens(a.str_tokens, b.str_tokens, "end")):
        for layer in range(a.n_layers):
            diff = attention_difference(a, b, layer, pairs)
            assert diff.shape == (a.n_heads, a.n_pos, a.n_pos)
            assert np.abs(diff).max() == 0.0
        assert np.abs(residual_norm_difference(a, b, pairs)).max() == 0.0
        for include_pos in (False, True):
            cosines = embedding_cosine_difference(a, b, pairs, include_pos=include_pos)
            assert np.abs(cosines).max() == 0.0
    assert align_tokens(a.str_tokens, b.str_tokens, "match") == [(i, i) for i in range(a.n_pos)]


def test_attention_difference_takes_aligned_queries_and_keys(tiny_model_dir, store):
    a, b = analyses(tiny_model_dir, store, PROMPT_A, PROMPT_B)
    pairs = align_tokens(a.str_tokens, b.str_tokens, "match")
    assert a.n_pos != b.n_pos and len(pairs) >= 3

    diff = attention_difference(a, b, 1, pairs)

    pattern_a, pattern_b = a.attention(1), b.attention(1)
    assert diff.shape == (a.n_heads, len(pairs), len(pairs))
    for n, (qa, qb) in enumerate(pairs):
        for m, (ka, kb) in enumerate(pairs):
            expected = pattern_a[:, qa, ka] - pattern_b[:, qb, kb]
            np.testing.assert_allclose(diff[:, n, m], expected, atol=ATOL)


def test_retention_differences_subtract_on_aligned_positions(tiny_model_dir, store):
    a, b = analyses(tiny_model_dir, store, PROMPT_A, PROMPT_B)
    pairs = align_tokens(a.str_tokens, b.str_tokens, "end")

    norms = residual_norm_difference(a, b, pairs)
    cosines = embedding_cosine_difference(a, b, pairs, include_pos=True)

    assert norms.shape == cosines.shape == (a.n_layers + 1, min(a.n_pos, b.n_pos))
    norms_a, norms_b = resid_norms(a), resid_norms(b)
    cos_a, cos_b = embedding_cosine(a, include_pos=True), embedding_cosine(b, include_pos=True)
    for n, (i, j) in enumerate(pairs):
        np.testing.assert_allclose(norms[:, n], norms_a[:, i] - norms_b[:, j], atol=ATOL)
        np.testing.assert_allclose(cosines[:, n], cos_a[:, i] - cos_b[:, j], atol=ATOL)
    # With the position embedding included, the embedding stage matches itself on both sides.
    np.testing.assert_allclose(cosines[0], 0.0, atol=ATOL)


def test_unequal_counts_need_an_alignment(tiny_model_dir, store):
    a, b = analyses(tiny_model_dir, store, PROMPT_A, PROMPT_B)

    with pytest.raises(ValueError, match=f"{a.n_pos} tokens and prompt B {b.n_pos}"):
        attention_difference(a, b, 0)
    with pytest.raises(ValueError, match="out of range"):
        residual_norm_difference(a, b, [(0, b.n_pos)])


def test_aligned_difference_keeps_leading_axes():
    values_a = np.arange(12, dtype=np.float32).reshape(3, 4)
    values_b = np.ones((3, 2), dtype=np.float32)

    diff = aligned_difference(values_a, values_b, [(1, 0), (3, 1)])

    np.testing.assert_array_equal(diff, values_a[:, [1, 3]] - 1.0)


def test_prompts_on_different_models_are_refused(tiny_model_dir, store, tmp_path):
    other_dir = make_random_gpt2(tmp_path / "other", seed=1)
    (a,) = analyses(tiny_model_dir, store, PROMPT_A)
    (b,) = analyses(other_dir, store, PROMPT_A)

    with pytest.raises(ValueError, match="same model"):
        attention_difference(a, b, 0)
