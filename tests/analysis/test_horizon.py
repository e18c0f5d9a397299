"""Memory horizon: truncated-context losses against direct forward passes of the windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis import analyze, load_model
from analysis import horizon as hz
from tests.conftest import ATOL

PROMPT = "red green blue red green blue"


@pytest.fixture
def pa(tiny_model_dir, store):
    return analyze(PROMPT, str(tiny_model_dir), allow_any_path=True, store=store)


def direct_loss(model_dir, window: list[int], target: int) -> float:
    """Loss of ``target`` after one forward pass of exactly ``window``."""
    loaded = load_model(str(model_dir), allow_any_path=True)
    with torch.no_grad():
        logits = loaded.bridge(torch.tensor([window]))
    return float(-logits[0, -1].log_softmax(-1)[target])


def test_windows_that_cover_the_whole_prefix_give_the_analysis_loss(pa):
    result = hz.memory_horizon(pa)

    assert result.loss.shape == (len(result.k_values), pa.n_pos - 1)
    np.testing.assert_array_equal(result.k_values, np.arange(1, pa.n_pos - 1))  # every k
    for j, k in enumerate(result.k_values):
        # These entries come from a window forward pass, not from the analysis.
        covered = np.flatnonzero(result.context == k)
        assert len(covered) == 1
        np.testing.assert_allclose(result.loss[j, covered], pa.loss[covered], atol=ATOL)
    np.testing.assert_allclose(result.loss[-1], pa.loss, atol=ATOL)


def test_one_token_of_context_is_a_forward_pass_of_bos_and_that_token(pa, tiny_model_dir):
    tokens = pa.tokens.tolist()

    result = hz.memory_horizon(pa)

    for i in range(1, pa.n_pos - 1):
        expected = direct_loss(tiny_model_dir, [tokens[0], tokens[i]], tokens[i + 1])
        assert result.loss[0, i] == pytest.approx(expected, abs=ATOL)
    # Position 0 predicts from BOS alone: there is no context to take away.
    assert result.context[0] == 0
    np.testing.assert_allclose(result.loss[:, 0], pa.loss[0], atol=ATOL)


def test_k_tokens_of_context_are_the_last_k_tokens_after_bos(pa, tiny_model_dir):
    tokens = pa.tokens.tolist()
    i, k = pa.n_pos - 2, 3

    result = hz.memory_horizon(pa)

    expected = direct_loss(tiny_model_dir, [tokens[0], *tokens[i - k + 1 : i + 1]], tokens[i + 1])
    assert result.loss[k - 1, i] == pytest.approx(expected, abs=ATOL)
    assert abs(result.loss[k - 1, i] - pa.loss[i]) > ATOL  # truncation does change the loss


def test_without_bos_the_windows_have_no_bos(tiny_model_dir, store):
    pa = analyze(PROMPT, str(tiny_model_dir), allow_any_path=True, store=store, prepend_bos=False)
    tokens = pa.tokens.tolist()

    result = hz.memory_horizon(pa)

    np.testing.assert_array_equal(result.context, np.arange(1, pa.n_pos))
    for i in range(pa.n_pos - 1):
        expected = direct_loss(tiny_model_dir, [tokens[i]], tokens[i + 1])
        assert result.loss[0, i] == pytest.approx(expected, abs=ATOL)
    np.testing.assert_allclose(result.loss[-1], pa.loss, atol=ATOL)


def test_context_grid_is_every_k_when_short_and_geometric_when_long():
    np.testing.assert_array_equal(hz.context_grid(10, 32), np.arange(1, 11))

    grid = hz.context_grid(1000, 16)

    assert len(grid) == 16 and grid[0] == 1 and grid[-1] == 1000
    assert (np.diff(grid) > 0).all()
    ratios = grid[6:] / grid[5:-1]  # past the small values that rounding merges
    assert ratios.max() / ratios.min() < 1.2


def test_mean_loss_and_horizon_follow_their_definitions(pa):
    result = hz.memory_horizon(pa)

    np.testing.assert_allclose(result.mean_loss, result.loss.mean(-1))
    # Any loss is close under an infinite tolerance: one token (or none, from BOS) suffices.
    np.testing.assert_array_equal(result.horizon(np.inf), np.minimum(1, result.context))
    # None is close under a negative tolerance: the whole context is needed.
    np.testing.assert_array_equal(result.horizon(-1.0), result.context)
    assert ((result.horizon(0.1) >= 0) & (result.horizon(0.1) <= result.context)).all()


def test_progress_counts_batches_and_stopping_caches_nothing(pa, monkeypatch):
    monkeypatch.setattr(hz, "_LOGIT_BATCH_ELEMENTS", 1)  # one window per batch
    n_windows = len(hz.window_plan(pa.n_pos, np.arange(1, pa.n_pos - 1), prepend_bos=True)[0])
    seen = []
    calls = iter(range(100))

    stopped = hz.memory_horizon(
        pa, progress=lambda d, t: seen.append((d, t)), should_stop=lambda: next(calls) >= 2
    )

    assert stopped is None
    assert seen == [(0, n_windows), (1, n_windows), (2, n_windows)]
    assert pa.store.get_array(f"{pa.key}/horizon.m{hz.DEFAULT_MAX_K_VALUES}.loss") is None
    seen.clear()
    hz.memory_horizon(pa, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(done, n_windows) for done in range(n_windows + 1)]


def test_padded_batches_give_the_same_losses_as_single_windows(tiny_model_dir, store, monkeypatch):
    prompt = "one two three four five six seven eight nine ten"
    batched = hz.memory_horizon(
        analyze(prompt, str(tiny_model_dir), allow_any_path=True, store=store)
    )
    monkeypatch.setattr(hz, "_LOGIT_BATCH_ELEMENTS", 1)
    # Another analysis key (top_k differs), so that the horizon is computed afresh.
    other = analyze(prompt, str(tiny_model_dir), allow_any_path=True, store=store, top_k=3)

    single = hz.memory_horizon(other)

    np.testing.assert_allclose(batched.loss, single.loss, atol=ATOL)


def test_each_window_reaches_the_largest_grid_k_that_fits():
    k_values = np.array([1, 2, 4, 8])

    starts, lengths = hz.window_plan(12, k_values, prepend_bos=True)

    # Prompt tokens sit at 1 .. 11; the last prediction is made at position 10.
    np.testing.assert_array_equal(starts, np.arange(1, 11))
    np.testing.assert_array_equal(lengths, [8, 8, 8, 4, 4, 4, 4, 2, 2, 1])


def test_second_call_reads_the_cache(pa, monkeypatch):
    first = hz.memory_horizon(pa, max_k_values=3)
    monkeypatch.setattr(hz, "model_for", lambda _: pytest.fail("the model was needed again"))

    again = hz.memory_horizon(pa, max_k_values=3)

    np.testing.assert_array_equal(first.loss, again.loss)
    np.testing.assert_array_equal(again.k_values, hz.context_grid(pa.n_pos - 2, 3))


def test_a_prompt_of_one_token_has_no_horizon(tiny_model_dir, store):
    pa = analyze("e", str(tiny_model_dir), allow_any_path=True, store=store)
    assert pa.n_pos == 2  # BOS and one byte-level token

    with pytest.raises(ValueError, match="at least two prompt tokens"):
        hz.memory_horizon(pa)
