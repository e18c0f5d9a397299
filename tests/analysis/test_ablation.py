"""Ablations: hooks that really edit the model, batching that changes nothing, clean teardown.

Reference values come from hand-written hooks run one at a time through ``run_with_hooks`` and a
``log_softmax`` loss, independent of the batched code path and its ``logsumexp`` loss.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import analysis
from analysis import ablation
from analysis.ablation import (
    AblationCancelled,
    AblationResult,
    Component,
    ablate,
    ablation_sweep,
    sweep_components,
)
from analysis.store import ArrayStore
from analysis.testing import make_random_gpt2
from tests.conftest import ATOL

PROMPT = "The cat sat on the mat. The dog ran to the door and the cat sat still."
# PROMPT with " cat" and " dog" swapped: BPE splits word by word, so the token count is the same.
OTHER_PROMPT = "The dog sat on the mat. The cat ran to the door and the dog sat still."


@pytest.fixture
def pa(tiny_model_dir, store):
    return analysis.analyze(PROMPT, str(tiny_model_dir), allow_any_path=True, store=store)


@pytest.fixture
def loaded(tiny_model_dir):
    return analysis.load_model(str(tiny_model_dir), allow_any_path=True)


@pytest.fixture(scope="module")
def biased_model_dir(tmp_path_factory):
    """A random 2-layer GPT-2 with non-zero biases and larger weights, so ``b_O`` matters and
    ablations move the loss by much more than the tolerance."""
    from transformers import GPT2LMHeadModel

    directory = make_random_gpt2(tmp_path_factory.mktemp("biased-gpt2"), seed=3)
    model = GPT2LMHeadModel.from_pretrained(directory)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias") and ".ln_" not in name:
                param.copy_(0.2 * torch.randn(param.shape, generator=generator))
            elif name.endswith(".weight") and ".ln_" not in name:
                param.mul_(5.0)
    model.save_pretrained(directory)
    return directory


def _no_hooks_left(bridge) -> bool:
    return all(not hp.fwd_hooks and not hp.bwd_hooks for hp in bridge.hook_dict.values())


def _plain_logits(loaded, tokens):
    with loaded.lock, torch.inference_mode():
        return loaded.bridge(torch.as_tensor(tokens)[None]).clone()


def _manual_loss(loaded, tokens, hooks=()) -> np.ndarray:
    """Per-token loss ``[pos - 1]`` of one batch-1 run with ``hooks``, via log_softmax."""
    tokens = torch.as_tensor(tokens)[None]
    with loaded.lock, torch.inference_mode():
        logits = loaded.bridge.run_with_hooks(tokens, fwd_hooks=list(hooks))
    logprobs = logits[0].float().log_softmax(-1)
    return -logprobs[:-1].gather(-1, tokens[0, 1:, None])[:, 0].numpy()


def _manual_hook(component: Component, value=None):
    """A hook replacing ``component`` (every position) with 0 or ``value``, written from
    scratch for one batch row."""

    def hook(activation, hook):
        activation = activation.clone()
        if component.kind == "head":
            activation[0, :, component.head] = 0.0 if value is None else value
        else:
            activation[0] = 0.0 if value is None else value
        return activation

    return (component.hook_name, hook)


# ---- components ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("neuron", 0, 1), "'neuron'"),
        (("head", -1, 0), "layer -1"),
        (("head", 0, None), "needs a head index"),
        (("attn", 0, 2), "head=2"),
        (("head", 0, 1.5), "1.5"),
        (("mlp", 0, None, ()), "positions is empty"),
        (("mlp", 0, None, (3, -2)), "position -2"),
        (("mlp", 0, None, "12"), "'12'"),
    ],
)
def test_component_rejects_bad_values_naming_them(args, message):
    with pytest.raises(ValueError, match=message):
        Component(*args)


def test_component_check_names_the_valid_range():
    with pytest.raises(ValueError, match="layer 5 is out of range: valid values are 0-1"):
        Component("head", 5, 0).check(n_layers=2, n_heads=4, n_pos=10)
    with pytest.raises(ValueError, match="head 4 is out of range: valid values are 0-3"):
        Component("head", 1, 4).check(n_layers=2, n_heads=4, n_pos=10)
    with pytest.raises(ValueError, match="position 10 is out of range: valid values are 0-9"):
        Component("attn", 1, None, (2, 10)).check(n_layers=2, n_heads=4, n_pos=10)


def test_component_positions_are_sorted_and_round_trip_through_json():
    component = Component("head", 1, 2, [5, 3, 5])
    assert component.positions == (3, 5)
    assert component.label == "L1H2 @ 3,5"
    assert Component.from_key(json.loads(json.dumps(component.to_key()))) == component


def test_sweep_components_come_in_layer_order_with_heads_first():
    labels = [c.label for c in sweep_components(2, 2)]
    assert labels == ["L0H0", "L0H1", "L0 attn", "L0 MLP", "L1H0", "L1H1", "L1 attn", "L1 MLP"]


# ---- what one ablation computes ---------------------------------------------------------------


def test_ablating_nothing_changes_nothing(pa):
    result = ablate(pa, [])
    np.testing.assert_allclose(result.loss_after, result.loss_before, atol=ATOL)
    np.testing.assert_allclose(result.loss_before, pa.loss, atol=ATOL)
    assert np.array_equal(result.top_after, result.top_before)
    assert np.array_equal(result.top_before, pa.top_k()[0][:, 0])
    assert not result.failures.any()


@pytest.mark.parametrize(
    "component", [Component("head", 0, 2), Component("attn", 1), Component("mlp", 0)]
)
def test_zero_ablation_matches_a_hand_written_hook(pa, loaded, component):
    result = ablate(pa, component)
    expected = _manual_loss(loaded, pa.tokens, [_manual_hook(component)])
    np.testing.assert_allclose(result.loss_after, expected, atol=ATOL)
    assert np.abs(result.delta_loss).max() > 3 * ATOL  # the hook really reached the output


def test_zeroing_every_head_z_leaves_only_the_bias_b_O(biased_model_dir, store):
    # attn_out = sum_h z_h @ W_O[h] + b_O, so z = 0 for all heads must give attn_out = b_O.
    pa = analysis.analyze(PROMPT, str(biased_model_dir), allow_any_path=True, store=store)
    loaded = analysis.load_model(str(biased_model_dir), allow_any_path=True)
    b_O = loaded.bridge.blocks[0].attn.b_O.detach().clone()
    assert b_O.abs().max() > 0.1

    heads = ablate(pa, [Component("head", 0, h) for h in range(pa.n_heads)])
    only_bias = _manual_hook(Component("attn", 0), value=b_O)
    expected = _manual_loss(loaded, pa.tokens, [only_bias])
    np.testing.assert_allclose(heads.loss_after, expected, atol=ATOL)

    whole_layer = ablate(pa, Component("attn", 0))
    assert np.abs(whole_layer.loss_after - heads.loss_after).max() > 10 * ATOL


def test_ablation_at_some_positions_leaves_earlier_predictions_alone(biased_model_dir, store):
    # Causal attention: position p cannot influence predictions made at positions before p.
    pa = analysis.analyze(PROMPT, str(biased_model_dir), allow_any_path=True, store=store)
    p = 6
    for component in [Component("head", 0, 1, (p,)), Component("mlp", 0, None, (p, p + 3))]:
        result = ablate(pa, component)
        np.testing.assert_allclose(result.delta_loss[:p], 0.0, atol=ATOL)
        assert np.abs(result.delta_loss[p:]).max() > 10 * ATOL


def test_mean_over_a_one_token_reference_is_identity_at_that_position(biased_model_dir, store):
    # Without BOS, position 0 sees only token 0, so its activations in the prompt equal those of
    # the one-token prompt made of that token: their mean (over one position) changes nothing.
    pa = analysis.analyze(
        PROMPT, str(biased_model_dir), allow_any_path=True, store=store, prepend_bos=False
    )
    first = pa.str_tokens[0]
    loaded = analysis.load_model(str(biased_model_dir), allow_any_path=True)
    assert loaded.bridge.to_tokens(first, prepend_bos=False)[0].tolist() == [pa.tokens[0]]

    for component in [
        Component("head", 0, 1, (0,)),
        Component("attn", 1, None, (0,)),
        Component("mlp", 0, None, (0,)),
    ]:
        identity = ablate(pa, component, method="mean", reference_prompts=[first])
        np.testing.assert_allclose(identity.delta_loss, 0.0, atol=ATOL)
        # The mean over the prompt's own positions is not the identity, so this can fail.
        own_mean = ablate(pa, component, method="mean")
        assert np.abs(own_mean.delta_loss).max() > 10 * ATOL


def test_mean_over_reference_prompts_weights_every_token_equally(pa, loaded):
    references = ["The cat", "A dog ran to the door and back again."]
    component = Component("head", 1, 3)
    z = []
    for text in references:
        with torch.inference_mode():
            _, cache = loaded.bridge.run_with_cache(
                loaded.bridge.to_tokens(text), names_filter=component.hook_name
            )
        z.append(cache[component.hook_name][0, :, component.head])
    mean = torch.cat(z).mean(0)

    result = ablate(pa, component, method="mean", reference_prompts=references)
    expected = _manual_loss(loaded, pa.tokens, [_manual_hook(component, value=mean)])
    np.testing.assert_allclose(result.loss_after, expected, atol=ATOL)


def test_mean_over_the_prompt_as_its_own_reference_equals_the_mean_over_its_positions(pa):
    # The reference prompt is tokenized with the analysis's options, so the prompt as its own
    # one-prompt reference set averages exactly the positions the default mean averages.
    components = [Component("attn", 0), Component("mlp", 1, None, (3, 4))]
    own = ablate(pa, components, method="mean")
    referenced = ablate(pa, components, method="mean", reference_prompts=[PROMPT])
    np.testing.assert_allclose(referenced.loss_after, own.loss_after, atol=ATOL)
    np.testing.assert_allclose(referenced.attention_after, own.attention_after, atol=ATOL)

    # A different reference set gives a different mean, so the equality above can fail.
    other = ablate(pa, components, method="mean", reference_prompts=[OTHER_PROMPT, "Hi"])
    assert np.abs(other.loss_after - own.loss_after).max() > 10 * ATOL


def test_resample_from_the_same_prompt_is_a_no_op(pa):
    components = [Component("head", 0, 0), Component("attn", 1), Component("mlp", 0)]
    result = ablate(pa, components, method="resample", source_prompt=PROMPT)
    np.testing.assert_allclose(result.delta_loss, 0.0, atol=ATOL)


def test_resample_patches_in_the_source_activations(pa, loaded):
    source = loaded.bridge.to_tokens(OTHER_PROMPT)
    assert source.shape[1] == pa.n_pos
    component = Component("mlp", 0)
    with torch.inference_mode():
        _, cache = loaded.bridge.run_with_cache(source, names_filter=component.hook_name)

    result = ablate(pa, component, method="resample", source_prompt=OTHER_PROMPT)
    patched = _manual_hook(component, value=cache[component.hook_name][0])
    np.testing.assert_allclose(
        result.loss_after, _manual_loss(loaded, pa.tokens, [patched]), atol=ATOL
    )
    assert np.abs(result.delta_loss).max() > 3 * ATOL


def test_resample_refuses_a_source_of_another_length(pa):
    with pytest.raises(ValueError, match="same number of tokens"):
        ablate(pa, Component("mlp", 0), method="resample", source_prompt="Too short.")


def test_downstream_attention_is_that_of_the_ablated_run(biased_model_dir, store):
    pa = analysis.analyze(PROMPT, str(biased_model_dir), allow_any_path=True, store=store)
    loaded = analysis.load_model(str(biased_model_dir), allow_any_path=True)
    component = Component("head", 0, 1)
    result = ablate(pa, component)
    assert result.attention_layers == (1,)
    np.testing.assert_allclose(result.attention_before[0], pa.attention(1), atol=ATOL)

    patterns = {}

    def keep(pattern, hook):
        patterns["after"] = pattern[0].clone()

    _manual_loss(loaded, pa.tokens, [_manual_hook(component), ("blocks.1.attn.hook_pattern", keep)])
    np.testing.assert_allclose(result.attention_after[0], patterns["after"].numpy(), atol=ATOL)
    np.testing.assert_allclose(
        result.attention_delta(1), result.attention_after[0] - pa.attention(1), atol=ATOL
    )
    assert np.abs(result.attention_delta(1)).max() > 10 * ATOL

    # Attention change: the total-variation distance of each query row, averaged over queries.
    after, before = patterns["after"].numpy(), pa.attention(1)
    rows_tv = [
        [0.5 * sum(abs(after[h, q] - before[h, q])) for q in range(pa.n_pos)]
        for h in range(pa.n_heads)
    ]
    change = result.attention_change()
    assert change.shape == (1, pa.n_heads)
    np.testing.assert_allclose(change[0], np.mean(rows_tv, axis=1), atol=ATOL * pa.n_pos)
    assert change.max() > 10 * ATOL and (change <= 1 + ATOL).all()

    # An ablation in the last layer has nothing downstream.
    last = ablate(pa, Component("head", 1, 0))
    assert last.attention_layers == () and last.attention_change().shape == (0, pa.n_heads)
    with pytest.raises(ValueError, match="not downstream"):
        result.attention_delta(0)


def test_failures_follow_the_documented_definition():
    # tokens 1..4 are predicted at positions 0..3; before: right, right, wrong, right.
    result = AblationResult(
        components=(),
        method="zero",
        str_tokens=("a", "b", "c", "d", "e"),
        tokens=np.array([0, 1, 2, 3, 4]),
        loss_before=np.array([0.5, 0.5, 2.0, 0.2], dtype=np.float32),
        loss_after=np.array([0.6, 1.7, 2.1, 0.4], dtype=np.float32),
        top_before=np.array([1, 2, 9, 4, 7]),
        top_after=np.array([1, 9, 9, 8, 7]),
        top_prob_before=np.ones(5, dtype=np.float32),
        top_prob_after=np.ones(5, dtype=np.float32),
        top_str_before=("",) * 5,
        top_str_after=("",) * 5,
        attention_layers=(),
        attention_before=np.zeros((0, 1, 5, 5), dtype=np.float32),
        attention_after=np.zeros((0, 1, 5, 5), dtype=np.float32),
    )
    assert result.top1_broken.tolist() == [False, True, False, True]
    assert result.loss_jumped.tolist() == [False, True, False, False]
    assert result.failure_tokens.tolist() == [2, 4]
    assert result.with_threshold(0.05).failure_tokens.tolist() == [1, 2, 3, 4]


def test_ablation_rejects_components_outside_the_model(pa):
    with pytest.raises(ValueError, match="layer 2 is out of range: valid values are 0-1"):
        ablate(pa, Component("attn", 2))
    with pytest.raises(ValueError, match=f"position {pa.n_pos} is out of range"):
        ablate(pa, Component("attn", 0, None, (pa.n_pos,)))
    with pytest.raises(ValueError, match="only used by method='resample'"):
        ablate(pa, Component("attn", 0), source_prompt=PROMPT)


# ---- sweeps -------------------------------------------------------------------------------------


@pytest.mark.parametrize("midway", [True, False], ids=["start-at-layer", "whole-model"])
def test_batched_sweep_equals_one_forward_per_ablation(pa, loaded, monkeypatch, midway):
    # 5 rows per pass: uneven chunks that mix heads, attention and MLP of one layer.
    if not midway:
        monkeypatch.setattr(ablation, "_can_start_midway", lambda *args: False)
    sweep = ablation_sweep(pa, batch_size=5)
    before = _manual_loss(loaded, pa.tokens)
    np.testing.assert_allclose(sweep.loss_before, before, atol=ATOL)
    for component in sweep_components(pa.n_layers, pa.n_heads):
        expected = _manual_loss(loaded, pa.tokens, [_manual_hook(component)]) - before
        if component.kind == "head":
            actual = sweep.head_token_delta[component.layer, component.head]
        else:
            actual = getattr(sweep, f"{component.kind}_token_delta")[component.layer]
        np.testing.assert_allclose(actual, expected, atol=ATOL, err_msg=component.label)
    np.testing.assert_allclose(sweep.head_delta, sweep.head_token_delta.mean(-1), atol=ATOL)
    assert sweep.complete and sweep.n_done == pa.n_layers * (pa.n_heads + 2)


def test_sweep_does_not_depend_on_the_batch_size(pa, tmp_path):
    one = ablation_sweep(pa, method="mean", positions=[3, 4, 9], batch_size=1)
    # A fresh store, so the second sweep is computed rather than read back.
    fresh = ArrayStore(tmp_path / "other", 2**30)
    pa_fresh = analysis.PromptAnalysis(key=pa.key, meta=pa.meta, store=fresh)
    many = ablation_sweep(pa_fresh, method="mean", positions=[3, 4, 9], batch_size=7)
    for name in ("head_token_delta", "attn_token_delta", "mlp_token_delta"):
        np.testing.assert_allclose(getattr(many, name), getattr(one, name), atol=ATOL)
    fresh.close()


def test_sweep_entry_equals_the_single_ablation(pa):
    sweep = ablation_sweep(pa, method="resample", source_prompt=OTHER_PROMPT, kinds=["head"])
    single = ablate(pa, Component("head", 1, 2), method="resample", source_prompt=OTHER_PROMPT)
    np.testing.assert_allclose(sweep.head_token_delta[1, 2], single.delta_loss, atol=ATOL)
    assert np.isnan(sweep.attn_token_delta).all() and np.isnan(sweep.mlp_delta).all()


def test_selected_views_average_only_the_selected_tokens(pa):
    selected = range(pa.n_pos // 2, pa.n_pos)
    sweep = ablation_sweep(pa, kinds=["head", "mlp"], selected_tokens=selected)
    loss_index = np.arange(pa.n_pos // 2, pa.n_pos) - 1
    expected = sweep.head_token_delta[..., loss_index].mean(-1)
    np.testing.assert_allclose(sweep.head_delta_selected, expected, atol=ATOL)
    assert np.abs(sweep.head_delta_selected - sweep.head_delta).max() > ATOL / 10

    reselected = sweep.with_selection([1])
    np.testing.assert_allclose(
        reselected.mlp_delta_selected, sweep.mlp_token_delta[:, 0], atol=ATOL
    )
    assert np.isnan(sweep.with_selection(None).head_delta_selected).all()
    with pytest.raises(ValueError, match="token 0 has no loss"):
        sweep.with_selection([0, 3])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kinds": "head"}, "must be a list"),
        ({"kinds": ["head", "neuron"]}, "kinds must be"),
        ({"batch_size": 0}, "at least 1"),
        ({"selected_tokens": [0]}, "token 0 has no loss"),
        ({"method": "noise"}, "method must be one of"),
        ({"method": "resample"}, "needs source_prompt"),
        ({"method": "mean", "reference_prompts": []}, "reference_prompts is empty"),
        ({"method": "mean", "reference_prompts": ["Fine", " \n"]}, "reference prompt 2: .*empty"),
        ({"method": "mean", "reference_prompts": ["a"] * 65}, "at most 64"),
        ({"positions": [99]}, "position 99 is out of range"),
    ],
)
def test_sweep_rejects_bad_arguments(pa, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ablation_sweep(pa, **kwargs)


def test_progress_counts_every_ablation(pa):
    calls = []
    ablation_sweep(pa, kinds=["head", "attn"], batch_size=4, progress=lambda *a: calls.append(a))
    total = pa.n_layers * (pa.n_heads + 1)
    # Passes never mix layers: each layer's 4 heads and attention take a pass of 4 and one of 1.
    assert calls == [(0, total), (4, total), (5, total), (9, total), (total, total)]


# ---- hooks, locks, cancellation and the cache ----------------------------------------------


def test_every_forward_pass_holds_the_model_lock(pa, loaded):
    # Every pass, whole-model or started at a block, runs the last block.
    held = []
    handle = loaded.bridge.blocks[-1].register_forward_pre_hook(
        lambda module, args: held.append(loaded.lock._is_owned())
    )
    try:
        ablate(pa, Component("attn", 0), method="mean", reference_prompts=["One", "Two words"])
        ablation_sweep(pa, method="resample", source_prompt=OTHER_PROMPT, batch_size=6)
    finally:
        handle.remove()
    # ablate: clean, two references, ablated; sweep: clean, source, two passes of six.
    assert len(held) >= 4 + 4 and all(held)


def test_passes_start_at_a_block_only_where_that_reproduces_the_model(pa, loaded, monkeypatch):
    monkeypatch.setattr(ablation, "_midway_ok", {})
    tokens = torch.as_tensor(pa.tokens)[None]
    last = ablation._resid_name(loaded.n_layers - 1)
    logits, clean = ablation._clean_run(loaded, tokens, {last})
    assert ablation._can_start_midway(loaded, logits, clean[last])

    monkeypatch.setattr(ablation, "_midway_ok", {})
    assert not ablation._can_start_midway(loaded, logits + 0.01, clean[last])


def test_hooks_are_removed_after_an_error_mid_run(pa, loaded, monkeypatch):
    baseline = _plain_logits(loaded, pa.tokens)

    def failing_edit(*args):
        raise RuntimeError("injected failure inside a hook")

    monkeypatch.setattr(ablation, "_apply_edits", failing_edit)
    with pytest.raises(RuntimeError, match="injected failure"):
        ablation_sweep(pa, batch_size=3)
    with pytest.raises(RuntimeError, match="injected failure"):
        ablate(pa, [Component("head", 0, 0), Component("mlp", 1)])

    assert _no_hooks_left(loaded.bridge)
    assert torch.equal(_plain_logits(loaded, pa.tokens), baseline)


def test_cancel_returns_the_finished_part_and_removes_hooks(pa, loaded):
    baseline = _plain_logits(loaded, pa.tokens)
    asked = []

    def stop_after_two_passes() -> bool:
        # Asked before the clean pass and before each ablation pass.
        asked.append(1)
        return len(asked) > 3

    with pytest.raises(AblationCancelled, match="after 6 of 12 ablations") as info:
        ablation_sweep(pa, batch_size=3, selected_tokens=[5], should_stop=stop_after_two_passes)
    partial = info.value.partial
    assert not partial.complete and partial.n_done == 6 and partial.selected_tokens == (5,)
    assert not np.isnan(partial.head_token_delta[0]).any()
    assert np.isnan(partial.mlp_token_delta[1]).all()
    assert _no_hooks_left(loaded.bridge)
    assert torch.equal(_plain_logits(loaded, pa.tokens), baseline)

    with pytest.raises(AblationCancelled):
        ablate(pa, Component("mlp", 0), should_stop=lambda: True)
    # The cancelled sweep was not cached: running it again computes every entry.
    assert ablation_sweep(pa, batch_size=3).n_done == 12


def test_cached_results_come_back_without_a_forward_pass(pa, loaded, monkeypatch):
    component = [
        Component("head", 0, 3, (2, 5)),
        Component("mlp", 1),
        Component("mlp", 1, None, [4]),
    ]
    first = ablate(pa, component, method="mean")
    first_sweep = ablation_sweep(pa, method="zero", kinds=["head"], selected_tokens=[4, 5])

    def no_forward(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(loaded.bridge, "forward", no_forward)
    monkeypatch.setattr(ablation, "load_model", no_forward)
    again = ablate(pa, list(reversed(component)), method="mean", loss_threshold=0.5)
    again_sweep = ablation_sweep(pa, method="zero", kinds=["head"], selected_tokens=[4, 5])

    for name in ("loss_before", "loss_after", "top_after", "top_prob_after", "attention_after"):
        assert np.array_equal(getattr(again, name), getattr(first, name)), name
    assert again.top_str_after == first.top_str_after and again.loss_threshold == 0.5
    assert np.array_equal(again_sweep.head_token_delta, first_sweep.head_token_delta)
    assert np.array_equal(again_sweep.head_delta_selected, first_sweep.head_delta_selected)
    with pytest.raises(AssertionError, match="cache should have answered"):
        ablate(pa, Component("mlp", 0))


# ---- the trained demo model ---------------------------------------------------------------------

# Rare words, so the first copy is hard to predict and only in-context copying helps the second.
REPEATED = " quixotic lemur zephyr obsidian marmalade fjord kumquat" * 2


def test_demo_repeat_breaks_without_attention_after_layer_0(store):
    # Holds for the trained memlens-demo, which has induction heads: copying the second copy of a
    # phrase needs a previous-token head and an induction head in a later layer (Olsson et al.
    # 2022), so with the attention of layers 1 and up removed the repeat can no longer be
    # copied, and its tokens lose far more than the first copy's.
    pa = analysis.analyze(REPEATED, analysis.DEMO_MODEL, store=store)
    n = (pa.n_pos - 1) // 2
    assert pa.tokens[1 : n + 1].tolist() == pa.tokens[n + 1 :].tolist()
    second_copy = np.arange(n + 2, pa.n_pos) - 1  # loss entries of tokens n+2 .. 2n
    first_copy = np.arange(2, n + 1) - 1

    later_attention = [Component("attn", layer) for layer in range(1, pa.n_layers)]
    result = ablate(pa, later_attention)
    assert result.delta_loss[second_copy].mean() > 1.0
    assert result.delta_loss[second_copy].mean() > result.delta_loss[first_copy].mean() + 0.5
    assert result.failures[second_copy].mean() > 0.5

    # In a model this small one attention layer carries the copying (no full redundancy).
    sweep = ablation_sweep(pa, kinds=["attn"], selected_tokens=range(n + 2, pa.n_pos))
    assert np.nanmax(sweep.attn_delta_selected) > 0.5
