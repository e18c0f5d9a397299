"""Activation patching between a clean and a corrupted prompt, with TransformerLens semantics.

The model runs on the corrupted prompt while one activation is replaced by its value from the
clean run; the metric (by default the logit difference between the clean answer and the
corrupted answer at the last position) then says how much of the clean behaviour that activation
restores. This is the setup of ``transformer_lens.patching`` (``get_act_patch_resid_pre``,
``get_act_patch_attn_out``, ``get_act_patch_attn_head_out_all_pos``,
``get_act_patch_attn_head_out_by_pos``), after Meng et al. 2022 (ROME) and Wang et al. 2022
(IOI), and the numbers agree with those helpers (see ``tests/analysis/test_patching.py``).

Two differences from the TransformerLens helpers, neither changing a value:

- Several patches share one forward pass, one patch per batch row, so a sweep costs about
  ``n_patches / batch_size`` passes instead of ``n_patches``.
- Results are normalised so that 0 is the corrupted run and 1 the clean run:
  ``(patched - corrupted) / (clean - corrupted)``; the raw metric values are kept next to them.

Results are cached in the :class:`~analysis.store.ArrayStore` under a key made of primitives:
model id and weight fingerprint, both prompts, the answer token ids, the kind of sweep and its
layer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from analysis.models import LoadedModel, load_model
from analysis.prompt import analyze, tokenize, validate_prompt
from analysis.settings import get_settings
from analysis.store import ArrayStore, CorruptEntryError, default_store

logger = logging.getLogger(__name__)

# Bump when what is stored, or how, changes: old entries then simply stop matching.
FORMAT_VERSION = 1
DEFAULT_BATCH_SIZE = 32
# A clean-corrupted metric gap smaller than this cannot be normalised meaningfully.
MIN_METRIC_GAP = 1e-4
# Each patched forward pass materialises [rows, pos, d_vocab] float32 logits; rows per pass are
# lowered so that this stays under the budget (GPT-2 at 1024 tokens: one row per pass).
LOGITS_BUDGET_BYTES = 256 * 2**20

PatchKind = Literal["resid_pre", "attn_out", "head_out_all_pos", "head_out_by_pos"]
PATCH_KINDS: tuple[str, ...] = ("resid_pre", "attn_out", "head_out_all_pos", "head_out_by_pos")
AXIS_NAMES: dict[str, tuple[str, str]] = {
    "resid_pre": ("layer", "pos"),
    "attn_out": ("layer", "pos"),
    "head_out_all_pos": ("layer", "head"),
    "head_out_by_pos": ("pos", "head"),
}
# Activation names as in ``transformer_lens.utils.get_act_name``, and their hook names.
_HOOKS = {
    "resid_pre": "blocks.{layer}.hook_resid_pre",
    "resid_post": "blocks.{layer}.hook_resid_post",
    "attn_out": "blocks.{layer}.hook_attn_out",
    "z": "blocks.{layer}.attn.hook_z",
}


class PatchingCancelled(Exception):
    """``should_stop`` asked the sweep to stop; nothing was cached."""


@dataclass(frozen=True)
class PatchSite:
    """One activation to take from the clean run.

    Attributes:
        activation: ``resid_pre``, ``resid_post``, ``attn_out`` (each ``[batch, pos, d_model]``)
            or ``z`` (the heads' mixed values before ``W_O``, ``[batch, pos, head, d_head]``).
        layer: The block.
        pos: One position, or None for every position.
        head: One head of ``z``, or None for every head; must be None for other activations.
    """

    activation: str
    layer: int
    pos: int | None = None
    head: int | None = None

    @property
    def hook_name(self) -> str:
        return _HOOKS[self.activation].format(layer=self.layer)


@dataclass(frozen=True)
class AnswerPair:
    """A suggested pair of answer tokens for the logit-difference metric.

    Attributes:
        clean: The token the clean prompt should favour, as text (``" Paris"``).
        corrupted: The token the corrupted prompt should favour.
        clean_id: Token id of ``clean``.
        corrupted_id: Token id of ``corrupted``.
        source: ``"top_prediction"`` (each prompt's most likely next token at the last position)
            or ``"first_difference"`` (the first position where the two prompts' tokens differ).
    """

    clean: str
    corrupted: str
    clean_id: int
    corrupted_id: int
    source: str


@dataclass(frozen=True)
class PatchingResult:
    """One patching sweep, normalised so that 0 is the corrupted run and 1 the clean run.

    Attributes:
        kind: One of :data:`PATCH_KINDS`.
        layer: The layer of a ``head_out_by_pos`` sweep; None for the other kinds.
        values: ``(patched - corrupted) / (clean - corrupted)``, shaped by ``axis_names``:
            ``[n_layers, pos]`` for ``resid_pre`` and ``attn_out``, ``[n_layers, n_heads]`` for
            ``head_out_all_pos``, ``[pos, n_heads]`` for ``head_out_by_pos``. float32.
        patched: The raw metric of each patched run, same shape as ``values``.
        clean_metric: The metric on the clean prompt.
        corrupted_metric: The metric on the corrupted prompt.
        axis_names: Names of the two axes of ``values``.
        clean_str_tokens: The clean prompt's tokens as text (BOS included when prepended).
        corrupted_str_tokens: The corrupted prompt's tokens as text.
        answer_ids: ``(clean answer id, corrupted answer id)``.
        answer_str: The answer tokens as text.
        model_id: The model the sweep ran on.
        key: The cache key.
    """

    kind: str
    layer: int | None
    values: np.ndarray
    patched: np.ndarray
    clean_metric: float
    corrupted_metric: float
    axis_names: tuple[str, str]
    clean_str_tokens: list[str]
    corrupted_str_tokens: list[str]
    answer_ids: tuple[int, int]
    answer_str: tuple[str, str]
    model_id: str
    key: str


def normalise(patched: np.ndarray, clean: float, corrupted: float) -> np.ndarray:
    """``(patched - corrupted) / (clean - corrupted)``: 0 is the corrupted run, 1 the clean one."""
    gap = clean - corrupted
    if not abs(gap) >= MIN_METRIC_GAP:
        raise ValueError(
            f"the clean and corrupted prompts give almost the same logit difference "
            f"({clean:.4g} and {corrupted:.4g}), so patching has nothing to restore; pick answer "
            "tokens that the two prompts favour differently"
        )
    return ((np.asarray(patched, dtype=np.float64) - corrupted) / gap).astype(np.float32)


def resolve_answer_token(loaded: LoadedModel, token: str | int) -> int:
    """The id of an answer token given as its text (``" Paris"``) or as an id.

    Raises:
        ValueError: The text is not exactly one token of this model, or the id is out of range.
    """
    d_vocab = int(loaded.cfg.d_vocab)
    if isinstance(token, (int, np.integer)) and not isinstance(token, bool):
        if not 0 <= int(token) < d_vocab:
            raise ValueError(
                f"token id {int(token)} is out of range: the vocabulary is 0-{d_vocab - 1}"
            )
        return int(token)
    if not isinstance(token, str) or not token:
        raise ValueError(f"an answer token must be text or a token id, got {token!r}")

    ids = loaded.tokenizer.encode(token, add_special_tokens=False)
    if len(ids) != 1:
        pieces = [loaded.tokenizer.decode([i]) for i in ids]
        raise ValueError(
            f"{token!r} is {len(ids)} tokens for {loaded.spec.model_id} ({pieces!r}); the "
            "metric needs a single token, such as the first piece"
        )
    return int(ids[0])


def suggest_answer_tokens(
    clean_prompt: str,
    corrupted_prompt: str,
    model: str | None = None,
    *,
    prepend_bos: bool = True,
    allow_any_path: bool = False,
    store: ArrayStore | None = None,
) -> list[AnswerPair]:
    """Answer-token pairs worth trying for the logit-difference metric, best guess first.

    Both prompts go through :func:`analysis.analyze` (so they are cached for the other views).

    Args:
        clean_prompt: The prompt whose behaviour patching should restore.
        corrupted_prompt: The prompt the patched runs start from.
        model: Model name or checkpoint path; ``None`` means ``MEMLENS_DEFAULT_MODEL``.
        prepend_bos: Prepend the BOS token.
        allow_any_path: Load a checkpoint from any directory.
        store: The cache; the process's default store if None.

    Returns:
        Up to two :class:`AnswerPair`: the two prompts' top predictions at the last position
        (when they differ), then the first pair of tokens where the prompts differ (when there is
        one and it is not the same pair). Empty when neither exists.
    """
    kwargs = dict(prepend_bos=prepend_bos, allow_any_path=allow_any_path, store=store)
    clean = analyze(clean_prompt, model, **kwargs)
    corrupted = analyze(corrupted_prompt, model, **kwargs)
    suggestions: list[AnswerPair] = []

    clean_top, corrupted_top = int(clean.top_k()[0][-1, 0]), int(corrupted.top_k()[0][-1, 0])
    if clean_top != corrupted_top:
        suggestions.append(
            AnswerPair(
                clean=clean.top_k_str()[-1][0],
                corrupted=corrupted.top_k_str()[-1][0],
                clean_id=clean_top,
                corrupted_id=corrupted_top,
                source="top_prediction",
            )
        )

    for pos, (a, b) in enumerate(
        zip(clean.tokens.tolist(), corrupted.tokens.tolist(), strict=False)
    ):
        if a != b:
            if (a, b) != (clean_top, corrupted_top):
                suggestions.append(
                    AnswerPair(
                        clean=clean.str_tokens[pos],
                        corrupted=corrupted.str_tokens[pos],
                        clean_id=a,
                        corrupted_id=b,
                        source="first_difference",
                    )
                )
            break
    return suggestions


def run_patches(
    loaded: LoadedModel,
    clean_tokens,
    corrupted_tokens,
    answer_ids: tuple[int, int],
    rows: Sequence[Sequence[PatchSite]],
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[np.ndarray, float, float]:
    """The metric of each patched run, several runs per forward pass.

    Row ``i`` of the result is the corrupted prompt run with every site of ``rows[i]`` taken
    from the clean run (an empty row is the plain corrupted run). The metric is
    ``logits[-1, clean_answer] - logits[-1, corrupted_answer]``.

    Args:
        loaded: The model.
        clean_tokens: Token ids ``[1, pos]`` of the clean prompt.
        corrupted_tokens: Token ids ``[1, pos]`` of the corrupted prompt, same length.
        answer_ids: ``(clean answer id, corrupted answer id)``.
        rows: The patches, one tuple of :class:`PatchSite` per patched run.
        batch_size: Patched runs per forward pass (lowered for long prompts, see
            :data:`LOGITS_BUDGET_BYTES`).
        progress: Called as ``progress(done, total)`` after each forward pass.
        should_stop: Called before each forward pass; True stops the sweep.

    Returns:
        ``(patched [len(rows)], clean_metric, corrupted_metric)``.

    Raises:
        ValueError: Token counts differ, or a site is out of range.
        PatchingCancelled: ``should_stop`` returned True.
    """
    import torch

    # Validate everything before the first forward pass.
    n_pos = int(clean_tokens.shape[-1])
    if int(corrupted_tokens.shape[-1]) != n_pos:
        raise ValueError(
            f"the clean prompt is {n_pos} tokens and the corrupted prompt "
            f"{int(corrupted_tokens.shape[-1])}; patching needs the same token count. Edit one "
            "prompt until the counts match (the token views show where they split)"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    for row in rows:
        for site in row:
            _check_site(site, loaded, n_pos)
    d_vocab = int(loaded.cfg.d_vocab)
    per_pass = max(1, min(batch_size, LOGITS_BUDGET_BYTES // (n_pos * d_vocab * 4)))
    if per_pass < batch_size:
        logger.info(
            "patching %d runs per pass (not %d) to bound logits memory", per_pass, batch_size
        )

    device = loaded.device
    clean_tokens = clean_tokens.reshape(1, n_pos).to(device)
    corrupted_tokens = corrupted_tokens.reshape(1, n_pos).to(device)
    clean_id, corrupted_id = answer_ids
    needed = {site.hook_name for row in rows for site in row}

    def metric(logits) -> torch.Tensor:
        last = logits[:, -1, :].float()
        return last[:, clean_id] - last[:, corrupted_id]

    # The clean activations, and both unpatched metrics.
    with loaded.lock, torch.inference_mode():
        clean_logits, clean_cache = loaded.bridge.run_with_cache(
            clean_tokens, names_filter=lambda name: name in needed
        )
        clean_acts = {name: clean_cache[name] for name in needed}
        del clean_cache
        corrupted_logits = loaded.bridge(corrupted_tokens)
    clean_metric = float(metric(clean_logits)[0])
    corrupted_metric = float(metric(corrupted_logits)[0])
    del clean_logits, corrupted_logits

    # The patched runs, ``per_pass`` rows at a time.
    patched = np.empty(len(rows), dtype=np.float32)
    for start in range(0, len(rows), per_pass):
        if should_stop is not None and should_stop():
            raise PatchingCancelled(f"stopped after {start} of {len(rows)} patched runs")
        chunk = rows[start : start + per_pass]
        hooks = _batch_hooks(chunk, clean_acts)
        batch = corrupted_tokens.expand(len(chunk), n_pos)
        with loaded.lock, torch.inference_mode():
            logits = loaded.bridge.run_with_hooks(batch, fwd_hooks=hooks)
        patched[start : start + len(chunk)] = metric(logits).cpu().numpy()
        if progress is not None:
            progress(start + len(chunk), len(rows))
    return patched, clean_metric, corrupted_metric


def activation_patch(
    clean_prompt: str,
    corrupted_prompt: str,
    answer_tokens: tuple[str | int, str | int],
    kind: PatchKind,
    model: str | None = None,
    *,
    layer: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    prepend_bos: bool = True,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    allow_any_path: bool = False,
    store: ArrayStore | None = None,
) -> PatchingResult:
    """Patch clean activations into the corrupted run, one site at a time, from the cache if
    this sweep ran before.

    The metric is the logit difference ``clean answer - corrupted answer`` at the last position.
    Kinds, and the TransformerLens helper each one matches:

    - ``resid_pre``: the residual stream entering each block, per layer x position
      (``get_act_patch_resid_pre``), ``[n_layers, pos]``.
    - ``attn_out``: each attention layer's output, per layer x position
      (``get_act_patch_attn_out``), ``[n_layers, pos]``.
    - ``head_out_all_pos``: each head's output ``hook_z`` at every position at once, per
      layer x head (``get_act_patch_attn_head_out_all_pos``), ``[n_layers, n_heads]``.
    - ``head_out_by_pos``: each head's ``hook_z`` at one position, for the chosen ``layer``,
      per position x head (``get_act_patch_attn_head_out_by_pos`` at that layer),
      ``[pos, n_heads]``.

    Args:
        clean_prompt: The prompt whose behaviour patching should restore.
        corrupted_prompt: The prompt the patched runs start from; same token count.
        answer_tokens: ``(clean answer, corrupted answer)``, each a single token as text or id
            (see :func:`suggest_answer_tokens`).
        kind: One of :data:`PATCH_KINDS`.
        model: Model name or checkpoint path; ``None`` means ``MEMLENS_DEFAULT_MODEL``.
        layer: The layer of a ``head_out_by_pos`` sweep (required there, ignored otherwise).
        batch_size: Patched runs per forward pass.
        prepend_bos: Prepend the BOS token, as :func:`analysis.analyze` does by default.
        progress: Called as ``progress(done, total)`` with counts of patched runs.
        should_stop: Polled between forward passes; True raises :class:`PatchingCancelled`.
        allow_any_path: Load a checkpoint from any directory.
        store: The cache; the process's default store if None.

    Returns:
        The :class:`PatchingResult`.

    Raises:
        ValueError: Bad prompt, different token counts, an answer that is not one token, an
            unknown kind, a missing or out-of-range layer, or answers that the two prompts do
            not tell apart.
        PatchingCancelled: ``should_stop`` returned True.
    """
    # Validate the cheap things before loading anything.
    validate_prompt(clean_prompt)
    validate_prompt(corrupted_prompt)
    if kind not in PATCH_KINDS:
        raise ValueError(f"kind must be one of {', '.join(PATCH_KINDS)}; got {kind!r}")
    loaded = load_model(model or get_settings().default_model, allow_any_path=allow_any_path)
    if kind == "head_out_by_pos":
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise ValueError(f"head_out_by_pos needs a layer (an integer), got {layer!r}")
        if not 0 <= layer < loaded.n_layers:
            raise ValueError(
                f"layer {layer} is out of range: this model has layers 0-{loaded.n_layers - 1}"
            )
        layer = int(layer)
    else:
        layer = None
    answer_ids = tuple(resolve_answer_token(loaded, token) for token in answer_tokens)
    if len(answer_ids) != 2:
        raise ValueError(f"give two answer tokens (clean, corrupted), got {len(answer_ids)}")
    clean_tokens, _ = tokenize(loaded, clean_prompt, prepend_bos=prepend_bos, truncate=False)
    corrupted_tokens, _ = tokenize(
        loaded, corrupted_prompt, prepend_bos=prepend_bos, truncate=False
    )
    n_pos = int(clean_tokens.shape[1])

    # Cache lookup.
    store = default_store() if store is None else store
    key = _patching_key(
        loaded, clean_prompt, corrupted_prompt, answer_ids, kind, layer, prepend_bos
    )
    decode = loaded.tokenizer.decode
    cached = _read_cached(store, key)
    if cached is not None:
        logger.info("patching cache hit %s (%s) for %s", key[:12], kind, loaded.spec.model_id)
        patched, meta = cached
    else:
        started = time.perf_counter()
        rows, shape = _sweep_rows(kind, loaded, n_pos, layer)
        flat, clean_metric, corrupted_metric = run_patches(
            loaded,
            clean_tokens,
            corrupted_tokens,
            answer_ids,
            rows,
            batch_size=batch_size,
            progress=progress,
            should_stop=should_stop,
        )
        patched = flat.reshape(shape)
        meta = {
            "format": FORMAT_VERSION,
            "clean_metric": clean_metric,
            "corrupted_metric": corrupted_metric,
            "clean_str_tokens": [decode([t]) for t in clean_tokens[0].tolist()],
            "corrupted_str_tokens": [decode([t]) for t in corrupted_tokens[0].tolist()],
        }
        store.put_array(f"{key}/patched", patched, tag=key)
        store.put_json(f"{key}/meta", meta, tag=key)  # last: its presence means complete
        logger.info(
            "patched %s on %s: %d runs in %.2fs",
            kind,
            loaded.spec.model_id,
            len(rows),
            time.perf_counter() - started,
        )

    # Normalise last, so a degenerate metric still leaves the raw sweep cached.
    values = normalise(patched, meta["clean_metric"], meta["corrupted_metric"])
    return PatchingResult(
        kind=kind,
        layer=layer,
        values=values,
        patched=patched.astype(np.float32),
        clean_metric=float(meta["clean_metric"]),
        corrupted_metric=float(meta["corrupted_metric"]),
        axis_names=AXIS_NAMES[kind],
        clean_str_tokens=list(meta["clean_str_tokens"]),
        corrupted_str_tokens=list(meta["corrupted_str_tokens"]),
        answer_ids=(answer_ids[0], answer_ids[1]),
        answer_str=(decode([answer_ids[0]]), decode([answer_ids[1]])),
        model_id=loaded.spec.model_id,
        key=key,
    )


def _check_site(site: PatchSite, loaded: LoadedModel, n_pos: int) -> None:
    """ValueError unless ``site`` names an activation, layer, position and head that exist."""
    if site.activation not in _HOOKS:
        raise ValueError(
            f"cannot patch {site.activation!r}: use one of {', '.join(sorted(_HOOKS))}"
        )
    if not 0 <= site.layer < loaded.n_layers:
        raise ValueError(
            f"layer {site.layer} is out of range: this model has layers 0-{loaded.n_layers - 1}"
        )
    if site.pos is not None and not 0 <= site.pos < n_pos:
        raise ValueError(f"position {site.pos} is out of range: the prompts have {n_pos} tokens")
    if site.head is not None:
        if site.activation != "z":
            raise ValueError(f"a head can only be chosen for 'z', not {site.activation!r}")
        if not 0 <= site.head < loaded.n_heads:
            raise ValueError(
                f"head {site.head} is out of range: this model has heads 0-{loaded.n_heads - 1}"
            )


def _batch_hooks(chunk: Sequence[Sequence[PatchSite]], clean_acts: dict) -> list:
    """Forward hooks that patch row ``i`` of the batch with the sites of ``chunk[i]``."""
    by_hook: dict[str, list[tuple[int, PatchSite]]] = {}
    for row_index, row in enumerate(chunk):
        for site in row:
            by_hook.setdefault(site.hook_name, []).append((row_index, site))

    def make_hook(assignments: list[tuple[int, PatchSite]], clean):
        def hook(activation, hook):
            # Clone: the activation may be shared with other hook points of the same pass.
            activation = activation.clone()
            for row_index, site in assignments:
                pos = slice(None) if site.pos is None else site.pos
                where = (pos,) if site.head is None else (pos, site.head)
                activation[(row_index, *where)] = clean[(0, *where)]
            return activation

        return hook

    return [(name, make_hook(items, clean_acts[name])) for name, items in by_hook.items()]


def _sweep_rows(
    kind: str, loaded: LoadedModel, n_pos: int, layer: int | None
) -> tuple[list[tuple[PatchSite, ...]], tuple[int, int]]:
    """The one-site rows of a sweep, in row-major order of its result shape."""
    n_layers, n_heads = loaded.n_layers, loaded.n_heads
    if kind in ("resid_pre", "attn_out"):
        rows = [(PatchSite(kind, lay, pos=p),) for lay in range(n_layers) for p in range(n_pos)]
        return rows, (n_layers, n_pos)
    if kind == "head_out_all_pos":
        rows = [(PatchSite("z", lay, head=h),) for lay in range(n_layers) for h in range(n_heads)]
        return rows, (n_layers, n_heads)
    rows = [(PatchSite("z", layer, pos=p, head=h),) for p in range(n_pos) for h in range(n_heads)]
    return rows, (n_pos, n_heads)


def _patching_key(
    loaded: LoadedModel,
    clean_prompt: str,
    corrupted_prompt: str,
    answer_ids: tuple[int, ...],
    kind: str,
    layer: int | None,
    prepend_bos: bool,
) -> str:
    payload = [
        FORMAT_VERSION,
        "patching",
        loaded.spec.model_id,
        loaded.spec.fingerprint,
        clean_prompt,
        corrupted_prompt,
        list(answer_ids),
        kind,
        layer,
        bool(prepend_bos),
    ]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def _read_cached(store: ArrayStore, key: str) -> tuple[np.ndarray, dict] | None:
    """The cached sweep and its metadata, or None when absent, stale or corrupt."""
    try:
        meta = store.get_json(f"{key}/meta")
        if meta is None or meta.get("format") != FORMAT_VERSION:
            return None
        patched = store.get_array(f"{key}/patched")
    except CorruptEntryError as exc:
        logger.warning("patching entry %s is corrupt (%s); recomputing", key[:12], exc)
        store.evict(key)
        return None
    if patched is None:
        store.evict(key)
        return None
    return patched, meta
