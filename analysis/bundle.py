"""What a report bundle holds, without the figures: its inputs, manifest and ZIP file.

A report bundle is one ZIP of an analysed prompt: figures as PNG, SVG and HTML, their data as
CSV and NPZ, one standalone ``report.html`` and a ``manifest.json`` that says what made it (model,
weights fingerprint, prompt, settings, MemLens version, UTC time) and lists every other file with
its sha256. The figures are built in :mod:`components.export`; this module gathers the numbers
they show (:func:`collect_report`) and writes the archive (:func:`zip_files`,
:func:`write_atomic`), so the app and the command line share one implementation.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tempfile
import tomllib
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from analysis.prompt import PromptAnalysis
from analysis.settings import REPO_ROOT

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
# Already compressed: deflating them again only costs time.
_STORED_SUFFIXES = (".png", ".npz")


@dataclass(frozen=True)
class ReportInputs:
    """The numbers a report bundle shows, for one prompt on one model.

    Attention is read lazily, one layer at a time, so a long prompt on a large model never holds
    every layer's patterns at once.

    Attributes:
        model_id: The model's id.
        fingerprint: Short hash of its weights.
        prompt: The prompt text.
        options: Analysis options (``top_k``, ``prepend_bos``, ``truncate``).
        str_tokens: ``[pos]`` the tokens as text.
        n_layers: Layers of the model.
        n_heads: Heads per layer.
        layers: The layers whose attention the bundle shows.
        heads: The heads shown one by one in each of ``layers``; ``None`` shows each layer as a
            grid of all its heads instead.
        attention: ``attention(layer)`` returns ``[n_heads, q_pos, k_pos]``.
        loss: ``[pos - 1]`` per-token loss in nats (entry ``i`` predicts token ``i + 1``).
        resid_norms: ``[n_layers + 1, pos]`` residual-stream L2 norm per stage, or None.
        lens_rank: ``[n_layers + 1, pos]`` logit-lens rank of each position's own token
            (0 = top prediction), or None.
    """

    model_id: str
    fingerprint: str
    prompt: str
    options: dict
    str_tokens: list[str]
    n_layers: int
    n_heads: int
    layers: tuple[int, ...]
    heads: tuple[int, ...] | None
    attention: Callable[[int], np.ndarray]
    loss: np.ndarray
    resid_norms: np.ndarray | None = None
    lens_rank: np.ndarray | None = None

    @property
    def prompts(self) -> tuple[str, ...]:
        """The prompt, as the one-item tuple a report of several prompts would have."""
        return (self.prompt,)

    def settings(self) -> dict:
        """The choices that made this report, for the manifest."""
        return {
            "layers": list(self.layers),
            "heads": None if self.heads is None else list(self.heads),
            "analysis_options": dict(self.options),
        }

    def facts(self) -> list[tuple[str, str]]:
        """``(label, value)`` rows that say what the report shows, for its HTML page."""
        heads = "all (grid)" if self.heads is None else ", ".join(map(str, self.heads))
        return [
            ("Tokens", str(len(self.str_tokens))),
            ("Layers shown", ", ".join(map(str, self.layers))),
            ("Heads shown", heads),
        ]


def _check_indices(values: Sequence[int] | None, count: int, what: str) -> tuple[int, ...] | None:
    if values is None:
        return None
    chosen = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{what} must be integers, got {value!r}")
        if not 0 <= value < count:
            raise ValueError(f"{what} {value} is out of range: this model has {what} 0-{count - 1}")
        if int(value) not in chosen:
            chosen.append(int(value))
    if not chosen:
        raise ValueError(f"choose at least one of the {what}, or leave them out for all")
    return tuple(chosen)


def parse_indices(text: str | None, count: int, what: str) -> tuple[int, ...] | None:
    """Read a selection such as ``"0,2"``, ``"1-3"`` or ``"all"`` (for command-line flags).

    Args:
        text: Comma-separated indices and inclusive ranges; ``None``, ``""`` or ``"all"`` mean
            no selection.
        count: How many there are (valid indices are ``0 .. count - 1``).
        what: What is chosen (``"layers"``, ``"heads"``), for error messages.

    Returns:
        The chosen indices in the order given, without repeats, or None for no selection.

    Raises:
        ValueError: Text that is not a selection, or an index out of range.
    """
    if text is None or text.strip().lower() in {"", "all"}:
        return None
    values = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if match is None:
            raise ValueError(
                f"cannot read {what} {text!r}: use numbers and ranges such as 0,2 or 1-3"
            )
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise ValueError(f"the range {part.strip()!r} in {what} runs backwards")
        values.extend(range(first, last + 1))
    return _check_indices(values, count, what)


def collect_report(
    pa: PromptAnalysis,
    *,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    retention: bool = True,
) -> ReportInputs:
    """Gather what a report bundle shows from a cached prompt analysis.

    Args:
        pa: The prompt's analysis.
        layers: Layers whose attention to include; all layers if None.
        heads: Heads to show one by one in each chosen layer; if None each layer is one grid of
            all its heads.
        retention: Include the residual-norm and logit-lens rank heatmaps (the logit lens loads
            the model and is computed once per analysis, then cached).

    Returns:
        The :class:`ReportInputs`.

    Raises:
        ValueError: A layer or head out of range.
    """
    chosen_layers = _check_indices(layers, pa.n_layers, "layers")
    chosen_heads = _check_indices(heads, pa.n_heads, "heads")
    resid_norms = lens_rank = None
    if retention:
        # Imported here: the rest of this module needs neither the model nor torch.
        from analysis.retention import logit_lens
        from analysis.retention import resid_norms as compute_norms

        resid_norms = compute_norms(pa)
        lens_rank = logit_lens(pa).token_rank
    return ReportInputs(
        model_id=pa.model_id,
        fingerprint=str(pa.meta.get("fingerprint", "")),
        prompt=pa.prompt,
        options=pa.options,
        str_tokens=pa.str_tokens,
        n_layers=pa.n_layers,
        n_heads=pa.n_heads,
        layers=chosen_layers or tuple(range(pa.n_layers)),
        heads=chosen_heads,
        attention=pa.attention,
        loss=pa.loss,
        resid_norms=resid_norms,
        lens_rank=lens_rank,
    )


# ---------------------------------------------------------------------------------------------
# Manifest and archive.


def app_version() -> str:
    """MemLens's version, from ``pyproject.toml`` (``"unknown"`` when it cannot be read)."""
    try:
        with (REPO_ROOT / "pyproject.toml").open("rb") as handle:
            return str(tomllib.load(handle)["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def utc_timestamp(moment: datetime | None = None) -> str:
    """``moment`` (now if None) as UTC ISO 8601 to the second, e.g. ``2025-01-31T12:00:00Z``."""
    moment = datetime.now(UTC) if moment is None else moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def make_manifest(
    files: Mapping[str, bytes],
    *,
    model_id: str,
    fingerprint: str,
    prompts: Sequence[str],
    settings: Mapping,
    created: datetime | None = None,
) -> dict:
    """The manifest of a bundle: what made it, and every file in it with its sha256.

    Args:
        files: ``{path in the archive: content}``, every file but the manifest itself.
        model_id: The model's id.
        fingerprint: Its weights fingerprint.
        prompts: The prompt(s) analysed.
        settings: The choices that made the bundle (layers, heads, formats, scale, ...).
        created: When it was made (now if None).

    Returns:
        A JSON-serialisable dict; ``files`` is sorted by path.
    """
    if MANIFEST_NAME in files:
        raise ValueError(f"{MANIFEST_NAME} is written by make_manifest; leave it out of files")
    return {
        "format": MANIFEST_FORMAT,
        "app": "memlens",
        "app_version": app_version(),
        "created_utc": utc_timestamp(created),
        "model": model_id,
        "weights_fingerprint": fingerprint,
        "prompts": list(prompts),
        "settings": dict(settings),
        "files": [
            {"path": name, "bytes": len(files[name]), "sha256": sha256_hex(files[name])}
            for name in sorted(files)
        ],
    }


def zip_files(files: Mapping[str, bytes], manifest: Mapping | None = None) -> bytes:
    """A ZIP archive of ``files``, with ``manifest`` first as ``manifest.json`` when given.

    PNG and NPZ files are stored as they are (already compressed); the rest is deflated.
    """
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        if manifest is not None:
            text = json.dumps(manifest, indent=2, ensure_ascii=False).encode()
            archive.writestr(MANIFEST_NAME, text, compress_type=zipfile.ZIP_DEFLATED)
        for name in sorted(files):
            stored = name.lower().endswith(_STORED_SUFFIXES)
            method = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
            archive.writestr(name, files[name], compress_type=method)
    return buffer.getvalue()


def write_atomic(path: Path | str, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``.

    Readers see either no file (or the previous one) or the complete new file, never part of
    it; on any error the temporary file is removed and an existing ``path`` is left as it was.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as temp:
            temp.write(data)
            temp.flush()
            os.fsync(temp.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return path


def slug(text: str, *, max_length: int = 40) -> str:
    """A file-name-safe form of ``text``: letters, digits, ``.``, ``_`` and ``-`` only."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return cleaned[-max_length:].lstrip("-.") or "x"


def bundle_filename(
    model_id: str, prompt: str | Sequence[str], created: datetime | None = None
) -> str:
    """``memlens-<model>-<prompt hash>-<UTC time>.zip``, unique per prompt(s) and second."""
    stamp = utc_timestamp(created).replace("-", "").replace(":", "")
    model = slug(Path(model_id).name if os.sep in model_id else model_id)
    text = prompt if isinstance(prompt, str) else "\n".join(prompt)
    return f"memlens-{model}-{sha256_hex(text.encode())[:8]}-{stamp}.zip"
