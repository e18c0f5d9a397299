"""analyze(): one forward pass, cached per layer, faithful to a fresh run, safe on bad input."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from analysis import analyze, load_model
from analysis.prompt import FORMAT_VERSION, tokenize
from analysis.settings import REPO_ROOT
from tests.conftest import ATOL

PROMPT = "The cat sat on the mat. The cat sat on the mat."


def fresh_cache(model_dir, prompt=PROMPT):
    loaded = load_model(str(model_dir), allow_any_path=True)
    tokens, _ = tokenize(loaded, prompt, prepend_bos=True, truncate=False)
    with torch.inference_mode():
        logits, cache = loaded.bridge.run_with_cache(tokens)
    return logits[0], cache


def test_cached_attention_matches_a_fresh_run(tiny_model_dir, store):
    pa = analyze(PROMPT, str(tiny_model_dir), allow_any_path=True, store=store)
    _, cache = fresh_cache(tiny_model_dir)

    for layer in range(pa.n_layers):
        expected = cache[f"blocks.{layer}.attn.hook_pattern"][0].numpy()
        np.testing.assert_allclose(pa.attention(layer), expected, atol=ATOL, rtol=0)


def test_cached_resid_matches_a_fresh_run_to_float16(tiny_model_dir, store):
    pa = analyze(PROMPT, str(tiny_model_dir), allow_any_path=True, store=store)
    _, cache = fresh_cache(tiny_model_dir)

    final = cache[f"blocks.{pa.n_layers - 1}.hook_resid_post"][0].numpy()
    np.testing.assert_allclose(pa.resid(pa.n_layers), final, rtol=2e-3, atol=2e-3)
    first = cache["blocks.0.hook_resid_pre"][0].numpy()
    np.testing.assert_allclose(pa.resid(0), first, rtol=2e-3, atol=2e-3)


def test_loss_and_top_k_come_from_the_logits(tiny_model_dir, store):
    pa = analyze(PROMPT, str(tiny_model_dir), allow_any_path=True, store=store)
    logits, _ = fresh_cache(tiny_model_dir)

    logprobs = logits.log_softmax(-1)
    tokens = torch.as_tensor(pa.tokens)
    expected = -logprobs[:-1].gather(-1, tokens[1:, None])[:, 0]
    np.testing.assert_allclose(pa.loss, expected.numpy(), atol=ATOL)
    ids, probs = pa.top_k()
    assert ids.shape == (pa.n_pos, 10)
    assert (ids[:, 0] == logits.argmax(-1).numpy()).all()
    assert np.all(np.diff(probs, axis=1) <= 1e-3)  # sorted, highest first


def test_second_call_does_no_forward_pass(tiny_model_dir, store, monkeypatch):
    first = analyze(PROMPT, str(tiny_model_dir), allow_any_path=True, store=store)
    loaded = load_model(str(tiny_model_dir), allow_any_path=True)

    def refuse(*args, **kwargs):
        raise AssertionError("the model ran although the analysis was cached")

    monkeypatch.setattr(loaded.bridge, "run_with_cache", refuse)
    second = analyze(PROMPT, str(tiny_model_dir), allow_any_path=True, store=store)
    assert second.key == first.key
    np.testing.assert_array_equal(second.attention(1), first.attention(1))


def test_options_and_prompt_are_part_of_the_key(tiny_model_dir, store):
    base = analyze(PROMPT, str(tiny_model_dir), allow_any_path=True, store=store)
    other_prompt = analyze(PROMPT + " ", str(tiny_model_dir), allow_any_path=True, store=store)
    no_bos = analyze(
        PROMPT, str(tiny_model_dir), allow_any_path=True, store=store, prepend_bos=False
    )

    assert len({base.key, other_prompt.key, no_bos.key}) == 3
    assert no_bos.n_pos == base.n_pos - 1


def test_one_layer_read_touches_one_entry(tiny_model_dir, store, monkeypatch):
    pa = analyze(PROMPT, str(tiny_model_dir), allow_any_path=True, store=store)
    seen = []
    original = store.get_array
    monkeypatch.setattr(store, "get_array", lambda key: seen.append(key) or original(key))

    pa.attention(1)
    assert seen == [f"{pa.key}/attn.1"]


def test_corrupted_entry_is_recomputed(tiny_model_dir, store):
    pa = analyze(PROMPT, str(tiny_model_dir), allow_any_path=True, store=store)
    expected = pa.attention(0)
    store._cache.set(f"{pa.key}/attn.0", b"Zgarbage", tag=pa.key)

    np.testing.assert_allclose(pa.attention(0), expected, atol=ATOL)


def test_corrupted_metadata_is_recomputed(tiny_model_dir, store):
    pa = analyze(PROMPT, str(tiny_model_dir), allow_any_path=True, store=store)
    store._cache.set(f"{pa.key}/meta", b"{not json", tag=pa.key)

    again = analyze(PROMPT, str(tiny_model_dir), allow_any_path=True, store=store)
    assert again.str_tokens == pa.str_tokens
    assert again.meta["format"] == FORMAT_VERSION


def test_evicted_layer_is_recomputed(tiny_model_dir, store):
    pa = analyze(PROMPT, str(tiny_model_dir), allow_any_path=True, store=store)
    expected = pa.resid(1)
    store._cache.delete(f"{pa.key}/resid.1")

    np.testing.assert_array_equal(pa.resid(1), expected)


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("", "empty"),
        ("   \n\t ", "empty"),
        ("a\x00b", r"U\+0000"),
        ("bell\x07", r"U\+0007"),
        ("x" * 20_001, "20,000"),
        (None, "must be text"),
    ],
)
def test_bad_prompt_raises_and_writes_nothing(tiny_model_dir, store, prompt, message):
    with pytest.raises(ValueError, match=message):
        analyze(prompt, str(tiny_model_dir), allow_any_path=True, store=store)
    assert len(store._cache) == 0


def test_prompt_over_the_context_gives_counts_and_writes_nothing(tiny_model_dir, store):
    long_prompt = "hello " * 300  # the tiny model's context is 128 tokens

    with pytest.raises(ValueError, match=r"the prompt is [\d,]+ tokens; .* at most 128"):
        analyze(long_prompt, str(tiny_model_dir), allow_any_path=True, store=store)
    assert len(store._cache) == 0


def test_truncation_keeps_bos_and_the_last_tokens(tiny_model_dir, store):
    long_prompt = " ".join(f"w{i}" for i in range(300))
    pa = analyze(long_prompt, str(tiny_model_dir), allow_any_path=True, store=store, truncate=True)

    assert pa.n_pos == 128
    assert pa.str_tokens[0] == "<|endoftext|>"
    assert pa.meta["original_length"] > 128
    assert "".join(pa.str_tokens).endswith("w299")


def test_results_survive_a_new_process(tiny_model_dir, cache_dir):
    analyze(PROMPT, str(tiny_model_dir), allow_any_path=True)
    script = textwrap.dedent(
        f"""
        import analysis, analysis.models as m
        m._boot = None  # any forward pass would now fail
        pa = analysis.analyze({PROMPT!r}, {str(tiny_model_dir)!r}, allow_any_path=True)
        print(pa.n_pos, float(pa.attention(1).sum()))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    n_pos, total = out.stdout.split()
    assert int(n_pos) == 21
    assert abs(float(total) - 4 * 21) < 0.1  # 4 heads, every row sums to 1


def test_two_processes_at_once_leave_a_valid_cache(tiny_model_dir, cache_dir):
    script = textwrap.dedent(
        f"""
        import analysis
        pa = analysis.analyze({PROMPT!r}, {str(tiny_model_dir)!r}, allow_any_path=True)
        print(pa.key)
        """
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT
        )
        for _ in range(2)
    ]
    keys = {proc.communicate(timeout=180)[0].strip() for proc in procs}
    assert all(proc.returncode == 0 for proc in procs)
    assert len(keys) == 1

    pa = analyze(PROMPT, str(tiny_model_dir), allow_any_path=True)
    _, cache = fresh_cache(tiny_model_dir)
    expected = cache["blocks.1.attn.hook_pattern"][0].numpy()
    np.testing.assert_allclose(pa.attention(1), expected, atol=ATOL)
