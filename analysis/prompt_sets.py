"""Many prompts at once: parse a pasted or uploaded set, then tabulate per-prompt measures.

Every prompt goes through :func:`analysis.analyze`, so each one is cached and opens instantly in
the single-prompt views. A bad row never stops the set: it is reported with its line number and
the reason, and the other prompts still run.

Measures (each prompt's tokens ``t_0 .. t_{n-1}``, ``t_0`` the BOS token when prepended; the loss
of position ``j`` is the cross-entropy of predicting ``t_j`` from ``t_0 .. t_{j-1}``):

- ``mean_loss``: mean loss over every predicted token ``t_1 .. t_{n-1}`` (what TransformerLens's
  ``return_type="loss"`` gives).
- ``repeated_token_loss``: mean loss over the *repeated* tokens: ``t_j`` is repeated when its
  predecessor ``t_{j-1}`` occurred earlier, at ``i`` (the most recent such position), and the
  token that followed it then is ``t_j`` again (``t_{i+1} == t_j``). These are exactly the
  tokens an induction head can predict by copying (Olsson et al. 2022). None when a prompt has
  none; ``n_repeated_tokens`` counts them.
- ``best_induction_attention``: for each head, the mean over query positions ``q`` whose token
  occurred earlier (most recently at ``i``) of the attention from ``q`` to ``i + 1``, the token
  after that previous occurrence; the maximum over all heads, with the head in
  ``best_induction_head`` (``"L1H2"``). None when no token repeats.
- :class:`HeadAttentionMeasure`: one head's attention from the last position to the positions
  whose token is the chosen text (summed over them; compared without surrounding whitespace, so
  ``"Paris"`` matches ``" Paris"``); 0 when the token does not occur.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from analysis.models import load_model
from analysis.prompt import PromptAnalysis, analyze, validate_prompt
from analysis.settings import get_settings
from analysis.store import ArrayStore

logger = logging.getLogger(__name__)

DEFAULT_MAX_PROMPTS = 500
BUILTIN_MEASURES: tuple[str, ...] = (
    "mean_loss",
    "repeated_token_loss",
    "best_induction_attention",
)
_CSV_SUFFIXES = {".csv": ",", ".tsv": "\t"}


@dataclass(frozen=True)
class BadRow:
    """A row of the set that was skipped: its 1-based line number and why."""

    line: int
    reason: str


@dataclass(frozen=True)
class PromptSet:
    """Parsed prompts with the line each came from, and the rows that were skipped."""

    prompts: list[str]
    lines: list[int]
    bad_rows: list[BadRow] = field(default_factory=list)


@dataclass(frozen=True)
class HeadAttentionMeasure:
    """Attention of head ``head`` of ``layer`` from the last position to the token ``token``."""

    layer: int
    head: int
    token: str

    @property
    def label(self) -> str:
        return f"L{self.layer}H{self.head} → {self.token!r}"


@dataclass(frozen=True)
class Column:
    """A table column: the key in each row, its display name and ``numeric`` or ``text``."""

    id: str
    name: str
    type: str


@dataclass(frozen=True)
class PromptSetTable:
    """Per-prompt measures, one dict per prompt keyed by :attr:`Column.id`.

    Attributes:
        columns: The columns in display order; every row has every key (None where a measure
            does not apply).
        rows: One dict per prompt that ran, in input order.
        bad_rows: Rows skipped while parsing or failed while running, by line number.
        stopped: True when ``should_stop`` ended the run early; ``rows`` then holds the prompts
            done so far.
        model_id: The model the measures come from.
    """

    columns: list[Column]
    rows: list[dict]
    bad_rows: list[BadRow]
    stopped: bool
    model_id: str


def parse_prompt_text(
    text: str, *, max_prompts: int = DEFAULT_MAX_PROMPTS, max_chars: int | None = None
) -> PromptSet:
    """Prompts from pasted text, one per line.

    Lines are split on ``\\n`` only (a trailing ``\\r`` is dropped), so other line-breaking
    characters stay in the line and are reported as control characters. Leading spaces are
    kept: they change the tokens. One final newline does not make an empty last line.

    Args:
        text: The pasted text.
        max_prompts: Read at most this many prompts; the lines after are reported as one bad row.
        max_chars: Longest prompt in characters; ``None`` means ``MEMLENS_MAX_PROMPT_CHARS``.

    Returns:
        The :class:`PromptSet`; lines that are empty, too long or hold control characters are in
        ``bad_rows`` with the reason from :func:`analysis.validate_prompt`.
    """
    if not isinstance(text, str):
        raise ValueError(f"the prompt set must be text, got {type(text).__name__}")
    lines = text.split("\n")
    if text.endswith("\n"):
        lines.pop()
    rows = [(number, line.removesuffix("\r")) for number, line in enumerate(lines, start=1)]
    return _collect(rows, max_prompts=max_prompts, max_chars=max_chars)


def parse_prompt_file(
    filename: str,
    content: bytes | str,
    *,
    max_prompts: int = DEFAULT_MAX_PROMPTS,
    max_chars: int | None = None,
) -> PromptSet:
    """Prompts from an uploaded file: plain text (one per line) or CSV/TSV.

    A ``.csv`` or ``.tsv`` file uses its ``prompt`` column when its first row has a cell named
    ``prompt`` (any case; that row is then the header), and otherwise the first column of every
    row. Line numbers are those of the file, so a quoted cell spanning lines reports where its
    row starts.

    Args:
        filename: The uploaded file's name; only its suffix is used.
        content: The file's bytes (UTF-8, a BOM is fine) or its decoded text.
        max_prompts: Read at most this many prompts.
        max_chars: Longest prompt in characters; ``None`` means ``MEMLENS_MAX_PROMPT_CHARS``.

    Returns:
        The :class:`PromptSet`.

    Raises:
        ValueError: The file is not UTF-8, or the CSV cannot be read.
    """
    if isinstance(content, bytes):
        try:
            text = content.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"{filename} is not UTF-8 text (undecodable byte at offset {exc.start}); save it "
                "as UTF-8 and upload it again"
            ) from None
    elif isinstance(content, str):
        text = content.removeprefix("\ufeff")
    else:
        raise ValueError(f"the file content must be bytes or text, got {type(content).__name__}")

    suffix = "." + filename.rsplit(".", 1)[-1].lower() if "." in filename else ""
    if suffix not in _CSV_SUFFIXES:
        return parse_prompt_text(text, max_prompts=max_prompts, max_chars=max_chars)
    return _collect(
        _csv_rows(filename, text, _CSV_SUFFIXES[suffix]),
        max_prompts=max_prompts,
        max_chars=max_chars,
    )


def previous_occurrences(tokens: np.ndarray) -> np.ndarray:
    """For each position, the most recent earlier position holding the same token.

    Args:
        tokens: Token ids ``[pos]``.

    Returns:
        ``[pos]`` int64, -1 where the token has not occurred before.
    """
    last_seen: dict[int, int] = {}
    previous = np.full(len(tokens), -1, dtype=np.int64)
    for pos, token in enumerate(np.asarray(tokens).tolist()):
        previous[pos] = last_seen.get(token, -1)
        last_seen[token] = pos
    return previous


def repeated_token_mask(tokens: np.ndarray) -> np.ndarray:
    """Which tokens are *repeated*: predictable by copying what followed their predecessor.

    ``t_j`` is repeated when ``t_{j-1}`` occurred before, most recently at ``i``, and
    ``t_{i+1} == t_j``.

    Args:
        tokens: Token ids ``[pos]``.

    Returns:
        ``[pos]`` bool.
    """
    tokens = np.asarray(tokens)
    previous = previous_occurrences(tokens)
    mask = np.zeros(len(tokens), dtype=bool)
    for j in range(1, len(tokens)):
        i = previous[j - 1]
        mask[j] = i >= 0 and tokens[i + 1] == tokens[j]
    return mask


def repeated_token_loss(loss: np.ndarray, tokens: np.ndarray) -> tuple[float | None, int]:
    """Mean loss over the repeated tokens (see :func:`repeated_token_mask`).

    Args:
        loss: Per-token loss ``[pos - 1]``, entry ``j - 1`` for predicting ``t_j``.
        tokens: Token ids ``[pos]``.

    Returns:
        ``(mean loss or None when no token is repeated, number of repeated tokens)``.
    """
    mask = repeated_token_mask(tokens)[1:]
    count = int(mask.sum())
    return (float(np.asarray(loss)[mask].mean()) if count else None), count


def induction_attention(patterns: Sequence[np.ndarray], tokens: np.ndarray) -> np.ndarray:
    """Each head's mean attention from a repeated token to the token after its previous
    occurrence.

    Args:
        patterns: One ``[n_heads, q_pos, k_pos]`` attention pattern per layer.
        tokens: Token ids ``[pos]``.

    Returns:
        ``[n_layers, n_heads]`` float32; NaN everywhere when no token occurs twice.
    """
    previous = previous_occurrences(tokens)
    queries = np.flatnonzero(previous >= 0)
    scores = np.full((len(patterns), patterns[0].shape[0]), np.nan, dtype=np.float32)
    if len(queries):
        targets = previous[queries] + 1
        for layer, pattern in enumerate(patterns):
            scores[layer] = pattern[:, queries, targets].mean(axis=-1)
    return scores


def head_attention_to_token(
    pattern: np.ndarray, str_tokens: Sequence[str], head: int, token: str
) -> float:
    """Attention of ``head`` from the last position to every position whose token is ``token``.

    Tokens are compared without surrounding whitespace (unless ``token`` is only whitespace).

    Args:
        pattern: One layer's attention ``[n_heads, q_pos, k_pos]``.
        str_tokens: The prompt's tokens as text, ``[pos]``.
        head: The head.
        token: The token text to look for.

    Returns:
        The summed attention, 0.0 when the token does not occur.
    """
    wanted = token.strip()
    if wanted:
        hits = [pos for pos, text in enumerate(str_tokens) if text.strip() == wanted]
    else:
        hits = [pos for pos, text in enumerate(str_tokens) if text == token]
    return float(pattern[head, -1, hits].sum()) if hits else 0.0


def run_prompt_set(
    prompts: PromptSet | Sequence[str],
    model: str | None,
    measures: Sequence[str | HeadAttentionMeasure],
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    *,
    prepend_bos: bool = True,
    allow_any_path: bool = False,
    store: ArrayStore | None = None,
) -> PromptSetTable:
    """Analyse every prompt and tabulate the chosen measures (see the module docstring).

    Args:
        prompts: A parsed :class:`PromptSet` (its bad rows are carried over), or plain prompts,
            numbered from line 1.
        model: Model name or checkpoint path; ``None`` means ``MEMLENS_DEFAULT_MODEL``.
        measures: Names from :data:`BUILTIN_MEASURES` and :class:`HeadAttentionMeasure`\\ s.
        progress: Called as ``progress(done, total)`` after each prompt.
        should_stop: Polled before each prompt; True ends the run with ``stopped=True``.
        prepend_bos: Prepend the BOS token, as :func:`analysis.analyze` does by default.
        allow_any_path: Load a checkpoint from any directory.
        store: The cache; the process's default store if None.

    Returns:
        The :class:`PromptSetTable`. Columns: ``line``, ``prompt``, ``n_tokens``, then per
        measure ``mean_loss``; ``repeated_token_loss`` and ``n_repeated_tokens``;
        ``best_induction_attention`` and ``best_induction_head``; ``head_attention_<k>`` for
        the k-th head measure.

    Raises:
        ValueError: Unknown measure, a head or layer the model does not have, or a model that
            cannot be loaded. Bad prompts do not raise: they become bad rows.
    """
    # Validate the measures against the model before any prompt runs.
    if isinstance(prompts, PromptSet):
        texts, lines, bad_rows = list(prompts.prompts), list(prompts.lines), list(prompts.bad_rows)
    else:
        texts = list(prompts)
        lines, bad_rows = list(range(1, len(texts) + 1)), []
    loaded = load_model(model or get_settings().default_model, allow_any_path=allow_any_path)
    builtins, heads = _check_measures(measures, loaded.n_layers, loaded.n_heads)
    columns = _columns(builtins, heads)

    rows: list[dict] = []
    stopped = False
    started = time.perf_counter()
    for done, (line, text) in enumerate(zip(lines, texts, strict=True)):
        if should_stop is not None and should_stop():
            stopped = True
            break
        try:
            pa = analyze(
                text,
                loaded.spec.model_id,
                prepend_bos=prepend_bos,
                allow_any_path=True,  # the model was resolved (and allowed) above
                store=store,
            )
        except ValueError as exc:
            bad_rows.append(BadRow(line, str(exc)))
        else:
            rows.append({"line": line, "prompt": text, **_measure_row(pa, builtins, heads)})
        if progress is not None:
            progress(done + 1, len(texts))

    logger.info(
        "prompt set on %s: %d rows, %d bad, %.1fs%s",
        loaded.spec.model_id,
        len(rows),
        len(bad_rows),
        time.perf_counter() - started,
        " (stopped)" if stopped else "",
    )
    return PromptSetTable(
        columns=columns,
        rows=rows,
        bad_rows=sorted(bad_rows, key=lambda bad: bad.line),
        stopped=stopped,
        model_id=loaded.spec.model_id,
    )


def _collect(
    rows: Iterable[tuple[int, str | BadRow]], *, max_prompts: int, max_chars: int | None
) -> PromptSet:
    """Validate numbered rows into a PromptSet, stopping at ``max_prompts`` prompts."""
    if isinstance(max_prompts, bool) or not isinstance(max_prompts, int) or max_prompts < 1:
        raise ValueError(f"max_prompts must be a positive integer, got {max_prompts!r}")
    prompts: list[str] = []
    lines: list[int] = []
    bad_rows: list[BadRow] = []
    skipped: list[int] = []

    for line, text in rows:
        if len(prompts) >= max_prompts:
            skipped.append(line)
            continue
        if isinstance(text, BadRow):
            bad_rows.append(text)
            continue
        try:
            validate_prompt(text, max_chars=max_chars)
        except ValueError as exc:
            bad_rows.append(BadRow(line, str(exc)))
            continue
        prompts.append(text)
        lines.append(line)

    if skipped:
        bad_rows.append(
            BadRow(
                skipped[0],
                f"the set is capped at {max_prompts} prompts; lines {skipped[0]}-{skipped[-1]} "
                "were not read",
            )
        )
    return PromptSet(prompts=prompts, lines=lines, bad_rows=bad_rows)


def _csv_rows(filename: str, text: str, delimiter: str):
    """``(line, prompt text or BadRow)`` for each CSV record, by the rule of parse_prompt_file."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    column = 0
    start = 1
    try:
        for index, record in enumerate(reader):
            line, start = start, reader.line_num + 1
            if index == 0:
                names = [cell.strip().lower() for cell in record]
                if "prompt" in names:
                    column = names.index("prompt")
                    continue
            if not record:
                yield line, BadRow(line, "the prompt is empty: the row has no cells")
            elif column >= len(record):
                yield line, BadRow(line, f"the row has no cell in the prompt column ({column + 1})")
            else:
                yield line, record[column]
    except csv.Error as exc:
        raise ValueError(
            f"{filename} could not be read as CSV near line {start}: {exc}; fix that row or "
            "upload the prompts as plain text, one per line"
        ) from None


def _check_measures(
    measures: Sequence[str | HeadAttentionMeasure], n_layers: int, n_heads: int
) -> tuple[list[str], list[HeadAttentionMeasure]]:
    """The built-in names and head measures, deduplicated; ValueError for unknown ones."""
    builtins: list[str] = []
    heads: list[HeadAttentionMeasure] = []
    for measure in measures:
        if isinstance(measure, HeadAttentionMeasure):
            if not all(isinstance(v, (int, np.integer)) for v in (measure.layer, measure.head)):
                raise ValueError(
                    f"a head measure needs an integer layer and head, got {measure.layer!r} and "
                    f"{measure.head!r}"
                )
            if not 0 <= measure.layer < n_layers:
                raise ValueError(
                    f"layer {measure.layer} is out of range: this model has layers 0-{n_layers - 1}"
                )
            if not 0 <= measure.head < n_heads:
                raise ValueError(
                    f"head {measure.head} is out of range: this model has heads 0-{n_heads - 1}"
                )
            if not isinstance(measure.token, str) or not measure.token:
                raise ValueError("choose the token the head should attend to: it is empty")
            if measure not in heads:
                heads.append(measure)
        elif measure in BUILTIN_MEASURES:
            if measure not in builtins:
                builtins.append(measure)
        else:
            raise ValueError(
                f"unknown measure {measure!r}: use {', '.join(BUILTIN_MEASURES)} or a "
                "HeadAttentionMeasure"
            )
    return builtins, heads


def _columns(builtins: list[str], heads: list[HeadAttentionMeasure]) -> list[Column]:
    """The table's columns for these measures, in display order."""
    columns = [
        Column("line", "line", "numeric"),
        Column("prompt", "prompt", "text"),
        Column("n_tokens", "tokens", "numeric"),
    ]
    if "mean_loss" in builtins:
        columns.append(Column("mean_loss", "mean loss", "numeric"))
    if "repeated_token_loss" in builtins:
        columns.append(Column("repeated_token_loss", "loss on repeated tokens", "numeric"))
        columns.append(Column("n_repeated_tokens", "repeated tokens", "numeric"))
    if "best_induction_attention" in builtins:
        columns.append(Column("best_induction_attention", "best induction attention", "numeric"))
        columns.append(Column("best_induction_head", "induction head", "text"))
    for k, measure in enumerate(heads):
        columns.append(Column(f"head_attention_{k}", measure.label, "numeric"))
    return columns


def _measure_row(
    pa: PromptAnalysis, builtins: list[str], heads: list[HeadAttentionMeasure]
) -> dict:
    """The measure cells of one prompt's row."""
    row: dict = {"n_tokens": pa.n_pos}
    tokens = pa.tokens

    if "mean_loss" in builtins:
        row["mean_loss"] = float(pa.loss.mean()) if pa.n_pos > 1 else None
    if "repeated_token_loss" in builtins:
        row["repeated_token_loss"], row["n_repeated_tokens"] = repeated_token_loss(pa.loss, tokens)
    if "best_induction_attention" in builtins:
        scores = induction_attention([pa.attention(lay) for lay in range(pa.n_layers)], tokens)
        if np.isnan(scores).all():
            row["best_induction_attention"], row["best_induction_head"] = None, None
        else:
            layer, head = np.unravel_index(int(np.nanargmax(scores)), scores.shape)
            row["best_induction_attention"] = float(scores[layer, head])
            row["best_induction_head"] = f"L{layer}H{head}"
    for k, measure in enumerate(heads):
        row[f"head_attention_{k}"] = head_attention_to_token(
            pa.attention(measure.layer), pa.str_tokens, measure.head, measure.token
        )
    return row
