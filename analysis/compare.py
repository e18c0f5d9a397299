"""Two prompts on one model, side by side: token alignment and difference arrays.

When the prompts have the same number of tokens, position ``i`` of one faces position ``i`` of
the other. When they do not, the user picks an explicit alignment (:func:`align_tokens`) and
every difference is taken over the aligned pairs only; tokens without a partner are left out of
the difference (the views show them on each prompt's own side).

All differences are ``A - B``: positive where prompt A has more.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np

from analysis.prompt import PromptAnalysis
from analysis.retention import embedding_cosine, resid_norms

logger = logging.getLogger(__name__)

AlignMode = Literal["end", "match"]
ALIGN_MODES: tuple[str, ...] = ("end", "match")


def align_tokens(
    str_tokens_a: Sequence[str], str_tokens_b: Sequence[str], mode: AlignMode
) -> list[tuple[int, int]]:
    """Pairs of positions ``(i, j)`` that face each other in prompts A and B.

    Args:
        str_tokens_a: Tokens of prompt A as text (``PromptAnalysis.str_tokens``).
        str_tokens_b: Tokens of prompt B as text.
        mode: ``"end"`` pairs positions counted from the end: A's last token with B's last,
            and so on until the shorter prompt runs out (with equal counts this is the identity,
            ``(i, i)`` for every position). ``"match"`` pairs equal tokens along the longest
            matching runs found by :class:`difflib.SequenceMatcher` (Ratcliff/Obershelp: the
            longest common run of tokens, then the same recursively on each side of it, with
            ``autojunk`` off so frequent tokens are not ignored); only identical tokens are
            paired and tokens in differing stretches stay unpaired.

    Returns:
        ``[(i, j), ...]`` with ``str_tokens_a[i]`` facing ``str_tokens_b[j]``, increasing in
        both ``i`` and ``j``. Empty when nothing aligns.
    """
    if mode not in ALIGN_MODES:
        raise ValueError(f"alignment mode must be one of {', '.join(ALIGN_MODES)}; got {mode!r}")
    a, b = list(str_tokens_a), list(str_tokens_b)

    if mode == "end":
        shared = min(len(a), len(b))
        return [(len(a) - shared + k, len(b) - shared + k) for k in range(shared)]

    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    return [
        (block.a + k, block.b + k)
        for block in matcher.get_matching_blocks()
        for k in range(block.size)
    ]


def aligned_labels(
    str_tokens_a: Sequence[str], str_tokens_b: Sequence[str], pairs: Sequence[tuple[int, int]]
) -> list[str]:
    """An axis label per aligned pair: the token when both sides agree, ``"a | b"`` otherwise."""
    labels = []
    for i, j in pairs:
        a, b = str_tokens_a[i], str_tokens_b[j]
        labels.append(a if a == b else f"{a} | {b}")
    return labels


def aligned_difference(
    values_a: np.ndarray, values_b: np.ndarray, pairs: Sequence[tuple[int, int]] | None = None
) -> np.ndarray:
    """``A - B`` of any per-position measure, over aligned positions on the last axis.

    Args:
        values_a: Prompt A's measure, ``[..., pos_a]``.
        values_b: Prompt B's measure, ``[..., pos_b]`` with the same leading axes.
        pairs: From :func:`align_tokens`; None pairs position ``i`` with ``i`` and needs
            ``pos_a == pos_b``.

    Returns:
        ``[..., n_pairs]`` float32.
    """
    values_a, values_b = np.asarray(values_a), np.asarray(values_b)
    index_a, index_b = _pair_indices(values_a.shape[-1], values_b.shape[-1], pairs)
    if values_a.shape[:-1] != values_b.shape[:-1]:
        raise ValueError(
            f"cannot subtract measures of shapes {values_a.shape} and {values_b.shape}: only the "
            "last (position) axis may differ"
        )
    return (values_a[..., index_a] - values_b[..., index_b]).astype(np.float32)


def attention_difference(
    a: PromptAnalysis,
    b: PromptAnalysis,
    layer: int,
    pairs: Sequence[tuple[int, int]] | None = None,
) -> np.ndarray:
    """Attention of A minus attention of B on aligned query and key positions.

    Query row ``n`` and key column ``m`` are the ``n``-th and ``m``-th aligned pairs. With a
    ``"match"`` alignment, attention to unpaired keys is not shown, so a row need not sum to
    zero.

    Args:
        a: Prompt A's analysis.
        b: Prompt B's analysis, on the same model.
        layer: The layer.
        pairs: From :func:`align_tokens`; None needs equal token counts.

    Returns:
        ``[n_heads, n_pairs, n_pairs]`` float32, ``A - B``.
    """
    _check_same_model(a, b)
    index_a, index_b = _pair_indices(a.n_pos, b.n_pos, pairs)
    pattern_a = a.attention(layer)[:, index_a][:, :, index_a]
    pattern_b = b.attention(layer)[:, index_b][:, :, index_b]
    return (pattern_a - pattern_b).astype(np.float32)


def residual_norm_difference(
    a: PromptAnalysis, b: PromptAnalysis, pairs: Sequence[tuple[int, int]] | None = None
) -> np.ndarray:
    """Residual-stream norm of A minus B on aligned positions.

    The norms are the Retention view's (:func:`analysis.retention.resid_norms`): row ``l`` is
    ``resid_pre`` of block ``l``, the last row the final ``resid_post``.

    Args:
        a: Prompt A's analysis.
        b: Prompt B's analysis, on the same model.
        pairs: From :func:`align_tokens`; None needs equal token counts.

    Returns:
        ``[n_layers + 1, n_pairs]`` float32, ``A - B``.
    """
    _check_same_model(a, b)
    return aligned_difference(resid_norms(a), resid_norms(b), pairs)


def embedding_cosine_difference(
    a: PromptAnalysis,
    b: PromptAnalysis,
    pairs: Sequence[tuple[int, int]] | None = None,
    *,
    include_pos: bool = False,
) -> np.ndarray:
    """Cosine-to-embedding of A minus B on aligned positions.

    The cosines are the Retention view's (:func:`analysis.retention.embedding_cosine`): the
    residual stream at each layer against the token's embedding ``W_E[token]``, or against
    ``W_E[token] + W_pos[pos]`` with ``include_pos``.

    Args:
        a: Prompt A's analysis.
        b: Prompt B's analysis, on the same model.
        pairs: From :func:`align_tokens`; None needs equal token counts.
        include_pos: Compare with the token plus position embedding.

    Returns:
        ``[n_layers + 1, n_pairs]`` float32, ``A - B``.
    """
    _check_same_model(a, b)
    return aligned_difference(
        embedding_cosine(a, include_pos=include_pos),
        embedding_cosine(b, include_pos=include_pos),
        pairs,
    )


def _pair_indices(
    n_a: int, n_b: int, pairs: Sequence[tuple[int, int]] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Index arrays into A and B for ``pairs`` (identity when None), checked against lengths."""
    if pairs is None:
        if n_a != n_b:
            raise ValueError(
                f"prompt A has {n_a} tokens and prompt B {n_b}; choose a token alignment "
                "(by position from the end, or by matching tokens) to compare them"
            )
        index = np.arange(n_a)
        return index, index
    pairs = [(int(i), int(j)) for i, j in pairs]
    for i, j in pairs:
        if not (0 <= i < n_a and 0 <= j < n_b):
            raise ValueError(
                f"aligned pair ({i}, {j}) is out of range for prompts of {n_a} and {n_b} tokens; "
                "recompute the alignment for these prompts"
            )
    index_a = np.array([i for i, _ in pairs], dtype=np.int64)
    index_b = np.array([j for _, j in pairs], dtype=np.int64)
    return index_a, index_b


def _check_same_model(a: PromptAnalysis, b: PromptAnalysis) -> None:
    """ValueError unless both analyses come from the same model weights."""
    if (a.model_id, a.meta.get("fingerprint")) != (b.model_id, b.meta.get("fingerprint")):
        raise ValueError(
            f"prompt A was analysed on {a.model_id} and prompt B on {b.model_id}; compare two "
            "prompts on the same model"
        )
