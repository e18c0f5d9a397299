"""Interventions: knock out heads, attention layers or MLP layers and see which memories break.

A :class:`Component` names what to ablate: one attention head (its ``hook_z``, the per-head
output before ``W_O``), a whole attention layer (``hook_attn_out``) or a whole MLP layer
(``hook_mlp_out``), optionally only at some positions. Three methods replace its activation:

- ``zero``: with 0. For a head this removes its ``z @ W_O`` term but keeps the layer's bias
  ``b_O``; for a whole attention layer the bias goes too.
- ``mean``: with its mean over every position of the prompt (BOS included when it was
  prepended), or over every position of a set of reference prompts. The mean always comes from
  clean (unablated) runs.
- ``resample``: with its value in a clean run of another prompt, position by position, so the
  source must tokenize to exactly as many tokens as the prompt.

:func:`ablate` runs one intervention (any number of components at once) and returns the
before/after per-token loss, top-1 predictions, the "memory failures" and the attention
patterns of the layers downstream. :func:`ablation_sweep` ablates every head, attention layer
and MLP layer one at a time. Several ablations share one forward pass: ablation i is batch row
i, and each hook edits every row for that row's own component, which is how TransformerLens's
patching helpers batch their runs. A pass whose ablations all sit in layer l or later starts at
block l from the clean run's ``resid_pre``, since nothing below l changes.

Every hooked forward pass holds the model's lock and adds its hooks through the bridge's
``hooks()`` context manager, so they are removed when the pass ends, fails or is cancelled.
Results are cached in the :class:`~analysis.store.ArrayStore` of the prompt's analysis, keyed by
the model id, its weights' fingerprint, the prompt, the method and the components.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from analysis.models import LoadedModel, load_model
from analysis.prompt import PromptAnalysis, tokenize, validate_prompt
from analysis.retention import cached_arrays
from analysis.store import dequantize_attention, quantize_attention

logger = logging.getLogger(__name__)

ComponentKind = Literal["head", "attn", "mlp"]
AblationMethod = Literal["zero", "mean", "resample"]
COMPONENT_KINDS: tuple[str, ...] = get_args(ComponentKind)
ABLATION_METHODS: tuple[str, ...] = get_args(AblationMethod)

# Bump when what is cached, or how, changes: old entries then stop matching.
FORMAT_VERSION = 2
# A loss rise of 1 nat means the correct token's probability fell by a factor of e (about 2.7).
DEFAULT_LOSS_THRESHOLD = 1.0
# Automatic batch size: rows whose estimated activations fit this many bytes, at most this many
# rows (past ~32 rows a CPU forward gains nothing per row, and memory only grows).
AUTO_BATCH_BYTES = 1 << 30
MAX_AUTO_BATCH = 32

# The mean over reference prompts runs one forward pass per prompt.
MAX_REFERENCE_PROMPTS = 64

# Passes that start at a block from the clean run's cached residual must reproduce the model's
# logits this closely, or every pass runs from the embedding (see _can_start_midway).
MIDWAY_TOLERANCE = 1e-4

_HOOK_NAMES = {
    "head": "blocks.{layer}.attn.hook_z",
    "attn": "blocks.{layer}.hook_attn_out",
    "mlp": "blocks.{layer}.hook_mlp_out",
}

_midway_ok: dict[tuple[str, str, str], bool] = {}


class AblationCancelled(Exception):
    """``should_stop`` asked an ablation to stop; ``partial`` holds what was done, if any."""

    def __init__(self, message: str, partial: SweepResult | None = None):
        super().__init__(message)
        self.partial = partial


def _check_index(name: str, value: object, highest: int | None = None) -> int:
    """``value`` as an int in ``[0, highest]``; ValueError naming it and the range otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < 0 or (highest is not None and value > highest):
        valid = f"0-{highest}" if highest is not None else "0 or more"
        raise ValueError(f"{name} {value} is out of range: valid values are {valid}")
    return value


@dataclass(frozen=True)
class Component:
    """Something to ablate: one attention head, a whole attention layer or an MLP layer.

    Attributes:
        kind: ``"head"`` (the head's ``hook_z``, ``[batch, pos, n_heads, d_head]``), ``"attn"``
            (``hook_attn_out``, ``[batch, pos, d_model]``) or ``"mlp"`` (``hook_mlp_out``).
        layer: The block index.
        head: The head index for ``kind="head"``; must be None otherwise.
        positions: Ablate only at these positions (token indices, BOS included); None means
            every position. Stored sorted and without duplicates.
    """

    kind: ComponentKind
    layer: int
    head: int | None = None
    positions: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.kind not in COMPONENT_KINDS:
            raise ValueError(
                f"component kind must be one of {', '.join(COMPONENT_KINDS)}, got {self.kind!r}"
            )
        object.__setattr__(self, "layer", _check_index("layer", self.layer))
        if self.kind == "head":
            if self.head is None:
                raise ValueError(f"a head component needs a head index (layer {self.layer})")
            object.__setattr__(self, "head", _check_index("head", self.head))
        elif self.head is not None:
            raise ValueError(
                f"head={self.head!r} only makes sense for kind='head', not {self.kind!r}; "
                "leave it None"
            )
        if self.positions is not None:
            if isinstance(self.positions, (str, bytes)) or not hasattr(self.positions, "__iter__"):
                raise ValueError(f"positions must be a list of integers, got {self.positions!r}")
            positions = tuple(sorted({_check_index("position", p) for p in self.positions}))
            if not positions:
                raise ValueError("positions is empty: pass None to ablate at every position")
            object.__setattr__(self, "positions", positions)

    @property
    def hook_name(self) -> str:
        """The bridge hook whose activation this component replaces."""
        return _HOOK_NAMES[self.kind].format(layer=self.layer)

    @property
    def label(self) -> str:
        """A short name for menus and titles: ``L1H3``, ``L1 attn``, ``L0 MLP @ 4,5``."""
        name = {
            "head": f"L{self.layer}H{self.head}",
            "attn": f"L{self.layer} attn",
            "mlp": f"L{self.layer} MLP",
        }[self.kind]
        if self.positions is not None:
            name += " @ " + ",".join(str(p) for p in self.positions)
        return name

    def to_key(self) -> list:
        """Primitives only, for cache keys and ``dcc.Store``; :meth:`from_key` inverts it."""
        positions = None if self.positions is None else list(self.positions)
        return [self.kind, self.layer, self.head, positions]

    @classmethod
    def from_key(cls, key: Sequence) -> Component:
        """Rebuild a component from :meth:`to_key`'s list (for example after a JSON round trip)."""
        if not isinstance(key, (list, tuple)) or len(key) != 4:
            raise ValueError(f"a component key is [kind, layer, head, positions], got {key!r}")
        kind, layer, head, positions = key
        return cls(kind, layer, head, None if positions is None else tuple(positions))

    def check(self, n_layers: int, n_heads: int, n_pos: int) -> None:
        """Raise ValueError when this component does not exist in the model or the prompt."""
        _check_index("layer", self.layer, n_layers - 1)
        if self.head is not None:
            _check_index("head", self.head, n_heads - 1)
        for position in self.positions or ():
            _check_index("position", position, n_pos - 1)


@dataclass(frozen=True, eq=False)
class AblationResult:
    """Before and after one intervention on one prompt.

    Loss arrays follow :attr:`analysis.prompt.PromptAnalysis.loss`: entry i is the loss of
    predicting token i+1 from the tokens up to i. A **memory failure** is such an entry whose
    top-1 prediction was the correct next token before the ablation and is not after it
    (:attr:`top1_broken`), or whose loss rose by more than ``loss_threshold`` nats
    (:attr:`loss_jumped`; the default, 1 nat, means the correct token became at least e times
    less likely).

    Attributes:
        components: What was ablated, all together in one run.
        method: ``zero``, ``mean`` or ``resample``.
        str_tokens: The prompt's tokens as strings, ``[pos]``.
        tokens: Token ids, ``[pos]``.
        loss_before: Per-token loss of the clean run, ``[pos - 1]``.
        loss_after: Per-token loss of the ablated run, ``[pos - 1]``.
        top_before: Top-1 next-token prediction at each position, ``[pos]`` ids.
        top_after: The same after the ablation, ``[pos]``.
        top_prob_before: Probability of ``top_before``, ``[pos]``.
        top_prob_after: Probability of ``top_after``, ``[pos]``.
        top_str_before: ``top_before`` as strings.
        top_str_after: ``top_after`` as strings.
        attention_layers: The layers downstream of the first ablated one, whose attention
            the ablation can change (a head's own layer is upstream of its ``hook_z``).
        attention_before: Their clean patterns, ``[len(attention_layers), n_heads, q_pos,
            k_pos]``, within 1.2e-4 (fixed-point storage, as in the prompt analysis).
        attention_after: Their patterns after the ablation, same shape.
        loss_threshold: The loss rise, in nats, that counts as a failure.
    """

    components: tuple[Component, ...]
    method: str
    str_tokens: tuple[str, ...]
    tokens: np.ndarray
    loss_before: np.ndarray
    loss_after: np.ndarray
    top_before: np.ndarray
    top_after: np.ndarray
    top_prob_before: np.ndarray
    top_prob_after: np.ndarray
    top_str_before: tuple[str, ...]
    top_str_after: tuple[str, ...]
    attention_layers: tuple[int, ...]
    attention_before: np.ndarray
    attention_after: np.ndarray
    loss_threshold: float = DEFAULT_LOSS_THRESHOLD

    @property
    def delta_loss(self) -> np.ndarray:
        """``loss_after - loss_before``, ``[pos - 1]``; positive means the ablation hurt."""
        return self.loss_after - self.loss_before

    @property
    def delta_mean_loss(self) -> float:
        """Change of the mean per-token loss (NaN for a one-token prompt)."""
        return float(np.mean(self.delta_loss)) if self.delta_loss.size else float("nan")

    @property
    def correct_before(self) -> np.ndarray:
        """Whether the clean top-1 prediction was the next token, ``[pos - 1]`` bool."""
        return self.top_before[:-1] == self.tokens[1:]

    @property
    def correct_after(self) -> np.ndarray:
        """Whether the ablated top-1 prediction is the next token, ``[pos - 1]`` bool."""
        return self.top_after[:-1] == self.tokens[1:]

    @property
    def top1_broken(self) -> np.ndarray:
        """Correct top-1 before, wrong after, ``[pos - 1]`` bool."""
        return self.correct_before & ~self.correct_after

    @property
    def loss_jumped(self) -> np.ndarray:
        """Loss rose by more than ``loss_threshold``, ``[pos - 1]`` bool."""
        return self.delta_loss > self.loss_threshold

    @property
    def failures(self) -> np.ndarray:
        """The memory failures (see the class docstring), ``[pos - 1]`` bool."""
        return self.top1_broken | self.loss_jumped

    @property
    def failure_tokens(self) -> np.ndarray:
        """Positions of the tokens whose prediction broke (failure entry i is token i+1)."""
        return np.flatnonzero(self.failures) + 1

    def attention_delta(self, layer: int) -> np.ndarray:
        """After minus before for one downstream layer, ``[n_heads, q_pos, k_pos]``."""
        if layer not in self.attention_layers:
            raise ValueError(
                f"layer {layer} is not downstream of the ablation; the ablation can change "
                f"the attention of layers {list(self.attention_layers)}"
            )
        index = self.attention_layers.index(layer)
        return self.attention_after[index] - self.attention_before[index]

    def attention_change(self) -> np.ndarray:
        """How far each downstream head's attention moved, ``[len(attention_layers), n_heads]``.

        The total-variation distance between a query's attention row before and after,
        ``0.5 * sum_k |after[q, k] - before[q, k]|`` (0: the same distribution, 1: disjoint
        keys), averaged over the query positions. Row i is layer ``attention_layers[i]``.
        """
        moved = 0.5 * np.abs(self.attention_after - self.attention_before).sum(-1)
        return moved.mean(-1)

    def with_threshold(self, loss_threshold: float) -> AblationResult:
        """The same result with another failure threshold (no forward pass)."""
        return dataclasses.replace(self, loss_threshold=_check_threshold(loss_threshold))


@dataclass(frozen=True, eq=False)
class SweepResult:
    """Every head, attention layer and MLP layer ablated one at a time.

    Per-token arrays hold ``loss_after - loss_before`` with the loss convention of
    :class:`AblationResult` (entry i is the loss of token i+1). Entries that were not run
    (a kind that was not asked for, or a sweep stopped early) are NaN.

    Attributes:
        method: ``zero``, ``mean`` or ``resample``.
        kinds: The component kinds swept.
        positions: The positions every component was ablated at; None means all.
        selected_tokens: Token positions (1 or more) whose loss the ``*_selected`` views
            average, such as the second half of a repeated phrase.
        loss_before: Per-token loss of the clean run, ``[pos - 1]``.
        head_token_delta: ``[n_layers, n_heads, pos - 1]``.
        attn_token_delta: ``[n_layers, pos - 1]``.
        mlp_token_delta: ``[n_layers, pos - 1]``.
        complete: False when the sweep was stopped before every ablation ran.
    """

    method: str
    kinds: tuple[str, ...]
    positions: tuple[int, ...] | None
    selected_tokens: tuple[int, ...]
    loss_before: np.ndarray
    head_token_delta: np.ndarray
    attn_token_delta: np.ndarray
    mlp_token_delta: np.ndarray
    complete: bool = True

    @property
    def head_delta(self) -> np.ndarray:
        """Change of the mean loss when each head is ablated, ``[n_layers, n_heads]``."""
        return _mean_last(self.head_token_delta)

    @property
    def attn_delta(self) -> np.ndarray:
        """Change of the mean loss when each attention layer is ablated, ``[n_layers]``."""
        return _mean_last(self.attn_token_delta)

    @property
    def mlp_delta(self) -> np.ndarray:
        """Change of the mean loss when each MLP layer is ablated, ``[n_layers]``."""
        return _mean_last(self.mlp_token_delta)

    @property
    def head_delta_selected(self) -> np.ndarray:
        """Change of the mean loss of the selected tokens, ``[n_layers, n_heads]`` (NaN if
        none are selected)."""
        return _mean_last(self.head_token_delta[..., self._selected_index])

    @property
    def attn_delta_selected(self) -> np.ndarray:
        """As :attr:`head_delta_selected`, per attention layer, ``[n_layers]``."""
        return _mean_last(self.attn_token_delta[..., self._selected_index])

    @property
    def mlp_delta_selected(self) -> np.ndarray:
        """As :attr:`head_delta_selected`, per MLP layer, ``[n_layers]``."""
        return _mean_last(self.mlp_token_delta[..., self._selected_index])

    @property
    def n_done(self) -> int:
        """How many ablations ran."""
        done = [self.head_token_delta, self.attn_token_delta, self.mlp_token_delta]
        return int(sum((~np.isnan(a[..., :1])).sum() for a in done)) if self._n_loss else 0

    def with_selection(self, selected_tokens: Sequence[int]) -> SweepResult:
        """The same sweep averaged over other selected tokens (no forward pass)."""
        n_pos = self._n_loss + 1
        return dataclasses.replace(self, selected_tokens=_check_selected(selected_tokens, n_pos))

    @property
    def _n_loss(self) -> int:
        return int(self.loss_before.shape[0])

    @property
    def _selected_index(self) -> np.ndarray:
        return np.asarray(self.selected_tokens, dtype=np.int64) - 1


def _mean_last(array: np.ndarray) -> np.ndarray:
    """Mean over the last axis; NaN (without a warning) where it is empty or not computed."""
    if array.shape[-1] == 0:
        return np.full(array.shape[:-1], np.nan, dtype=np.float32)
    return array.mean(axis=-1)


def _check_threshold(loss_threshold: object) -> float:
    if isinstance(loss_threshold, bool) or not isinstance(
        loss_threshold, (int, float, np.integer, np.floating)
    ):
        raise ValueError(f"loss_threshold must be a number of nats, got {loss_threshold!r}")
    if not loss_threshold > 0:
        raise ValueError(f"loss_threshold must be positive, got {loss_threshold!r}")
    return float(loss_threshold)


def _check_selected(selected_tokens: Sequence[int] | None, n_pos: int) -> tuple[int, ...]:
    """Selected token positions, sorted; ValueError for token 0 (nothing predicts it)."""
    if selected_tokens is None:
        return ()
    if isinstance(selected_tokens, (str, bytes)) or not hasattr(selected_tokens, "__iter__"):
        raise ValueError(f"selected_tokens must be a list of positions, got {selected_tokens!r}")
    if n_pos < 2:
        if list(selected_tokens):
            raise ValueError("a one-token prompt has no loss to select")
        return ()
    selected = set()
    for token in selected_tokens:
        if not isinstance(token, bool) and isinstance(token, (int, np.integer)) and token == 0:
            raise ValueError(
                "selected token 0 has no loss: nothing before it predicts it; "
                f"select tokens 1-{n_pos - 1}"
            )
        selected.add(_check_index("selected token", token, n_pos - 1))
    return tuple(sorted(selected))


def _check_method(
    method: object, source_prompt: str | None, reference_prompts: Sequence[str] | None
) -> tuple[str, ...]:
    """Validate the method and its inputs; return the reference prompts as a tuple."""
    if method not in ABLATION_METHODS:
        raise ValueError(f"method must be one of {', '.join(ABLATION_METHODS)}, got {method!r}")
    if method == "resample":
        if source_prompt is None:
            raise ValueError("resample ablation needs source_prompt, the prompt to resample from")
        validate_prompt(source_prompt)
    elif source_prompt is not None:
        raise ValueError(f"source_prompt is only used by method='resample', not {method!r}")
    if reference_prompts is None:
        return ()
    if method != "mean":
        raise ValueError(f"reference_prompts are only used by method='mean', not {method!r}")
    if isinstance(reference_prompts, str):
        raise ValueError("reference_prompts must be a list of prompts, not one string")
    references = tuple(reference_prompts)
    if not references:
        raise ValueError(
            "reference_prompts is empty: pass None to take the mean over the prompt itself"
        )
    if len(references) > MAX_REFERENCE_PROMPTS:
        raise ValueError(
            f"{len(references)} reference prompts is too many: the mean takes a forward pass "
            f"per prompt, so use at most {MAX_REFERENCE_PROMPTS}"
        )
    for number, text in enumerate(references, start=1):
        try:
            validate_prompt(text)
        except ValueError as exc:
            raise ValueError(f"reference prompt {number}: {exc}") from None
    return references


def _check_batch_size(batch_size: object) -> int | None:
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise ValueError(f"batch_size must be an integer or None, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 (or None to fit memory), got {batch_size}")
    return int(batch_size)


def _check_kinds(kinds: object) -> tuple[str, ...]:
    """The swept kinds in sweep order; ValueError for a bare string, unknown or no kinds."""
    if isinstance(kinds, str) or not hasattr(kinds, "__iter__"):
        raise ValueError(f"kinds must be a list such as ['head', 'attn'], got {kinds!r}")
    kinds = tuple(kinds)
    unknown = [kind for kind in kinds if kind not in COMPONENT_KINDS]
    if unknown or not kinds:
        raise ValueError(
            f"kinds must be a non-empty list of {', '.join(COMPONENT_KINDS)}, got {list(kinds)}"
        )
    return tuple(kind for kind in COMPONENT_KINDS if kind in kinds)


def _as_components(components: Component | Sequence[Component]) -> tuple[Component, ...]:
    if isinstance(components, Component):
        return (components,)
    if isinstance(components, (str, bytes)) or not hasattr(components, "__iter__"):
        raise ValueError(f"components must be Component objects, got {components!r}")
    result = tuple(components)
    for item in result:
        if not isinstance(item, Component):
            raise ValueError(f"components must be Component objects, got {item!r}")
    return result


# ---- the model side --------------------------------------------------------------------------


def _model_for(analysis: PromptAnalysis) -> LoadedModel:
    """The model the analysis was made with; ValueError if its weights changed since."""
    loaded = load_model(analysis.model_id, allow_any_path=True)
    fingerprint = analysis.meta.get("fingerprint")
    if loaded.spec.fingerprint != fingerprint:
        raise ValueError(
            f"the weights of {analysis.model_id} changed since this prompt was analysed "
            f"({fingerprint} then, {loaded.spec.fingerprint} now); analyse the prompt again"
        )
    return loaded


def _stop_if_asked(should_stop: Callable[[], bool] | None, what: str) -> None:
    if should_stop is not None and should_stop():
        raise AblationCancelled(f"{what} was cancelled before it finished")


def _clean_run(loaded: LoadedModel, tokens, names: set[str]):
    """A plain forward pass of ``tokens`` ``[1, pos]``: logits and the named activations."""
    import torch

    with loaded.lock, torch.inference_mode():
        logits, cache = loaded.bridge.run_with_cache(
            tokens.to(loaded.device), names_filter=lambda name: name in names
        )
    return logits, {name: cache[name][0] for name in names}


def _replacement_tables(
    loaded: LoadedModel,
    method: str,
    names: set[str],
    clean: dict,
    *,
    n_pos: int,
    source_prompt: str | None,
    reference_prompts: tuple[str, ...],
    options: dict,
    should_stop: Callable[[], bool] | None,
) -> dict:
    """What each hooked activation is replaced with, ``{hook_name: [pos, ...]}``; empty for
    ``zero``. Means are broadcast over positions, resampled values are position by position."""
    if method == "zero" or not names:
        return {}

    if method == "resample":
        _stop_if_asked(should_stop, "the ablation")
        source, _ = tokenize(
            loaded,
            source_prompt,
            prepend_bos=options["prepend_bos"],
            truncate=options["truncate"],
        )
        if source.shape[1] != n_pos:
            raise ValueError(
                f"the source prompt is {source.shape[1]} tokens and the prompt is {n_pos}: "
                "resample ablation replaces activations position by position, so both "
                "must have the same number of tokens"
            )
        _, activations = _clean_run(loaded, source, names)
        return activations

    # Mean over the prompt's own positions, or over every position of the reference prompts.
    if not reference_prompts:
        return {name: act.mean(0, keepdim=True).expand_as(act) for name, act in clean.items()}
    sums, count = {}, 0
    for text in reference_prompts:
        _stop_if_asked(should_stop, "the ablation")
        reference, _ = tokenize(
            loaded, text, prepend_bos=options["prepend_bos"], truncate=options["truncate"]
        )
        _, activations = _clean_run(loaded, reference, names)
        for name, act in activations.items():
            sums[name] = act.sum(0) if name not in sums else sums[name] + act.sum(0)
        count += int(reference.shape[1])
    return {
        name: (total / count).unsqueeze(0).expand(n_pos, *total.shape)
        for name, total in sums.items()
    }


def _apply_edits(activation, edits: list[tuple[int, int | None, object]], table):
    """Replace each row's component in ``activation`` ``[batch, pos, ...]``; zero without a
    table. ``edits`` holds ``(row, head or None, position index)``."""
    activation = activation.clone()
    for row, head, positions in edits:
        index = (row, positions) if head is None else (row, positions, head)
        if table is None:
            activation[index] = 0.0
        else:
            source_index = (positions,) if head is None else (positions, head)
            activation[index] = table[source_index]
    return activation


def _resid_name(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_pre"


def _blocks_from(loaded: LoadedModel, resid, start_layer: int):
    """Logits ``[batch, pos, d_vocab]`` from ``resid_pre`` of ``start_layer``, ``[batch, pos,
    d_model]``, running only the blocks from there on (their hooks fire as usual)."""
    bridge = loaded.bridge
    for block in bridge.blocks[start_layer:]:
        resid = block(resid)
        resid = resid[0] if isinstance(resid, tuple) else resid
    return bridge.unembed(bridge.ln_final(resid))


def _can_start_midway(loaded: LoadedModel, clean_logits, last_resid) -> bool:
    """Whether passes may start at a block from the clean residual, checked once per model.

    The bridge's own ``start_at_layer`` still executes the blocks below it, so a sweep calls
    the blocks itself (:func:`_blocks_from`), which skips on average half of them. That is only
    right where a block needs nothing but the residual (GPT-2's causal mask and learned
    positions do; rotary models need position embeddings passed in), so the last block is run
    that way once on the clean residual ``[pos, d_model]`` and must reproduce ``clean_logits``.
    """
    import torch

    key = (loaded.spec.model_id, loaded.spec.fingerprint, loaded.device)
    if key not in _midway_ok:
        try:
            with loaded.lock, torch.inference_mode():
                logits = _blocks_from(loaded, last_resid[None], loaded.n_layers - 1)
            ok = bool(
                torch.allclose(logits, clean_logits, rtol=MIDWAY_TOLERANCE, atol=MIDWAY_TOLERANCE)
            )
        except Exception as exc:  # any architecture whose blocks cannot run alone
            logger.info("blocks of %s cannot run alone: %s", loaded.spec.model_id, exc)
            ok = False
        if not ok:
            logger.warning(
                "%s: starting at a block does not reproduce the model's logits; every "
                "ablation pass runs the whole model (slower, same results)",
                loaded.spec.model_id,
            )
        _midway_ok[key] = ok
    return _midway_ok[key]


def _ablated_run(
    loaded: LoadedModel,
    tokens,
    rows: Sequence[tuple[Component, ...]],
    tables: dict,
    capture_layers: Sequence[int] = (),
    start: tuple[int, object] | None = None,
):
    """One forward pass with ablation ``rows[i]`` in batch row i.

    ``start`` is ``(layer, resid_pre [pos, d_model])`` to run only the blocks from ``layer`` on
    (every ablated component must be in ``layer`` or later), None to run the whole model.

    Returns:
        Logits ``[len(rows), pos, d_vocab]`` and ``{layer: pattern [len(rows), n_heads, q_pos,
        k_pos]}`` for ``capture_layers``.
    """
    import torch

    by_hook: dict[str, list] = defaultdict(list)
    for row, components in enumerate(rows):
        for component in components:
            if component.positions is None:
                positions = slice(None)
            else:
                positions = torch.tensor(component.positions, device=loaded.device)
            by_hook[component.hook_name].append((row, component.head, positions))

    def editor(edits, table):
        return lambda activation, hook: _apply_edits(activation, edits, table)

    captured: dict[int, object] = {}

    def capturer(layer):
        def capture(pattern, hook):
            captured[layer] = pattern.detach().float().cpu()

        return capture

    fwd_hooks = [(name, editor(edits, tables.get(name))) for name, edits in by_hook.items()]
    fwd_hooks += [
        (f"blocks.{layer}.attn.hook_pattern", capturer(layer)) for layer in capture_layers
    ]
    # hooks() removes exactly the hooks it added when the block exits, error or not.
    with loaded.lock, torch.inference_mode(), loaded.bridge.hooks(fwd_hooks=fwd_hooks):
        if start is None:
            logits = loaded.bridge(tokens.to(loaded.device).repeat(len(rows), 1))
        else:
            layer, resid = start
            logits = _blocks_from(loaded, resid.repeat(len(rows), 1, 1), layer)
    return logits, captured


def _token_loss(logits, tokens):
    """Per-token loss ``[batch, pos - 1]`` and the logsumexp ``[batch, pos]``: the loss is
    ``logsumexp(logits) - logit[target]``, which never materialises a second ``[batch, pos,
    d_vocab]`` tensor as ``log_softmax`` would."""
    import torch

    logits = logits.float()
    targets = tokens.to(logits.device)[:, 1:].expand(logits.shape[0], -1)
    lse = torch.logsumexp(logits, dim=-1)
    target_logit = logits[:, :-1].gather(-1, targets[..., None])[..., 0]
    return lse[:, :-1] - target_logit, lse


def _token_stats(logits, tokens):
    """Per-token loss ``[batch, pos - 1]``, top-1 ids ``[batch, pos]`` and their probabilities,
    as numpy."""
    loss, lse = _token_loss(logits, tokens)
    top_logit, top_ids = logits.float().max(dim=-1)
    top_prob = (top_logit - lse).exp()
    return (
        loss.cpu().numpy().astype(np.float32),
        top_ids.cpu().numpy().astype(np.int64),
        top_prob.cpu().numpy().astype(np.float32),
    )


def _auto_batch_size(loaded: LoadedModel, n_pos: int) -> int:
    """Rows per forward pass whose activations fit :data:`AUTO_BATCH_BYTES`: the logits and
    their logsumexp temporary dominate, then the attention scores (several copies: scores,
    pattern, hook outputs) and the MLP hidden layer. Measured on GPT-2 small: 31 MB per row at
    64 tokens (estimate 42), 207 MB at 256 (estimate 189)."""
    cfg = loaded.cfg
    d_mlp = int(getattr(cfg, "d_mlp", None) or 4 * cfg.d_model)
    per_row = 4 * n_pos * (3 * int(cfg.d_vocab) + 8 * cfg.n_heads * n_pos + d_mlp + 8 * cfg.d_model)
    return max(1, min(MAX_AUTO_BATCH, AUTO_BATCH_BYTES // per_row))


# ---- caching --------------------------------------------------------------------------------


def _cache_key(what: str, analysis: PromptAnalysis, payload: dict) -> str:
    options = analysis.options
    document = [
        FORMAT_VERSION,
        what,
        analysis.model_id,
        analysis.meta.get("fingerprint"),
        analysis.prompt,
        {"prepend_bos": options.get("prepend_bos"), "truncate": options.get("truncate")},
        payload,
    ]
    digest = hashlib.sha256(json.dumps(document, sort_keys=True).encode()).hexdigest()
    return f"{what}-{digest}"


def _encode_strings(texts: Sequence[str]) -> np.ndarray:
    """Strings as UTF-8 JSON bytes, ``[n_bytes]`` uint8, so they cache as an array (numpy's own
    string arrays drop trailing NUL characters, which a byte-level token can decode to)."""
    return np.frombuffer(json.dumps(list(texts)).encode(), dtype=np.uint8)


def _decode_strings(array: np.ndarray) -> tuple[str, ...]:
    return tuple(json.loads(array.tobytes().decode()))


# ---- ablate -----------------------------------------------------------------------------------

_RESULT_ARRAYS = (
    "loss_before",
    "loss_after",
    "top_before",
    "top_after",
    "top_prob_before",
    "top_prob_after",
    "attention_before",
    "attention_after",
    "top_str_before",
    "top_str_after",
)


def ablate(
    analysis: PromptAnalysis,
    components: Component | Sequence[Component],
    *,
    method: AblationMethod = "zero",
    source_prompt: str | None = None,
    reference_prompts: Sequence[str] | None = None,
    loss_threshold: float = DEFAULT_LOSS_THRESHOLD,
    should_stop: Callable[[], bool] | None = None,
) -> AblationResult:
    """Ablate ``components`` together on the analysed prompt and compare with the clean run.

    Uses the analysis's model, tokens and store; a repeated call with the same arguments reads
    the cache and runs nothing.

    Args:
        analysis: The prompt, from :func:`analysis.analyze`.
        components: One :class:`Component` or several, all ablated in the same run; an empty
            list runs the model unchanged.
        method: ``zero``, ``mean`` or ``resample`` (see the module docstring).
        source_prompt: For ``resample``: the prompt whose activations replace the prompt's; it
            must tokenize (with the analysis's options) to the same number of tokens.
        reference_prompts: For ``mean``: take the mean over every position of these prompts
            instead of over the prompt's own positions.
        loss_threshold: Loss rise in nats that counts as a memory failure (see
            :class:`AblationResult`); not part of the cache key.
        should_stop: Called before each forward pass; when it returns True the ablation raises
            :class:`AblationCancelled`.

    Returns:
        The :class:`AblationResult`, with downstream attention ``[n_downstream, n_heads, q_pos,
        k_pos]``.

    Raises:
        ValueError: A component outside the model or the prompt, a bad method or a source
            prompt of another length.
        AblationCancelled: ``should_stop`` returned True.
    """
    # Validate everything before touching the model or the cache.
    components = _as_components(components)
    references = _check_method(method, source_prompt, reference_prompts)
    loss_threshold = _check_threshold(loss_threshold)
    n_layers, n_heads, n_pos = analysis.n_layers, analysis.n_heads, analysis.n_pos
    for component in components:
        component.check(n_layers, n_heads, n_pos)
    first = min((c.layer for c in components), default=n_layers - 1)
    attention_layers = tuple(range(first + 1, n_layers)) if components else ()

    payload = {
        "method": method,
        # Order does not matter; json.dumps sorts keys that mix None and numbers.
        "components": sorted((c.to_key() for c in components), key=json.dumps),
        "source_prompt": source_prompt,
        "reference_prompts": list(references),
    }
    key = _cache_key("ablate", analysis, payload)

    def compute() -> dict[str, np.ndarray]:
        return _compute_ablation(
            analysis, components, method, source_prompt, references, attention_layers, should_stop
        )

    arrays = cached_arrays(analysis.store, key, _RESULT_ARRAYS, compute, tag=key, compress=True)
    return AblationResult(
        components=components,
        method=method,
        str_tokens=tuple(analysis.str_tokens),
        tokens=analysis.tokens,
        loss_before=arrays["loss_before"],
        loss_after=arrays["loss_after"],
        top_before=arrays["top_before"].astype(np.int64),
        top_after=arrays["top_after"].astype(np.int64),
        top_prob_before=arrays["top_prob_before"],
        top_prob_after=arrays["top_prob_after"],
        top_str_before=_decode_strings(arrays["top_str_before"]),
        top_str_after=_decode_strings(arrays["top_str_after"]),
        attention_layers=attention_layers,
        attention_before=dequantize_attention(arrays["attention_before"]),
        attention_after=dequantize_attention(arrays["attention_after"]),
        loss_threshold=loss_threshold,
    )


def _compute_ablation(
    analysis: PromptAnalysis,
    components: tuple[Component, ...],
    method: str,
    source_prompt: str | None,
    references: tuple[str, ...],
    attention_layers: tuple[int, ...],
    should_stop: Callable[[], bool] | None,
) -> dict[str, np.ndarray]:
    """Run the clean and the ablated pass; every array :func:`ablate` caches."""
    import torch

    started = time.perf_counter()
    _stop_if_asked(should_stop, "the ablation")
    loaded = _model_for(analysis)
    tokens = torch.as_tensor(analysis.tokens)[None]
    n_pos = int(tokens.shape[1])
    hook_names = {c.hook_name for c in components}
    pattern_names = {f"blocks.{layer}.attn.hook_pattern" for layer in attention_layers}

    # The clean pass gives the "before" and, for the mean over the prompt, the mean itself.
    mean_names = hook_names if method == "mean" else set()
    first = min((c.layer for c in components), default=None)
    resid_names = {_resid_name(loaded.n_layers - 1)} | (
        set() if first is None else {_resid_name(first)}
    )
    clean_logits, clean = _clean_run(loaded, tokens, mean_names | pattern_names | resid_names)
    tables = _replacement_tables(
        loaded,
        method,
        hook_names,
        {name: clean[name] for name in mean_names},
        n_pos=n_pos,
        source_prompt=source_prompt,
        reference_prompts=references,
        options=analysis.options,
        should_stop=should_stop,
    )
    _stop_if_asked(should_stop, "the ablation")
    midway = first is not None and _can_start_midway(
        loaded, clean_logits, clean[_resid_name(loaded.n_layers - 1)]
    )
    start = (first, clean[_resid_name(first)]) if midway else None
    logits, captured = _ablated_run(
        loaded, tokens, [components], tables, attention_layers, start=start
    )

    # Shape the output: loss and top-1 before and after, downstream attention.
    loss_before, top_before, prob_before = _token_stats(clean_logits, tokens)
    loss_after, top_after, prob_after = _token_stats(logits, tokens)
    n_heads = analysis.n_heads
    empty = np.zeros((0, n_heads, n_pos, n_pos), dtype=np.float32)
    before = [
        clean[f"blocks.{layer}.attn.hook_pattern"].float().cpu() for layer in attention_layers
    ]
    after = [captured[layer][0] for layer in attention_layers]
    attention_before = torch.stack(before).numpy() if before else empty
    attention_after = torch.stack(after).numpy() if after else empty
    decode = loaded.tokenizer.decode
    arrays = {
        "loss_before": loss_before[0],
        "loss_after": loss_after[0],
        "top_before": top_before[0],
        "top_after": top_after[0],
        "top_prob_before": prob_before[0],
        "top_prob_after": prob_after[0],
        "attention_before": quantize_attention(attention_before),
        "attention_after": quantize_attention(attention_after),
        "top_str_before": _encode_strings([decode([int(t)]) for t in top_before[0]]),
        "top_str_after": _encode_strings([decode([int(t)]) for t in top_after[0]]),
    }
    logger.info(
        "ablated %s (%s) on %d tokens of %s in %.2fs",
        ", ".join(c.label for c in components) or "nothing",
        method,
        n_pos,
        analysis.model_id,
        time.perf_counter() - started,
    )
    return arrays


# ---- sweep ------------------------------------------------------------------------------------

_SWEEP_ARRAYS = ("loss_before", "head_token_delta", "attn_token_delta", "mlp_token_delta")


def sweep_components(
    n_layers: int,
    n_heads: int,
    kinds: Sequence[str] = COMPONENT_KINDS,
    positions: Sequence[int] | None = None,
) -> list[Component]:
    """The components a sweep ablates, in its order: per layer, each head, then attn, then MLP."""
    positions = None if positions is None else tuple(positions)
    components = []
    for layer in range(n_layers):
        if "head" in kinds:
            components += [Component("head", layer, head, positions) for head in range(n_heads)]
        if "attn" in kinds:
            components.append(Component("attn", layer, None, positions))
        if "mlp" in kinds:
            components.append(Component("mlp", layer, None, positions))
    return components


def ablation_sweep(
    analysis: PromptAnalysis,
    *,
    method: AblationMethod = "zero",
    kinds: Sequence[ComponentKind] = COMPONENT_KINDS,
    positions: Sequence[int] | None = None,
    selected_tokens: Sequence[int] | None = None,
    source_prompt: str | None = None,
    reference_prompts: Sequence[str] | None = None,
    batch_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> SweepResult:
    """Ablate every head (and every attention and MLP layer) one at a time.

    Up to ``batch_size`` ablations of one layer share each forward pass, one per batch row, and
    the pass starts at that layer from the clean run's residual, so the blocks below it are not
    run again (when the model allows it; see :data:`MIDWAY_TOLERANCE`).
    ``bench/bench_ablation.py`` measures the gain over a pass per ablation. A repeated call with
    the same arguments (``selected_tokens`` aside) reads the cache and runs nothing.

    Args:
        analysis: The prompt, from :func:`analysis.analyze`.
        method: ``zero``, ``mean`` or ``resample`` (see the module docstring).
        kinds: Which components to sweep: any of ``head``, ``attn``, ``mlp``.
        positions: Ablate each component only at these positions; None means everywhere.
        selected_tokens: Token positions (1 or more) whose loss the ``*_selected`` views of
            the result average, such as the second copy of a repeated phrase. Not part of the
            cache key: :meth:`SweepResult.with_selection` changes it for free.
        source_prompt: For ``resample``; see :func:`ablate`.
        reference_prompts: For ``mean``; see :func:`ablate`.
        batch_size: Ablations per forward pass, which bounds memory (each row holds its own
            ``[pos, d_vocab]`` logits); None picks the most that fit in
            :data:`AUTO_BATCH_BYTES`, at most :data:`MAX_AUTO_BATCH`.
        progress: Called as ``progress(done, total)`` at the start and after every pass.
        should_stop: Called before every pass; when it returns True the sweep raises
            :class:`AblationCancelled` whose ``partial`` holds the finished ablations (NaN
            elsewhere, ``complete=False``). A partial sweep is never cached.

    Returns:
        The :class:`SweepResult`: per-token Δloss ``[n_layers, n_heads, pos - 1]`` (heads) and
        ``[n_layers, pos - 1]`` (layers), with Δ mean loss views ``[n_layers, n_heads]``.

    Raises:
        ValueError: Bad kinds, positions, selected tokens, method or batch size.
        AblationCancelled: ``should_stop`` returned True.
    """
    # Validate everything before touching the model or the cache.
    kinds = _check_kinds(kinds)
    references = _check_method(method, source_prompt, reference_prompts)
    batch_size = _check_batch_size(batch_size)
    n_layers, n_heads, n_pos = analysis.n_layers, analysis.n_heads, analysis.n_pos
    selected = _check_selected(selected_tokens, n_pos)
    components = sweep_components(n_layers, n_heads, kinds, positions)
    for component in components[:1]:  # every component shares the positions
        component.check(n_layers, n_heads, n_pos)

    payload = {
        "method": method,
        "kinds": list(kinds),
        "positions": None if positions is None else list(components[0].positions),
        "source_prompt": source_prompt,
        "reference_prompts": list(references),
    }
    key = _cache_key("sweep", analysis, payload)
    computed = []

    def compute() -> dict[str, np.ndarray]:
        computed.append(True)
        return _compute_sweep(
            analysis,
            components,
            selected,
            method,
            source_prompt,
            references,
            batch_size,
            progress,
            should_stop,
        )

    arrays = cached_arrays(analysis.store, key, _SWEEP_ARRAYS, compute, tag=key)
    if not computed and progress is not None:
        progress(len(components), len(components))
    return _sweep_result(arrays, method, kinds, components[0].positions, selected, True)


def _sweep_result(arrays, method, kinds, positions, selected, complete) -> SweepResult:
    return SweepResult(
        method=method,
        kinds=kinds,
        positions=positions,
        selected_tokens=selected,
        loss_before=arrays["loss_before"],
        head_token_delta=arrays["head_token_delta"],
        attn_token_delta=arrays["attn_token_delta"],
        mlp_token_delta=arrays["mlp_token_delta"],
        complete=complete,
    )


def _compute_sweep(
    analysis: PromptAnalysis,
    components: list[Component],
    selected: tuple[int, ...],
    method: str,
    source_prompt: str | None,
    references: tuple[str, ...],
    batch_size: int | None,
    progress: Callable[[int, int], None] | None,
    should_stop: Callable[[], bool] | None,
) -> dict[str, np.ndarray]:
    """The clean pass, then ``batch_size`` ablations per pass; the sweep's arrays."""
    import torch

    started = time.perf_counter()
    total = len(components)
    n_layers, n_heads, n_pos = analysis.n_layers, analysis.n_heads, analysis.n_pos
    kinds = tuple(kind for kind in COMPONENT_KINDS if any(c.kind == kind for c in components))
    positions = components[0].positions
    nan = np.float32(np.nan)
    arrays = {
        "loss_before": np.zeros(n_pos - 1, dtype=np.float32),
        "head_token_delta": np.full((n_layers, n_heads, n_pos - 1), nan, dtype=np.float32),
        "attn_token_delta": np.full((n_layers, n_pos - 1), nan, dtype=np.float32),
        "mlp_token_delta": np.full((n_layers, n_pos - 1), nan, dtype=np.float32),
    }

    def cancelled(done: int) -> AblationCancelled:
        partial = _sweep_result(arrays, method, kinds, positions, selected, complete=False)
        return AblationCancelled(
            f"the ablation sweep was cancelled after {done} of {total} ablations", partial
        )

    if progress is not None:
        progress(0, total)
    if should_stop is not None and should_stop():
        raise cancelled(0)
    loaded = _model_for(analysis)
    tokens = torch.as_tensor(analysis.tokens)[None]
    hook_names = {c.hook_name for c in components}
    resid_names = {_resid_name(layer) for layer in range(n_layers)}
    mean_names = hook_names if method == "mean" else set()
    clean_logits, clean = _clean_run(loaded, tokens, mean_names | resid_names)
    try:
        tables = _replacement_tables(
            loaded,
            method,
            hook_names,
            {name: clean[name] for name in mean_names},
            n_pos=n_pos,
            source_prompt=source_prompt,
            reference_prompts=references,
            options=analysis.options,
            should_stop=should_stop,
        )
    except AblationCancelled:
        raise cancelled(0) from None
    midway = _can_start_midway(loaded, clean_logits, clean[_resid_name(n_layers - 1)])
    loss_before = _token_loss(clean_logits, tokens)[0][0].cpu().numpy().astype(np.float32)
    arrays["loss_before"] = loss_before

    # Passes never mix layers, so each starts at its own layer when the model allows it.
    rows = batch_size or _auto_batch_size(loaded, n_pos)
    by_layer: dict[int, list[Component]] = defaultdict(list)
    for component in components:
        by_layer[component.layer].append(component)
    passes = [
        (layer, group[begin : begin + rows])
        for layer, group in sorted(by_layer.items())
        for begin in range(0, len(group), rows)
    ]
    done = 0
    for layer, chunk in passes:
        if should_stop is not None and should_stop():
            raise cancelled(done)
        start = (layer, clean[_resid_name(layer)]) if midway else None
        logits, _ = _ablated_run(loaded, tokens, [(c,) for c in chunk], tables, start=start)
        # The sweep needs only the loss: no top-1 pass over the [rows, pos, d_vocab] logits.
        loss_after = _token_loss(logits, tokens)[0].cpu().numpy().astype(np.float32)
        del logits
        for component, row_loss in zip(chunk, loss_after, strict=True):
            delta = row_loss - loss_before
            if component.kind == "head":
                arrays["head_token_delta"][component.layer, component.head] = delta
            else:
                arrays[f"{component.kind}_token_delta"][component.layer] = delta
        done += len(chunk)
        if progress is not None:
            progress(done, total)

    logger.info(
        "swept %d ablations (%s) on %d tokens of %s in %d passes of up to %d%s, in %.2fs",
        total,
        method,
        n_pos,
        analysis.model_id,
        len(passes),
        rows,
        "" if midway else " from the embedding",
        time.perf_counter() - started,
    )
    return arrays
