"""Per-head summaries of causal attention patterns: numpy in, numpy out.

Every function takes patterns shaped ``[..., q_pos, k_pos]`` (one head, a layer's heads
``[n_heads, q_pos, k_pos]`` or a whole model ``[n_layers, n_heads, q_pos, k_pos]``) whose rows
are probability distributions over keys, and reduces the last two axes.

Averages over queries skip query 0 whenever there is more than one position: under a causal mask
position 0 can only attend to itself, so its row says nothing about the head and would pull every
head towards the same value.
"""

from __future__ import annotations

import numpy as np

# The summaries of head_stats(), by name, with the titles the app shows, in stacking order.
STAT_TITLES = {
    "entropy": "entropy (nats)",
    "distance": "mean distance",
    "max_weight": "max weight",
    "first_token": "to first token",
}


def _as_pattern(pattern: np.ndarray) -> np.ndarray:
    """``pattern`` as float32, after checking it is ``[..., q_pos, k_pos]`` with q_pos == k_pos."""
    pattern = np.asarray(pattern, dtype=np.float32)
    if pattern.ndim < 2 or pattern.shape[-1] != pattern.shape[-2]:
        raise ValueError(
            f"expected attention patterns shaped [..., q_pos, k_pos] with q_pos == k_pos, "
            f"got shape {pattern.shape}"
        )
    return pattern


def _mean_over_queries(per_query: np.ndarray) -> np.ndarray:
    """Average ``[..., q_pos]`` over queries 1.. (over query 0 alone when it is the only one)."""
    return per_query[..., 1:].mean(-1) if per_query.shape[-1] > 1 else per_query.mean(-1)


def attention_entropy(pattern: np.ndarray) -> np.ndarray:
    """Mean Shannon entropy of the attention rows, in nats.

    0 means every query puts all its weight on one key; ``log(q + 1)`` is the most a row at query
    ``q`` can reach (uniform over itself and everything before it).

    Args:
        pattern: Attention weights ``[..., q_pos, k_pos]``.

    Returns:
        ``[...]``: the entropy averaged over queries.
    """
    pattern = _as_pattern(pattern)
    # 0 * log 0 is 0 by continuity; clip keeps log finite and leaves the product at 0.
    plogp = pattern * np.log(np.clip(pattern, 1e-12, None))
    return _mean_over_queries(-plogp.sum(-1))


def mean_attention_distance(pattern: np.ndarray) -> np.ndarray:
    """How far back a head looks: the attention-weighted ``q - k``, averaged over queries.

    1 for a previous-token head, 0 for a head that attends to the current token; large for heads
    that look far back (induction heads on long repeats, heads parked on the first token).

    Args:
        pattern: Attention weights ``[..., q_pos, k_pos]``.

    Returns:
        ``[...]``: mean distance in positions.
    """
    pattern = _as_pattern(pattern)
    positions = np.arange(pattern.shape[-1], dtype=np.float32)
    distance = positions[:, None] - positions[None, :]  # [q_pos, k_pos]
    return _mean_over_queries((pattern * distance).sum(-1))


def max_attention_weight(pattern: np.ndarray) -> np.ndarray:
    """How peaked a head is: each query's largest weight, averaged over queries.

    1 for a head that always attends to a single key; about ``2 / q_pos`` for one that spreads
    its weight evenly. (The plain maximum over the whole pattern is nearly always 1, at query 0.)

    Args:
        pattern: Attention weights ``[..., q_pos, k_pos]``.

    Returns:
        ``[...]``: mean of the per-query maximum weight.
    """
    return _mean_over_queries(_as_pattern(pattern).max(-1))


def first_token_attention(pattern: np.ndarray) -> np.ndarray:
    """Mean weight on key position 0 (the BOS token when one is prepended).

    Many heads park unused attention on the first token ("attention sinks", Xiao et al. 2023,
    arXiv:2309.17453); a value near 1 marks a head that is mostly idle on this prompt.

    Args:
        pattern: Attention weights ``[..., q_pos, k_pos]``.

    Returns:
        ``[...]``: the weight on key 0, averaged over queries.
    """
    return _mean_over_queries(_as_pattern(pattern)[..., 0])


def head_stats(pattern: np.ndarray) -> np.ndarray:
    """All four summaries at once, in the order of :data:`STAT_TITLES`.

    Args:
        pattern: Attention weights ``[..., q_pos, k_pos]``.

    Returns:
        ``[..., 4]``: entropy, mean distance, max weight and first-token attention.
    """
    return np.stack(
        [
            attention_entropy(pattern),
            mean_attention_distance(pattern),
            max_attention_weight(pattern),
            first_token_attention(pattern),
        ],
        axis=-1,
    )


def token_flow(pattern: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For every position, the attention it receives from later queries and sends to earlier keys.

    Args:
        pattern: Attention weights ``[..., q_pos, k_pos]``.

    Returns:
        ``(received, sent)``, both ``[..., pos]``. ``received[..., t]`` is the mean weight that
        queries after ``t`` put on key ``t`` (NaN for the last position, which nothing comes
        after). ``sent[..., t]`` is the total weight query ``t`` puts on keys before it, that is
        ``1 - pattern[..., t, t]`` under a causal mask (0 at position 0).
    """
    pattern = _as_pattern(pattern)
    n_pos = pattern.shape[-1]
    later = np.tril(np.ones((n_pos, n_pos), dtype=bool), k=-1)  # [q_pos, k_pos]: q > k
    backward = np.where(later, pattern, np.float32(0.0))  # weights on strictly earlier keys

    n_later = (n_pos - 1 - np.arange(n_pos)).astype(np.float32)
    received = np.where(n_later > 0, backward.sum(-2) / np.maximum(n_later, 1.0), np.nan)
    sent = backward.sum(-1)
    return received.astype(np.float32), sent.astype(np.float32)
