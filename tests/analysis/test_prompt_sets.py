"""Prompt sets: parsing with bad rows by line number, and per-prompt measures checked by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis import load_model
from analysis.prompt import tokenize
from analysis.prompt_sets import (
    BadRow,
    HeadAttentionMeasure,
    PromptSet,
    head_attention_to_token,
    induction_attention,
    parse_prompt_file,
    parse_prompt_text,
    previous_occurrences,
    repeated_token_loss,
    repeated_token_mask,
    run_prompt_set,
)
from tests.conftest import ATOL

COMMON_WORDS = (" the", " and", " of", " to", " in", " is", " a", " it", " that", " was", " for")


def single_token_words(model_dir, count: int) -> list[str]:
    """Words that are one token each for this tokenizer, so prompts built from them have a
    known token structure whatever the tokenizer's merges."""
    tokenizer = load_model(str(model_dir), allow_any_path=True).tokenizer
    words = [w for w in COMMON_WORDS if len(tokenizer.encode(w, add_special_tokens=False)) == 1]
    assert len(words) >= count, f"the tokenizer splits too many common words: {words}"
    return words[:count]


# ---- parsing ----


def test_pasted_lines_become_prompts_with_line_numbers():
    parsed = parse_prompt_text("first prompt\n second, with a space\r\nthird\n")

    assert parsed.prompts == ["first prompt", " second, with a space", "third"]
    assert parsed.lines == [1, 2, 3]
    assert parsed.bad_rows == []


def test_bad_lines_are_reported_by_number_and_the_rest_kept():
    text = "good one\n\n   \nbad \x07 bell\ntoo long here\ngood two"

    parsed = parse_prompt_text(text, max_chars=10)

    assert parsed.prompts == ["good one", "good two"]
    assert parsed.lines == [1, 6]
    assert [bad.line for bad in parsed.bad_rows] == [2, 3, 4, 5]
    reasons = [bad.reason for bad in parsed.bad_rows]
    assert "empty" in reasons[0] and "empty" in reasons[1]
    assert "U+0007" in reasons[2]
    assert "13 characters; the limit is 10" in reasons[3]


def test_prompts_past_the_maximum_are_reported_once():
    text = "\n".join(f"prompt {i}" for i in range(1, 8))

    parsed = parse_prompt_text(text, max_prompts=3)

    assert parsed.prompts == ["prompt 1", "prompt 2", "prompt 3"]
    assert parsed.bad_rows == [BadRow(4, "the set is capped at 3 prompts; lines 4-7 were not read")]


def test_csv_uses_the_prompt_column_and_file_line_numbers():
    content = b'id,Prompt\n1,"The cat sat"\n2,"spans\ntwo lines"\n3,\n4\n5,last one\n'

    parsed = parse_prompt_file("set.csv", content)

    assert parsed.prompts == ["The cat sat", "spans\ntwo lines", "last one"]
    assert parsed.lines == [2, 3, 7]
    assert [bad.line for bad in parsed.bad_rows] == [5, 6]
    assert "empty" in parsed.bad_rows[0].reason
    assert "no cell in the prompt column" in parsed.bad_rows[1].reason


def test_csv_without_a_prompt_header_reads_the_first_column_of_every_row():
    parsed = parse_prompt_file("set.CSV", b"\xef\xbb\xbfalpha,x\nbeta,y\n")

    assert parsed.prompts == ["alpha", "beta"]
    assert parsed.lines == [1, 2]


def test_text_files_are_read_line_by_line():
    parsed = parse_prompt_file("prompts.txt", "one\ntwo\n")
    assert parsed.prompts == ["one", "two"]


def test_a_file_that_is_not_utf8_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="not UTF-8 text.*save it as UTF-8"):
        parse_prompt_file("set.txt", b"caf\xe9\n")


# ---- measures on hand-built arrays ----


def test_repeated_tokens_follow_the_definition():
    # t_j is repeated when t_{j-1} occurred before (at i) and t_{i+1} == t_j.
    tokens = np.array([0, 5, 6, 7, 5, 6, 8, 5, 6])

    assert previous_occurrences(tokens).tolist() == [-1, -1, -1, -1, 1, 2, -1, 4, 5]
    assert np.flatnonzero(repeated_token_mask(tokens)).tolist() == [5, 8]
    loss = np.arange(8, dtype=np.float32)  # entry j - 1 predicts t_j
    assert repeated_token_loss(loss, tokens) == (pytest.approx((4 + 7) / 2), 2)
    assert repeated_token_loss(np.ones(3), np.array([0, 1, 2, 3])) == (None, 0)


def test_induction_attention_averages_over_the_token_after_the_previous_occurrence():
    tokens = np.array([0, 5, 6, 7, 5, 6, 8, 5, 6])
    rng = np.random.default_rng(0)
    pattern = rng.random((2, 9, 9)).astype(np.float32)
    pattern /= pattern.sum(-1, keepdims=True)
    perfect = np.full((9, 9), 0.0, dtype=np.float32)
    perfect[np.arange(9), 0] = 1.0
    for q, target in [(4, 2), (5, 3), (7, 5), (8, 6)]:
        perfect[q] = 0.0
        perfect[q, target] = 1.0
    pattern[1] = perfect

    scores = induction_attention([pattern], tokens)

    expected_head0 = np.mean(
        [pattern[0, 4, 2], pattern[0, 5, 3], pattern[0, 7, 5], pattern[0, 8, 6]]
    )
    assert scores.shape == (1, 2)
    assert abs(scores[0, 0] - expected_head0) < ATOL
    assert abs(scores[0, 1] - 1.0) < ATOL
    assert np.isnan(induction_attention([pattern[:, :4, :4]], np.array([0, 1, 2, 3]))).all()


def test_head_attention_sums_over_matching_tokens_from_the_last_position():
    pattern = np.zeros((2, 4, 4), dtype=np.float32)
    pattern[1, -1] = [0.1, 0.2, 0.3, 0.4]
    str_tokens = ["<bos>", " Paris", " is", "Paris"]

    assert head_attention_to_token(pattern, str_tokens, 1, "Paris") == pytest.approx(0.6)
    assert head_attention_to_token(pattern, str_tokens, 1, " London") == 0.0
    assert head_attention_to_token(pattern, str_tokens, 0, "Paris") == 0.0


# ---- run_prompt_set on the tiny model ----


def fresh_run(model_dir, prompt):
    loaded = load_model(str(model_dir), allow_any_path=True)
    tokens, _ = tokenize(loaded, prompt, prepend_bos=True, truncate=False)
    with torch.inference_mode():
        logits, cache = loaded.bridge.run_with_cache(tokens)
    logprobs = logits[0].log_softmax(-1)
    loss = -logprobs[:-1].gather(-1, tokens[0, 1:, None])[:, 0]
    return tokens[0].numpy(), loss.numpy(), cache


def test_prompt_set_measures_match_a_hand_computation(tiny_model_dir, store):
    w = single_token_words(tiny_model_dir, 4)
    # Tokens: BOS w0 w1 w2 w3 w0 w1 w2; repeated tokens at 6 and 7, induction queries 5, 6, 7.
    prompt = "".join([w[0], w[1], w[2], w[3], w[0], w[1], w[2]])
    measure = HeadAttentionMeasure(layer=1, head=2, token=w[0])
    other = "A second, ordinary prompt."
    parsed = parse_prompt_text(f"{prompt}\n\n{other}\nbad\x01row")

    table = run_prompt_set(
        parsed,
        str(tiny_model_dir),
        ["mean_loss", "repeated_token_loss", "best_induction_attention", measure],
        allow_any_path=True,
        store=store,
    )

    assert [row["line"] for row in table.rows] == [1, 3]
    assert [bad.line for bad in table.bad_rows] == [2, 4]
    assert not table.stopped
    assert {c.id for c in table.columns} == set(table.rows[0]) == set(table.rows[1])

    tokens, loss, cache = fresh_run(tiny_model_dir, prompt)
    row = table.rows[0]
    assert row["n_tokens"] == len(tokens) == 8
    assert abs(row["mean_loss"] - loss.mean()) < ATOL
    assert row["n_repeated_tokens"] == 2
    assert abs(row["repeated_token_loss"] - loss[[5, 6]].mean()) < ATOL

    scores = np.array(
        [
            [
                np.mean(
                    [
                        cache[f"blocks.{layer}.attn.hook_pattern"][0, h, q, k]
                        for q, k in [(5, 2), (6, 3), (7, 4)]
                    ]
                )
                for h in range(4)
            ]
            for layer in range(2)
        ]
    )
    best = np.unravel_index(scores.argmax(), scores.shape)
    assert abs(row["best_induction_attention"] - scores.max()) < ATOL
    assert row["best_induction_head"] == f"L{best[0]}H{best[1]}"

    last_row = cache["blocks.1.attn.hook_pattern"][0, 2, -1]
    assert abs(row["head_attention_0"] - float(last_row[1] + last_row[5])) < ATOL


def test_prompts_the_model_cannot_take_become_bad_rows(tiny_model_dir, store):
    too_long = " the" * 200  # the tiny model's context is 128 tokens

    table = run_prompt_set(
        ["short prompt", too_long, ""],
        str(tiny_model_dir),
        ["mean_loss"],
        allow_any_path=True,
        store=store,
    )

    assert [row["line"] for row in table.rows] == [1]
    assert [bad.line for bad in table.bad_rows] == [2, 3]
    assert "tokens" in table.bad_rows[0].reason and "empty" in table.bad_rows[1].reason


def test_progress_counts_prompts_and_stop_keeps_the_rows_done(tiny_model_dir, store):
    seen = []

    table = run_prompt_set(
        PromptSet(prompts=["one", "two", "three"], lines=[1, 2, 3]),
        str(tiny_model_dir),
        ["mean_loss"],
        progress=lambda done, total: seen.append((done, total)),
        should_stop=lambda: len(seen) >= 2,
        allow_any_path=True,
        store=store,
    )

    assert seen == [(1, 3), (2, 3)]
    assert table.stopped
    assert [row["prompt"] for row in table.rows] == ["one", "two"]


def test_unknown_measures_and_heads_are_refused_before_running(tiny_model_dir, store):
    with pytest.raises(ValueError, match="unknown measure 'loss'"):
        run_prompt_set(["x"], str(tiny_model_dir), ["loss"], allow_any_path=True, store=store)
    with pytest.raises(ValueError, match="head 4 is out of range"):
        run_prompt_set(
            ["x"],
            str(tiny_model_dir),
            [HeadAttentionMeasure(0, 4, "x")],
            allow_any_path=True,
            store=store,
        )


def test_trained_demo_model_predicts_repeats_with_an_induction_head(store):
    # Holds for the trained embedded model (previous-token and induction heads), not for an
    # untrained placeholder.
    half = " The river ran past the old mill, where seven crows sat on a gate."
    table = run_prompt_set(
        [half + half],
        "memlens-demo",
        ["mean_loss", "repeated_token_loss", "best_induction_attention"],
        store=store,
    )

    row = table.rows[0]
    assert row["n_repeated_tokens"] > 5
    assert row["repeated_token_loss"] < 0.7 * row["mean_loss"]
    assert row["best_induction_attention"] > 0.3
