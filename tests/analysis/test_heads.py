"""Head scores: detection patterns and scores against TransformerLens's head detector, perfect
synthetic heads, and the battery against an independent diagonal-stripe computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformer_lens import head_detector as tl

from analysis import analyze, load_model
from analysis import heads as hd
from tests.conftest import ATOL

SEG_LEN = 6


def repeated_tokens(seg_len: int = SEG_LEN, seed: int = 0) -> np.ndarray:
    return hd.repeated_random_tokens(1, seg_len, 1000, seed=seed)[0]


def random_causal_pattern(n_heads: int, n_pos: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(n_heads, n_pos, n_pos)) * 3
    scores = np.where(np.tril(np.ones((n_pos, n_pos), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return (weights / weights.sum(-1, keepdims=True)).astype(np.float32)


def one_hot_rows(targets: list[int]) -> np.ndarray:
    """A pattern whose query q puts all its weight on key targets[q]."""
    pattern = np.zeros((len(targets), len(targets)), dtype=np.float32)
    pattern[np.arange(len(targets)), targets] = 1.0
    return pattern


# Detection patterns ------------------------------------------------------------------------


def test_detection_patterns_equal_transformer_lens_ones():
    # Repeats inside the sequence too, so accidental duplicates are covered.
    tokens = np.array([5, 7, 5, 9, 7, 7, 5, 2])
    tl_tokens = torch.as_tensor(tokens)[None]

    np.testing.assert_array_equal(
        hd.previous_token_detection(len(tokens)),
        tl.get_previous_token_head_detection_pattern(tl_tokens).numpy(),
    )
    np.testing.assert_array_equal(
        hd.duplicate_token_detection(tokens),
        tl.get_duplicate_token_head_detection_pattern(tl_tokens).numpy(),
    )
    np.testing.assert_array_equal(
        hd.induction_detection(tokens),
        tl.get_induction_head_detection_pattern(tl_tokens).numpy(),
    )


def test_detection_score_is_transformer_lens_mul_score_over_rows_with_targets():
    tokens = np.array([5, 7, 5, 9, 7, 7, 5, 2, 9, 5])
    pattern = random_causal_pattern(3, len(tokens))

    for detection in (
        hd.previous_token_detection(len(tokens)),
        hd.duplicate_token_detection(tokens),
        hd.induction_detection(tokens),
    ):
        ours = hd.detection_score(pattern, detection)
        n_rows, n_target_rows = len(tokens), int(detection.any(-1).sum())
        for head in range(3):
            theirs = tl.compute_head_attention_similarity_score(
                torch.as_tensor(pattern[head]),
                torch.as_tensor(detection),
                exclude_bos=False,
                exclude_current_token=False,
                error_measure="mul",
            )
            assert ours[head] == pytest.approx(theirs * n_rows / n_target_rows, abs=ATOL)


def test_detection_score_is_nan_when_no_query_has_a_target():
    tokens = np.arange(8)  # nothing repeats

    score = hd.detection_score(random_causal_pattern(2, 8), hd.duplicate_token_detection(tokens))

    assert np.isnan(score).all()


# Perfect synthetic heads ------------------------------------------------------------------


def test_perfect_induction_head_scores_one():
    tokens = repeated_tokens()
    # Second half: i -> i - L + 1; first half: the first token (an idle head's sink).
    targets = [0] * SEG_LEN + [i - SEG_LEN + 1 for i in range(SEG_LEN, 2 * SEG_LEN)]
    pattern = one_hot_rows(targets)[None]

    scores = hd.head_scores_from_patterns([pattern[None]], tokens[None])

    assert scores.induction[0, 0] == pytest.approx(1.0, abs=ATOL)
    assert scores.duplicate_token[0, 0] == pytest.approx(0.0, abs=ATOL)


def test_perfect_duplicate_token_head_scores_one():
    tokens = repeated_tokens()
    targets = [0] * SEG_LEN + [i - SEG_LEN for i in range(SEG_LEN, 2 * SEG_LEN)]

    scores = hd.head_scores_from_patterns([one_hot_rows(targets)[None, None]], tokens[None])

    assert scores.duplicate_token[0, 0] == pytest.approx(1.0, abs=ATOL)
    assert scores.induction[0, 0] == pytest.approx(0.0, abs=ATOL)


def test_perfect_previous_token_head_scores_one_and_looks_one_back():
    n_pos = 2 * SEG_LEN
    targets = [0, *range(n_pos - 1)]

    scores = hd.head_scores_from_patterns([one_hot_rows(targets)[None, None]], repeated_tokens())

    assert scores.previous_token[0, 0] == pytest.approx(1.0, abs=ATOL)
    assert scores.mean_distance[0, 0] == pytest.approx(1.0, abs=ATOL)
    assert scores.entropy[0, 0] == pytest.approx(0.0, abs=ATOL)


def test_uniform_attention_has_entropy_log_k_and_distance_half_the_position():
    n_pos = 9
    uniform = np.tril(np.ones((n_pos, n_pos), np.float32))
    uniform /= uniform.sum(-1, keepdims=True)
    queries = np.arange(1, n_pos)  # query 0 is left out of the averages

    scores = hd.head_scores_from_patterns([uniform[None, None]], np.arange(n_pos)[None])

    assert scores.entropy[0, 0] == pytest.approx(np.log(queries + 1).mean(), abs=ATOL)
    assert scores.mean_distance[0, 0] == pytest.approx((queries / 2).mean(), abs=ATOL)


def test_best_returns_the_highest_scoring_head():
    scores = hd.HeadScores(**{name: np.zeros((2, 3), np.float32) for name in hd.HEAD_SCORE_NAMES})
    scores.induction[1, 2] = 0.7

    assert scores.best("induction") == (1, 2, pytest.approx(0.7))
    with pytest.raises(ValueError, match="unknown head score"):
        scores.best("copying")


# The battery ---------------------------------------------------------------------------------


def test_battery_tokens_repeat_a_segment_without_special_tokens_or_inner_repeats(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), allow_any_path=True)

    tokens = hd.battery_tokens(loaded, seg_len=40, n_seqs=5, seed=3)

    assert tokens.shape == (5, 80)
    np.testing.assert_array_equal(tokens[:, :40], tokens[:, 40:])
    assert all(len(set(row[:40])) == 40 for row in tokens)
    assert not np.isin(tokens, loaded.tokenizer.all_special_ids).any()
    np.testing.assert_array_equal(tokens, hd.battery_tokens(loaded, seg_len=40, n_seqs=5, seed=3))


def test_battery_scores_match_the_diagonal_stripes_of_a_fresh_run(tiny_model_dir, store):
    loaded = load_model(str(tiny_model_dir), allow_any_path=True)
    seg_len, n_seqs = 10, 3
    tokens = torch.as_tensor(hd.battery_tokens(loaded, seg_len=seg_len, n_seqs=n_seqs, seed=0))
    with torch.no_grad():
        logits, cache = loaded.bridge.run_with_cache(tokens)

    scores = hd.model_head_scores(loaded, seg_len=seg_len, n_seqs=n_seqs, seed=0, store=store)

    for layer in range(loaded.n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]  # [batch, head, q, k]
        # The TransformerLens demo's induction score: the stripe seg_len - 1 below the diagonal.
        stripe = pattern.diagonal(offset=1 - seg_len, dim1=-2, dim2=-1)[..., 1:]
        np.testing.assert_allclose(scores.induction[layer], stripe.mean((0, 2)), atol=ATOL)
        previous = pattern.diagonal(offset=-1, dim1=-2, dim2=-1)
        np.testing.assert_allclose(scores.previous_token[layer], previous.mean((0, 2)), atol=ATOL)
        duplicate = pattern.diagonal(offset=-seg_len, dim1=-2, dim2=-1)
        np.testing.assert_allclose(scores.duplicate_token[layer], duplicate.mean((0, 2)), atol=ATOL)
    loss = -logits.log_softmax(-1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0].mean(0)
    np.testing.assert_allclose(scores.repeat_loss, loss.numpy(), atol=ATOL)
    first, second = loss[: seg_len - 1].mean(), loss[seg_len:].mean()
    assert scores.loss_ratio == pytest.approx(float(second / first), abs=ATOL)


def test_battery_is_computed_once_per_model_and_options(tiny_model_dir, store, monkeypatch):
    loaded = load_model(str(tiny_model_dir), allow_any_path=True)
    first = hd.model_head_scores(loaded, seg_len=8, n_seqs=2, store=store)

    def forward(*args, **kwargs):
        raise RuntimeError("a second forward pass")

    monkeypatch.setattr(loaded.bridge, "run_with_cache", forward)

    again = hd.model_head_scores(loaded, seg_len=8, n_seqs=2, store=store)

    for name in hd.HEAD_SCORE_NAMES:
        np.testing.assert_array_equal(getattr(first, name), getattr(again, name))
        assert getattr(again, name).shape == (loaded.n_layers, loaded.n_heads)
    with pytest.raises(RuntimeError, match="a second forward pass"):
        hd.model_head_scores(loaded, seg_len=8, n_seqs=2, seed=1, store=store)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"seg_len": 1}, "seg_len"), ({"n_seqs": 0}, "n_seqs"), ({"seg_len": 100}, "context")],
)
def test_battery_rejects_options_it_cannot_run(tiny_model_dir, store, options, message):
    with pytest.raises(ValueError, match=message):
        hd.model_head_scores(str(tiny_model_dir), allow_any_path=True, store=store, **options)


# Per-prompt scores -------------------------------------------------------------------------


def test_prompt_head_scores_match_transformer_lens_on_the_cached_patterns(tiny_model_dir, store):
    pa = analyze(
        "one two three one two three", str(tiny_model_dir), allow_any_path=True, store=store
    )
    tokens = torch.as_tensor(pa.tokens)[None]

    scores = hd.prompt_head_scores(pa)

    for name, builder in (
        ("previous_token", tl.get_previous_token_head_detection_pattern),
        ("induction", tl.get_induction_head_detection_pattern),
    ):
        detection = builder(tokens)
        n_target_rows = int(detection.any(-1).sum())
        for layer in range(pa.n_layers):
            pattern = torch.as_tensor(pa.attention(layer))
            for head in range(pa.n_heads):
                theirs = tl.compute_head_attention_similarity_score(
                    pattern[head],
                    detection,
                    exclude_bos=False,
                    exclude_current_token=False,
                    error_measure="mul",
                )
                expected = theirs * pa.n_pos / n_target_rows
                assert getattr(scores, name)[layer, head] == pytest.approx(expected, abs=ATOL)
    assert scores.repeat_loss is None and scores.loss_ratio is None


def test_prompt_without_repeats_has_no_duplicate_or_induction_score(tiny_model_dir, store):
    pa = analyze("one two three", str(tiny_model_dir), allow_any_path=True, store=store)

    scores = hd.prompt_head_scores(pa)

    assert np.isnan(scores.induction).all() and np.isnan(scores.duplicate_token).all()
    assert np.isfinite(scores.previous_token).all() and np.isfinite(scores.entropy).all()
