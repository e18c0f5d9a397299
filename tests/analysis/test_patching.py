"""Activation patching: the 0/1 anchors, agreement with transformer_lens.patching, safety."""

from __future__ import annotations

import threading

import numpy as np
import pandas as pd
import pytest
import torch
from transformer_lens import patching as tl_patching

from analysis import load_model
from analysis.patching import (
    PatchingCancelled,
    PatchSite,
    activation_patch,
    normalise,
    run_patches,
    suggest_answer_tokens,
)
from analysis.prompt import tokenize
from tests.conftest import ATOL

COMMON_WORDS = (" the", " and", " of", " to", " in", " is", " a", " it", " that", " was", " for")


def induction_pair(model_name):
    """A clean and a corrupted prompt of equal length that differ in one token, and the answers
    an induction head would give: ``w0 w1 w2 w3 w0 w1 w2`` -> ``w3``, with ``w4`` for ``w3``.

    Built from words that are one token each, so the token structure holds whatever the
    tokenizer's merges."""
    loaded = load_model(model_name, allow_any_path=True)
    encode = loaded.tokenizer.encode
    w = [word for word in COMMON_WORDS if len(encode(word, add_special_tokens=False)) == 1]
    assert len(w) >= 5, f"the tokenizer splits too many common words: {w}"
    clean = "".join([w[0], w[1], w[2], w[3], w[0], w[1], w[2]])
    corrupted = "".join([w[0], w[1], w[2], w[4], w[0], w[1], w[2]])
    return clean, corrupted, (w[3], w[4])


def tokens_and_cache(loaded, clean, corrupted):
    clean_tokens, _ = tokenize(loaded, clean, prepend_bos=True, truncate=False)
    corrupted_tokens, _ = tokenize(loaded, corrupted, prepend_bos=True, truncate=False)
    with torch.inference_mode():
        _, cache = loaded.bridge.run_with_cache(clean_tokens)
    return clean_tokens, corrupted_tokens, cache


def hook_count(bridge) -> int:
    return sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in bridge.hook_dict.values())


def test_patching_nothing_gives_zero_and_the_whole_last_stream_gives_one(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), allow_any_path=True)
    clean, corrupted, answers = induction_pair(str(tiny_model_dir))
    clean_tokens, corrupted_tokens, _ = tokens_and_cache(loaded, clean, corrupted)
    ids = tuple(loaded.tokenizer.encode(a, add_special_tokens=False)[0] for a in answers)
    last = loaded.n_layers - 1

    patched, clean_metric, corrupted_metric = run_patches(
        loaded,
        clean_tokens,
        corrupted_tokens,
        ids,
        [(), (PatchSite("resid_pre", last),), (PatchSite("resid_post", last),)],
    )

    values = normalise(patched, clean_metric, corrupted_metric)
    np.testing.assert_allclose(values, [0.0, 1.0, 1.0], atol=ATOL)
    assert hook_count(loaded.bridge) == 0


def test_embedding_patch_restores_exactly_the_position_that_differs(tiny_model_dir, store):
    clean, corrupted, answers = induction_pair(str(tiny_model_dir))

    result = activation_patch(
        clean,
        corrupted,
        answers,
        "resid_pre",
        str(tiny_model_dir),
        allow_any_path=True,
        store=store,
    )

    differs = [
        a != b for a, b in zip(result.clean_str_tokens, result.corrupted_str_tokens, strict=True)
    ]
    assert sum(differs) == 1
    np.testing.assert_allclose(result.values[0], np.array(differs, dtype=float), atol=ATOL)
    assert result.values.shape == (2, len(differs))
    assert result.axis_names == ("layer", "pos")


KINDS_AND_HELPERS = [
    ("resid_pre", tl_patching.get_act_patch_resid_pre),
    ("attn_out", tl_patching.get_act_patch_attn_out),
    ("head_out_all_pos", tl_patching.get_act_patch_attn_head_out_all_pos),
    ("head_out_by_pos", tl_patching.get_act_patch_attn_head_out_by_pos),
]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "helper"), KINDS_AND_HELPERS)
def test_tiny_model_sweeps_match_transformer_lens(tiny_model_dir, store, kind, helper):
    loaded = load_model(str(tiny_model_dir), allow_any_path=True)
    clean, corrupted, answers = induction_pair(str(tiny_model_dir))

    result = activation_patch(
        clean,
        corrupted,
        answers,
        kind,
        str(tiny_model_dir),
        layer=1,
        batch_size=5,  # not a divisor of any sweep size: the last batch is a partial one
        allow_any_path=True,
        store=store,
    )

    _, corrupted_tokens, cache = tokens_and_cache(loaded, clean, corrupted)
    a, b = result.answer_ids
    with torch.inference_mode():
        expected = helper(
            loaded.bridge,
            corrupted_tokens,
            cache,
            lambda logits: logits[0, -1, a] - logits[0, -1, b],
        ).numpy()
    if kind == "head_out_by_pos":
        expected = expected[1]  # TransformerLens sweeps [layer, pos, head]; we take one layer
    np.testing.assert_allclose(result.patched, expected, atol=ATOL)
    gap = result.clean_metric - result.corrupted_metric
    np.testing.assert_allclose(
        result.values, (expected - result.corrupted_metric) / gap, atol=ATOL * 10
    )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["resid_pre", "attn_out", "head_out_all_pos", "head_out_by_pos"])
def test_demo_model_sweeps_match_transformer_lens(store, kind):
    loaded = load_model("memlens-demo")
    clean, corrupted, answers = induction_pair("memlens-demo")
    layer = loaded.n_layers - 1

    result = activation_patch(
        clean, corrupted, answers, kind, "memlens-demo", layer=layer, store=store
    )

    _, corrupted_tokens, cache = tokens_and_cache(loaded, clean, corrupted)
    a, b = result.answer_ids

    def metric(logits):
        return logits[0, -1, a] - logits[0, -1, b]

    with torch.inference_mode():
        if kind == "head_out_by_pos":
            # get_act_patch_attn_head_out_by_pos at one layer: the same generic sweep and setter,
            # restricted to that layer's rows (the full helper would run every layer).
            index_df = pd.DataFrame(
                [
                    (layer, p, h)
                    for p in range(result.values.shape[0])
                    for h in range(loaded.n_heads)
                ],
                columns=["layer", "pos", "head"],
            )
            expected = tl_patching.generic_activation_patch(
                loaded.bridge,
                corrupted_tokens,
                cache,
                metric,
                patch_setter=tl_patching.layer_pos_head_vector_patch_setter,
                activation_name="z",
                index_df=index_df,
            ).reshape(result.values.shape)
        else:
            expected = dict(KINDS_AND_HELPERS)[kind](loaded.bridge, corrupted_tokens, cache, metric)
    np.testing.assert_allclose(result.patched, expected.numpy(), atol=ATOL)


def test_different_token_counts_are_refused_with_the_counts(tiny_model_dir, store):
    clean, _, answers = induction_pair(str(tiny_model_dir))
    loaded = load_model(str(tiny_model_dir), allow_any_path=True)
    n_clean = len(tokenize(loaded, clean, prepend_bos=True, truncate=False)[0][0])
    n_short = len(tokenize(loaded, answers[0], prepend_bos=True, truncate=False)[0][0])

    with pytest.raises(
        ValueError, match=f"clean prompt is {n_clean} tokens .* {n_short}; patching"
    ):
        activation_patch(
            clean,
            answers[0],
            answers,
            "resid_pre",
            str(tiny_model_dir),
            allow_any_path=True,
            store=store,
        )


def test_answers_must_be_single_tokens_and_layers_given(tiny_model_dir, store):
    clean, corrupted, answers = induction_pair(str(tiny_model_dir))
    kwargs = dict(model=str(tiny_model_dir), allow_any_path=True, store=store)

    with pytest.raises(ValueError, match="single token"):
        activation_patch(clean, corrupted, (" zqxjvkwpyfh", answers[1]), "resid_pre", **kwargs)
    with pytest.raises(ValueError, match="needs a layer"):
        activation_patch(clean, corrupted, answers, "head_out_by_pos", **kwargs)
    with pytest.raises(ValueError, match="layer 2 is out of range"):
        activation_patch(clean, corrupted, answers, "head_out_by_pos", layer=2, **kwargs)
    with pytest.raises(ValueError, match="kind must be one of"):
        activation_patch(clean, corrupted, answers, "mlp_out", **kwargs)
    with pytest.raises(ValueError, match="almost the same logit difference"):
        activation_patch(clean, corrupted, (answers[0], answers[0]), "head_out_all_pos", **kwargs)


def test_hooks_are_removed_and_the_lock_held_when_a_patched_run_fails(
    tiny_model_dir, store, monkeypatch
):
    loaded = load_model(str(tiny_model_dir), allow_any_path=True)
    clean, corrupted, answers = induction_pair(str(tiny_model_dir))
    original = loaded.bridge.forward
    seen = {}

    def failing_forward(tokens, *args, **kwargs):
        if tokens.shape[0] > 1:  # only the batched, patched runs
            seen["hooks"] = hook_count(loaded.bridge)
            other = threading.Thread(
                target=lambda: seen.setdefault("free", loaded.lock.acquire(blocking=False))
            )
            other.start()
            other.join()
            raise RuntimeError("simulated failure inside a patched run")
        return original(tokens, *args, **kwargs)

    monkeypatch.setattr(loaded.bridge, "forward", failing_forward)
    with pytest.raises(RuntimeError, match="simulated failure"):
        activation_patch(
            clean,
            corrupted,
            answers,
            "attn_out",
            str(tiny_model_dir),
            allow_any_path=True,
            store=store,
        )

    assert seen["hooks"] > 0  # the patch hooks were attached during the run
    assert seen["free"] is False  # another thread could not take the model's lock
    assert hook_count(loaded.bridge) == 0


def test_progress_is_reported_and_stop_cancels_without_caching(tiny_model_dir, store):
    clean, corrupted, answers = induction_pair(str(tiny_model_dir))
    kwargs = dict(model=str(tiny_model_dir), batch_size=3, allow_any_path=True, store=store)
    calls = []

    with pytest.raises(PatchingCancelled):
        activation_patch(
            clean,
            corrupted,
            answers,
            "head_out_all_pos",
            progress=lambda done, total: calls.append((done, total)),
            should_stop=lambda: len(calls) >= 1,
            **kwargs,
        )
    assert calls == [(3, 8)]

    calls.clear()
    activation_patch(
        clean,
        corrupted,
        answers,
        "head_out_all_pos",
        progress=lambda done, total: calls.append((done, total)),
        **kwargs,
    )
    assert calls == [(3, 8), (6, 8), (8, 8)]  # ran in full: the cancelled sweep left no entry


def test_second_call_reads_the_cache(tiny_model_dir, store, monkeypatch):
    loaded = load_model(str(tiny_model_dir), allow_any_path=True)
    clean, corrupted, answers = induction_pair(str(tiny_model_dir))
    kwargs = dict(model=str(tiny_model_dir), allow_any_path=True, store=store)
    first = activation_patch(clean, corrupted, answers, "head_out_all_pos", **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("the model ran although the sweep was cached")

    monkeypatch.setattr(loaded.bridge, "run_with_hooks", refuse)
    second = activation_patch(clean, corrupted, answers, "head_out_all_pos", **kwargs)

    assert second.key == first.key
    np.testing.assert_array_equal(second.values, first.values)
    assert second.clean_str_tokens == first.clean_str_tokens


def test_swapping_the_answers_is_a_new_sweep_with_the_same_normalised_values(tiny_model_dir, store):
    clean, corrupted, answers = induction_pair(str(tiny_model_dir))
    kwargs = dict(model=str(tiny_model_dir), allow_any_path=True, store=store)

    first = activation_patch(clean, corrupted, answers, "head_out_all_pos", **kwargs)
    swapped = activation_patch(clean, corrupted, answers[::-1], "head_out_all_pos", **kwargs)

    assert swapped.key != first.key
    np.testing.assert_allclose(swapped.patched, -first.patched, atol=ATOL)
    np.testing.assert_allclose(swapped.values, first.values, atol=ATOL)


def test_suggested_answers_include_the_first_differing_tokens(tiny_model_dir, store):
    clean, corrupted, answers = induction_pair(str(tiny_model_dir))

    suggestions = suggest_answer_tokens(
        clean, corrupted, str(tiny_model_dir), allow_any_path=True, store=store
    )

    by_source = {s.source: s for s in suggestions}
    difference = by_source["first_difference"]
    assert (difference.clean, difference.corrupted) == answers
    if "top_prediction" in by_source:
        top = by_source["top_prediction"]
        assert top.clean_id != top.corrupted_id
        assert suggestions[0] is top


def test_trained_demo_model_prefers_each_prompts_induction_answer(store):
    # Holds for the trained embedded model (it has induction heads), not for an untrained
    # placeholder: the clean prompt favours its copied token, the corrupted prompt the other.
    clean, corrupted, answers = induction_pair("memlens-demo")

    result = activation_patch(
        clean, corrupted, answers, "head_out_all_pos", "memlens-demo", store=store
    )

    assert result.clean_metric > 0 > result.corrupted_metric
    assert result.values.max() > 0.3  # some head carries a good share of the effect
