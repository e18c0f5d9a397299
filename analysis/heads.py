"""What each attention head does: scores on a standard battery and on the current prompt.

The battery follows the TransformerLens conventions (``transformer_lens/head_detector.py`` and
the induction-head section of the TransformerLens main demo): random tokens, no BOS, a segment of
``seg_len`` tokens repeated twice. A head's score for a behaviour is the attention it puts on the
keys that behaviour predicts, averaged over the queries where the behaviour predicts anything:

- previous token: query ``i`` attends to ``i - 1`` (every query but the first);
- duplicate token: query ``i`` attends to earlier copies of its own token (in the battery,
  ``i - seg_len`` on the second half);
- induction: query ``i`` attends to the token after an earlier copy of its own token (in the
  battery, ``i - seg_len + 1`` on the second half) — Olsson et al. 2022, "In-context learning and
  induction heads".

The detection patterns are TransformerLens's; its ``"mul"`` score divides by every query row
instead of only those with a target, which caps a perfect induction head at 0.5 on the battery.
Here a perfect head scores 1: ``ours = TL * n_rows / n_rows_with_target``. Battery segments are
drawn without replacement, so no token repeats inside a segment and the targets above are the
only ones.

Entropy and mean attention distance come from :mod:`analysis.attention_stats` (query 0 left out).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from analysis.attention_stats import attention_entropy, mean_attention_distance
from analysis.models import LoadedModel, load_model
from analysis.prompt import PromptAnalysis
from analysis.retention import cached_arrays
from analysis.store import ArrayStore, default_store

logger = logging.getLogger(__name__)

# Bump when a score's definition or the battery changes: cached scores then stop matching.
FORMAT_VERSION = 1
HEAD_SCORE_NAMES = ("previous_token", "duplicate_token", "induction", "entropy", "mean_distance")
BATTERY_SEG_LEN = 50
BATTERY_N_SEQS = 16
BATTERY_SEED = 0
# Attention patterns of at most this many elements are held at once during the battery.
_PATTERN_CHUNK_ELEMENTS = 1 << 25


@dataclass(frozen=True)
class HeadScores:
    """Per-head scores, each ``[n_layers, n_heads]`` float32 (NaN where undefined).

    Attributes:
        previous_token: Mean attention to the previous position.
        duplicate_token: Mean attention to earlier copies of the query's token.
        induction: Mean attention to the tokens after earlier copies of the query's token.
        entropy: Mean entropy of the attention rows, in nats.
        mean_distance: Mean attention-weighted ``q - k``, in positions.
        repeat_loss: Battery only: ``[2 * seg_len - 1]`` per-token loss averaged over the
            sequences; entry ``i`` is the loss of predicting token ``i + 1``. None otherwise.
    """

    previous_token: np.ndarray
    duplicate_token: np.ndarray
    induction: np.ndarray
    entropy: np.ndarray
    mean_distance: np.ndarray
    repeat_loss: np.ndarray | None = None

    def as_dict(self) -> dict[str, np.ndarray]:
        """``{name: [n_layers, n_heads]}`` in the order of :data:`HEAD_SCORE_NAMES`."""
        return {name: getattr(self, name) for name in HEAD_SCORE_NAMES}

    def best(self, name: str) -> tuple[int, int, float]:
        """``(layer, head_index, score)`` of the highest-scoring head for ``name``."""
        if name not in HEAD_SCORE_NAMES:
            raise ValueError(f"unknown head score {name!r}; choose one of {HEAD_SCORE_NAMES}")
        scores = getattr(self, name)
        if np.isnan(scores).all():
            raise ValueError(f"no head has a {name} score on this input")
        layer, head = np.unravel_index(np.nanargmax(scores), scores.shape)
        return int(layer), int(head), float(scores[layer, head])

    @property
    def loss_ratio(self) -> float | None:
        """Battery only: mean loss on the repeated half over the first half (lower is better).

        The first half is the predictions of tokens ``1 .. seg_len - 1``, the second half of
        tokens ``seg_len + 1 .. 2 * seg_len - 1``; token ``seg_len`` (the first repeated one)
        cannot be predicted and is left out of both.
        """
        if self.repeat_loss is None:
            return None
        seg_len = (len(self.repeat_loss) + 1) // 2
        first = float(self.repeat_loss[: seg_len - 1].mean())
        second = float(self.repeat_loss[seg_len:].mean())
        return second / first


# ---------------------------------------------------------------------------------------------
# Detection patterns and the score.


def previous_token_detection(n_pos: int) -> np.ndarray:
    """Where a previous-token head attends: ``[q_pos, k_pos]`` with 1 at ``(i, i - 1)``.

    Same as TransformerLens's ``get_previous_token_head_detection_pattern``.
    """
    return np.eye(n_pos, k=-1, dtype=np.float32)


def duplicate_token_detection(tokens: np.ndarray) -> np.ndarray:
    """Where a duplicate-token head attends: earlier positions holding the query's token.

    Same as TransformerLens's ``get_duplicate_token_head_detection_pattern``, batched.

    Args:
        tokens: ``[..., pos]`` token ids.

    Returns:
        ``[..., q_pos, k_pos]`` float32 of 0 and 1, zero on and above the diagonal.
    """
    tokens = np.asarray(tokens)
    same = tokens[..., :, None] == tokens[..., None, :]
    return np.tril(same, k=-1).astype(np.float32)


def induction_detection(tokens: np.ndarray) -> np.ndarray:
    """Where an induction head attends: the position after each earlier copy of the query's token.

    Same as TransformerLens's ``get_induction_head_detection_pattern`` (the duplicate-token
    pattern shifted one key to the right), batched.

    Args:
        tokens: ``[..., pos]`` token ids.

    Returns:
        ``[..., q_pos, k_pos]`` float32 of 0 and 1, zero above the diagonal.
    """
    duplicate = duplicate_token_detection(tokens)
    shifted = np.zeros_like(duplicate)
    shifted[..., 1:] = duplicate[..., :-1]
    return np.tril(shifted)


def detection_score(pattern: np.ndarray, detection: np.ndarray) -> np.ndarray:
    """Mean attention on the detection pattern's keys, over the queries that have any.

    TransformerLens's ``compute_head_attention_similarity_score`` with ``error_measure="mul"``
    sums ``pattern * detection`` and divides by the number of query rows; dividing by the rows
    with a target instead makes a perfect head score 1 whatever the share of such rows.

    Args:
        pattern: ``[batch, n_heads, q_pos, k_pos]`` (or ``[n_heads, q_pos, k_pos]``) attention.
        detection: ``[batch, q_pos, k_pos]`` (or ``[q_pos, k_pos]``) of 0 and 1.

    Returns:
        ``[n_heads]`` float32, pooled over the batch; NaN when no query has a target.
    """
    pattern = np.asarray(pattern, dtype=np.float32)
    detection = np.asarray(detection, dtype=np.float32)
    if pattern.ndim == 3:
        pattern = pattern[None]
    if detection.ndim == 2:
        detection = np.broadcast_to(detection, (pattern.shape[0], *detection.shape))
    if pattern.ndim != 4 or detection.shape != (pattern.shape[0], *pattern.shape[2:]):
        raise ValueError(
            f"expected pattern [batch, n_heads, q_pos, k_pos] and detection [batch, q_pos, "
            f"k_pos], got {pattern.shape} and {detection.shape}"
        )

    has_target = detection.any(-1)  # [batch, q_pos]
    n_rows = int(has_target.sum())
    if n_rows == 0:
        return np.full(pattern.shape[1], np.nan, dtype=np.float32)
    mass = (pattern * detection[:, None]).sum(-1)  # [batch, n_heads, q_pos]
    return ((mass * has_target[:, None]).sum((0, 2)) / n_rows).astype(np.float32)


def head_scores_from_patterns(
    patterns: Sequence[np.ndarray], tokens: np.ndarray, repeat_loss: np.ndarray | None = None
) -> HeadScores:
    """Every score of :class:`HeadScores` from attention patterns and the tokens they saw.

    Args:
        patterns: One ``[batch, n_heads, q_pos, k_pos]`` array per layer.
        tokens: ``[batch, pos]`` token ids.
        repeat_loss: Passed through to :attr:`HeadScores.repeat_loss`.

    Returns:
        A :class:`HeadScores` with ``[n_layers, n_heads]`` arrays.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    detections = {
        "previous_token": previous_token_detection(tokens.shape[-1]),
        "duplicate_token": duplicate_token_detection(tokens),
        "induction": induction_detection(tokens),
    }
    rows: dict[str, list[np.ndarray]] = {name: [] for name in HEAD_SCORE_NAMES}
    for pattern in patterns:
        pattern = np.asarray(pattern, dtype=np.float32)
        if pattern.ndim == 3:
            pattern = pattern[None]
        for name, detection in detections.items():
            rows[name].append(detection_score(pattern, detection))
        rows["entropy"].append(attention_entropy(pattern).mean(0))
        rows["mean_distance"].append(mean_attention_distance(pattern).mean(0))
    arrays = {name: np.stack(values).astype(np.float32) for name, values in rows.items()}
    return HeadScores(**arrays, repeat_loss=repeat_loss)


# ---------------------------------------------------------------------------------------------
# The battery, once per model.


def repeated_random_tokens(
    n_seqs: int, seg_len: int, d_vocab: int, *, seed: int, exclude: Sequence[int] = ()
) -> np.ndarray:
    """Sequences made of one random segment repeated twice, no BOS.

    Each segment is drawn without replacement, so no token repeats within a segment.

    Args:
        n_seqs: Number of sequences.
        seg_len: Segment length.
        d_vocab: Tokens are drawn from ``0 .. d_vocab - 1``.
        seed: Seed of the draw.
        exclude: Token ids never drawn (special tokens).

    Returns:
        ``[n_seqs, 2 * seg_len]`` int64.
    """
    candidates = np.setdiff1d(np.arange(d_vocab), np.asarray(exclude, dtype=np.int64))
    if len(candidates) < seg_len:
        raise ValueError(
            f"seg_len {seg_len} is larger than the {len(candidates)} drawable tokens; "
            "choose a shorter segment"
        )
    rng = np.random.default_rng(seed)
    segments = np.stack([rng.choice(candidates, seg_len, replace=False) for _ in range(n_seqs)])
    return np.concatenate([segments, segments], axis=1).astype(np.int64)


def battery_tokens(
    loaded: LoadedModel,
    *,
    seg_len: int = BATTERY_SEG_LEN,
    n_seqs: int = BATTERY_N_SEQS,
    seed: int = BATTERY_SEED,
) -> np.ndarray:
    """The battery's ``[n_seqs, 2 * seg_len]`` tokens for ``loaded``: no special tokens, and
    only ids the tokenizer knows (a model's embedding can be wider than its tokenizer)."""
    tokenizer = loaded.tokenizer
    d_vocab = min(int(loaded.cfg.d_vocab), len(tokenizer))
    return repeated_random_tokens(
        n_seqs, seg_len, d_vocab, seed=seed, exclude=tokenizer.all_special_ids
    )


def _battery_key(loaded: LoadedModel, seg_len: int, n_seqs: int, seed: int) -> str:
    spec = loaded.spec
    payload = [FORMAT_VERSION, spec.model_id, spec.fingerprint, seg_len, n_seqs, seed]
    return "heads/" + hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def _run_battery(loaded: LoadedModel, tokens: np.ndarray) -> dict[str, np.ndarray]:
    """Attention patterns and per-token loss of ``tokens``, in chunks of sequences."""
    import torch

    n_seqs, n_pos = tokens.shape
    per_seq = loaded.n_layers * loaded.n_heads * n_pos * n_pos
    chunk = max(1, _PATTERN_CHUNK_ELEMENTS // per_seq)
    wanted = {f"blocks.{layer}.attn.hook_pattern" for layer in range(loaded.n_layers)}
    patterns: list[list[np.ndarray]] = [[] for _ in range(loaded.n_layers)]
    losses = []
    for start in range(0, n_seqs, chunk):
        batch = torch.as_tensor(tokens[start : start + chunk]).to(loaded.device)
        with loaded.lock, torch.no_grad():
            logits, cache = loaded.bridge.run_with_cache(
                batch, names_filter=lambda name: name in wanted
            )
        logprobs = logits.float().log_softmax(-1)[:, :-1]
        losses.append(-logprobs.gather(-1, batch[:, 1:, None])[..., 0].cpu().numpy())
        for layer in range(loaded.n_layers):
            pattern = cache[f"blocks.{layer}.attn.hook_pattern"].float().cpu().numpy()
            patterns[layer].append(pattern)
    scores = head_scores_from_patterns(
        [np.concatenate(chunks) for chunks in patterns],
        tokens,
        repeat_loss=np.concatenate(losses).mean(0).astype(np.float32),
    )
    return {**scores.as_dict(), "repeat_loss": scores.repeat_loss}


def model_head_scores(
    model: str | LoadedModel | None = None,
    *,
    seg_len: int = BATTERY_SEG_LEN,
    n_seqs: int = BATTERY_N_SEQS,
    seed: int = BATTERY_SEED,
    allow_any_path: bool = False,
    store: ArrayStore | None = None,
) -> HeadScores:
    """Head scores of a model on the repeated-random-tokens battery, computed once per weights.

    See the module docstring for the definitions. Cached under the model id, its weights'
    fingerprint and the battery options.

    Args:
        model: A model name or path (see :func:`analysis.resolve_model`), a
            :class:`~analysis.models.LoadedModel`, or ``None`` for ``MEMLENS_DEFAULT_MODEL``.
        seg_len: Length of the repeated segment; ``2 * seg_len`` must fit the context.
        n_seqs: Number of random sequences.
        seed: Seed of the random tokens.
        allow_any_path: Passed to :func:`analysis.load_model` for a path.
        store: The cache; the process's default store if None.

    Returns:
        A :class:`HeadScores` with :attr:`~HeadScores.repeat_loss` set.
    """
    loaded = (
        model
        if isinstance(model, LoadedModel)
        else load_model(model, allow_any_path=allow_any_path)
    )
    for name, value, lowest in (("seg_len", seg_len, 2), ("n_seqs", n_seqs, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            raise ValueError(f"{name} must be an integer of at least {lowest}, got {value!r}")
    if 2 * seg_len > loaded.n_ctx:
        raise ValueError(
            f"2 * seg_len = {2 * seg_len} tokens do not fit the context of "
            f"{loaded.spec.model_id} ({loaded.n_ctx}); choose seg_len <= {loaded.n_ctx // 2}"
        )
    store = default_store() if store is None else store
    key = _battery_key(loaded, seg_len, n_seqs, seed)

    def compute() -> dict[str, np.ndarray]:
        tokens = battery_tokens(loaded, seg_len=seg_len, n_seqs=n_seqs, seed=seed)
        return _run_battery(loaded, tokens)

    names = [*HEAD_SCORE_NAMES, "repeat_loss"]
    arrays = cached_arrays(store, key, names, compute, tag=key)
    return HeadScores(**arrays)


def prompt_head_scores(pa: PromptAnalysis) -> HeadScores:
    """Head scores on the analysed prompt itself, from its cached attention patterns.

    Duplicate-token and induction scores are NaN when no token of the prompt repeats.

    Args:
        pa: The prompt's analysis.

    Returns:
        A :class:`HeadScores` (no :attr:`~HeadScores.repeat_loss`).
    """

    def compute() -> dict[str, np.ndarray]:
        patterns = [pa.attention(layer)[None] for layer in range(pa.n_layers)]
        return head_scores_from_patterns(patterns, pa.tokens[None]).as_dict()

    prefix = f"{pa.key}/head_scores.v{FORMAT_VERSION}"
    return HeadScores(
        **cached_arrays(pa.store, prefix, list(HEAD_SCORE_NAMES), compute, tag=pa.key)
    )
