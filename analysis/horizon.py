"""The memory horizon: how far back the context matters for each prediction of a prompt.

For a prediction at position ``i`` (of token ``i + 1``) the model is given only the last ``k``
tokens of the prompt up to ``i`` — the window ``tokens[i - k + 1 .. i]`` — and the loss on token
``i + 1`` is measured, for ``k = 1 .. context(i)``. Where the loss stops falling as ``k`` grows,
older context no longer helps. This is the per-token version of the loss-vs-context-length curves
of Olsson et al. 2022 ("In-context learning and induction heads") and Kaplan et al. 2020.

Conventions:

- ``k`` counts prompt tokens; when the analysis prepended a BOS token, every window gets the BOS
  token in front as well (it is the model's attention sink, and the full-context run had it),
  so a window of ``k`` tokens is ``k + 1`` positions long. Without BOS, windows have none.
- Windows start at position 0 (plus BOS): the tokens get the positional embeddings of a prompt
  that began there, as they would if the user had typed only that window.
- ``context(i)`` is the number of prompt tokens at positions up to ``i`` (``i`` with BOS, ``i +
  1`` without). For ``k >= context(i)`` the window is the whole prefix, so the loss is the
  full-context loss of :attr:`PromptAnalysis.loss`; windows are run for ``k <= context(i)`` (the
  equality case checks the method) and the analysis's loss is used beyond.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from analysis.prompt import PromptAnalysis
from analysis.retention import cached_arrays, model_for

logger = logging.getLogger(__name__)

DEFAULT_MAX_K_VALUES = 32
# Logits (and attention scores of one layer) of at most this many elements per batch, 64 MB of
# float32; a single window larger than that still runs, alone.
_LOGIT_BATCH_ELEMENTS = 1 << 24


class _Cancelled(Exception):
    """``should_stop`` asked to stop; nothing is cached."""


@dataclass(frozen=True)
class MemoryHorizon:
    """Loss on each token as a function of how much context the model gets.

    Attributes:
        k_values: ``[n_k]`` int64, the context lengths tried (prompt tokens, BOS not counted),
            ascending.
        loss: ``[n_k, pos - 1]`` float32; ``loss[j, i]`` is the loss of predicting token ``i + 1``
            from at most ``k_values[j]`` tokens of context ending at ``i`` (aligned with
            :attr:`PromptAnalysis.loss`).
        full_loss: ``[pos - 1]`` float32, the full-context loss.
        context: ``[pos - 1]`` int64, the context available to each prediction.
    """

    k_values: np.ndarray
    loss: np.ndarray
    full_loss: np.ndarray
    context: np.ndarray

    @property
    def mean_loss(self) -> np.ndarray:
        """``[n_k]``: the loss averaged over all predictions, context capped at each k."""
        return self.loss.mean(-1)

    def horizon(self, tolerance: float = 0.1) -> np.ndarray:
        """How many tokens back each prediction needs, within ``tolerance`` nats.

        Args:
            tolerance: Allowed excess over the full-context loss, in nats.

        Returns:
            ``[pos - 1]`` int64: the smallest ``k`` of :attr:`k_values` from which on every
            larger ``k`` keeps the loss within ``tolerance`` of the full-context loss, capped at
            :attr:`context` (0 for a prediction made from BOS alone).
        """
        close = self.loss <= self.full_loss[None] + tolerance  # [n_k, pos - 1]
        # Close from index j on: a reversed cumulative AND over the k axis.
        close_from = np.flip(np.logical_and.accumulate(np.flip(close, 0), axis=0), 0)
        first = np.where(close_from.any(0), close_from.argmax(0), len(self.k_values) - 1)
        return np.minimum(self.k_values[first], self.context).astype(np.int64)


def context_grid(n_context: int, max_k_values: int = DEFAULT_MAX_K_VALUES) -> np.ndarray:
    """Context lengths to try: every ``k`` when there are few, else a geometric grid.

    Args:
        n_context: The longest context, ``k`` runs from 1 to it.
        max_k_values: At most this many values (at least 2).

    Returns:
        ``[n_k]`` int64, strictly increasing, starting at 1 and ending at ``n_context``.
    """
    if n_context < 1:
        raise ValueError(f"n_context must be at least 1, got {n_context}")
    if max_k_values < 2:
        raise ValueError(f"max_k_values must be at least 2, got {max_k_values}")
    if n_context <= max_k_values:
        return np.arange(1, n_context + 1, dtype=np.int64)

    # Rounding merges the small values, so take the densest geometric grid that still fits.
    def grid(num: int) -> np.ndarray:
        return np.unique(np.rint(np.geomspace(1, n_context, num)).astype(np.int64))

    num = max_k_values
    while len(grid(num + 1)) <= max_k_values:
        num += 1
    return grid(num)


def prompt_context(n_pos: int, *, prepend_bos: bool) -> np.ndarray:
    """``[n_pos - 1]`` int64: prompt tokens available to the prediction at each position."""
    return np.arange(n_pos - 1, dtype=np.int64) + (0 if prepend_bos else 1)


def memory_horizon(
    pa: PromptAnalysis,
    *,
    max_k_values: int = DEFAULT_MAX_K_VALUES,
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> MemoryHorizon | None:
    """Loss on every token of the prompt with the context truncated to ``k`` tokens.

    A window of the prompt starting at token ``j`` gives, at each of its positions ``i``, the
    loss with ``k = i - j + 1`` tokens of context, so one window per start covers every ``k``
    (:func:`window_plan`). That is at most ``n^2 / 2`` tokens for ``n`` prompt tokens — for
    every ``k`` at once — and fewer with a geometric grid, where each window stops at the
    largest grid ``k`` that fits. Windows run in batches of bounded size, longest first.
    Computed once per analysis and grid, then read from the cache.

    Args:
        pa: The prompt's analysis.
        max_k_values: Cap on the number of context lengths (a geometric grid past it).
        progress: Called as ``progress(done, total)`` with batches done, before the first batch
            and after each one.
        should_stop: Polled before each batch; when it returns True the computation stops,
            nothing is cached and None is returned.

    Returns:
        A :class:`MemoryHorizon`, or None when stopped.
    """
    prepend_bos = bool(pa.options.get("prepend_bos", True))
    context = prompt_context(pa.n_pos, prepend_bos=prepend_bos)
    n_context = int(context.max()) if len(context) else 0
    if n_context < 1:
        raise ValueError(
            "the memory horizon needs at least two prompt tokens; type a longer prompt"
        )
    if isinstance(max_k_values, bool) or not isinstance(max_k_values, int) or max_k_values < 2:
        raise ValueError(f"max_k_values must be an integer of at least 2, got {max_k_values!r}")
    k_values = context_grid(n_context, max_k_values)
    full_loss = pa.loss

    def compute() -> dict[str, np.ndarray]:
        loss = _windowed_losses(pa, k_values, full_loss, prepend_bos, progress, should_stop)
        return {"k_values": k_values, "loss": loss}

    prefix = f"{pa.key}/horizon.m{max_k_values}"
    try:
        arrays = cached_arrays(pa.store, prefix, ["k_values", "loss"], compute, tag=pa.key)
    except _Cancelled:
        logger.info("memory horizon of %s stopped on request", pa.key[:12])
        return None
    return MemoryHorizon(
        k_values=arrays["k_values"], loss=arrays["loss"], full_loss=full_loss, context=context
    )


def window_plan(
    n_pos: int, k_values: np.ndarray, *, prepend_bos: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Which windows to run: one per start position, as long as the largest useful ``k``.

    A window starting at prompt position ``j`` yields, at its position ``i``, the loss with
    ``k = i - j + 1`` tokens of context, so one window serves every ``k`` for its start. It only
    needs to reach the largest ``k`` of the grid that fits before the last prediction.

    Args:
        n_pos: Positions of the analysed prompt (BOS included).
        k_values: The grid of :func:`context_grid`.
        prepend_bos: Whether position 0 is BOS (it never starts a window).

    Returns:
        ``(starts, lengths)``, both ``[n_windows]`` int64; ``lengths`` counts prompt tokens.
    """
    offset = 1 if prepend_bos else 0
    last = n_pos - 2  # the last position that predicts a token
    starts = np.arange(offset, last + 1, dtype=np.int64)
    available = last - starts + 1
    lengths = k_values[np.searchsorted(k_values, available, side="right") - 1]
    return starts, lengths.astype(np.int64)


def _windowed_losses(
    pa: PromptAnalysis,
    k_values: np.ndarray,
    full_loss: np.ndarray,
    prepend_bos: bool,
    progress: Callable[[int, int], None] | None,
    should_stop: Callable[[], bool] | None,
) -> np.ndarray:
    """``[n_k, pos - 1]`` losses from the windows of :func:`window_plan`; the full-context loss
    where ``k`` exceeds the context."""
    import torch

    loaded = model_for(pa)
    tokens = pa.tokens
    offset = 1 if prepend_bos else 0
    d_vocab, n_heads = int(loaded.cfg.d_vocab), loaded.n_heads
    loss = np.repeat(full_loss[None].astype(np.float32), len(k_values), axis=0)
    k_index = np.full(int(k_values[-1]) + 1, -1, dtype=np.int64)
    k_index[k_values] = np.arange(len(k_values))

    # Longest windows first, batched while the padded logits and attention scores stay under the
    # budget; rows are right-padded, which a causal model never sees from earlier positions.
    starts, lengths = window_plan(pa.n_pos, k_values, prepend_bos=prepend_bos)
    order = np.argsort(-lengths, kind="stable")
    batches, current = [], []
    for index in order:
        width = int(lengths[current[0] if current else index]) + offset
        per_row = width * max(d_vocab, n_heads * width)
        if current and (len(current) + 1) * per_row > _LOGIT_BATCH_ELEMENTS:
            batches.append(current)
            current = []
        current.append(int(index))
    if current:
        batches.append(current)
    total = len(batches)
    if progress is not None:
        progress(0, total)

    started = time.perf_counter()
    for done, batch in enumerate(batches, start=1):
        if should_stop is not None and should_stop():
            raise _Cancelled
        width = int(lengths[batch[0]])
        # Window rows: prompt tokens j .. j + width - 1 (padded past each row's own length),
        # BOS in front when there is one; targets are the token after each position.
        positions = starts[batch, None] + np.arange(width)[None]  # [batch, width]
        valid = np.arange(width)[None] < lengths[batch, None]
        positions = np.where(valid, positions, starts[batch, None])
        windows = tokens[positions]
        if prepend_bos:
            windows = np.concatenate([np.full((len(batch), 1), tokens[0]), windows], axis=1)
        targets = torch.as_tensor(tokens[positions + 1])
        with loaded.lock, torch.no_grad():
            logits = loaded.bridge(torch.as_tensor(windows).to(loaded.device))
        logprobs = logits[:, offset:].float().log_softmax(-1).cpu()
        window_loss = -logprobs.gather(-1, targets[..., None])[..., 0].numpy()

        # Position i of a window starting at j had k = i - j + 1 tokens of context.
        rows = k_index[np.arange(1, width + 1)][None].repeat(len(batch), 0)
        keep = valid & (rows >= 0)
        loss[rows[keep], positions[keep]] = window_loss[keep]
        if progress is not None:
            progress(done, total)

    logger.info(
        "memory horizon of %d tokens, %d context lengths: %d windows in %d batches, %.1fs",
        pa.n_pos,
        len(k_values),
        len(starts),
        total,
        time.perf_counter() - started,
    )
    return loss
