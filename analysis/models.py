"""Finding and loading models: the embedded demo, TransformerLens names and local checkpoints.

Every model, the embedded one included, boots through
``TransformerBridge.boot_transformers`` and then ``enable_compatibility_mode()``, so activations
are in HookedTransformer's coordinates (LayerNorm folded, writing weights centred): the logit
lens, direct logit attribution and residual norms all assume them. Attention patterns, logits up
to a constant and losses are the same as the raw Hugging Face model's.

Models load once per process, even when several threads ask at the same time; every hooked run
holds the model's lock, because hooks live on the shared module.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from analysis.settings import REPO_ROOT, get_settings

logger = logging.getLogger(__name__)

DEMO_MODEL = "memlens-demo"
DEMO_DIR = REPO_ROOT / "analysis" / "weights" / DEMO_MODEL
WEIGHT_SUFFIXES = (".safetensors", ".bin")


class ModelUnavailableError(ValueError):
    """The model is known but its weights are not on this machine."""


@dataclass(frozen=True)
class ModelSpec:
    """Where a model comes from, resolved without loading it.

    Attributes:
        model_id: The id MemLens shows and caches under: ``memlens-demo``, an official
            TransformerLens name such as ``gpt2``, or the absolute path of a checkpoint.
        source: What ``boot_transformers`` is given: a directory or a Hugging Face repo id.
        fingerprint: A short hash of the weights, so that retrained weights never reuse the
            cached analyses of the old ones.
    """

    model_id: str
    source: str
    fingerprint: str


@dataclass
class LoadedModel:
    """A booted model with what the analysis layer needs next to it."""

    spec: ModelSpec
    bridge: object
    device: str
    lock: threading.RLock = field(default_factory=threading.RLock)

    @property
    def cfg(self):
        return self.bridge.cfg

    @property
    def n_layers(self) -> int:
        return int(self.cfg.n_layers)

    @property
    def n_heads(self) -> int:
        return int(self.cfg.n_heads)

    @property
    def n_ctx(self) -> int:
        return int(self.cfg.n_ctx)

    @property
    def tokenizer(self):
        return self.bridge.tokenizer


def _one_thread_after_fork() -> None:
    """Background jobs run in forked copies of the server; a fork inherits torch's thread-pool
    state without its threads, and its first parallel matmul waits for ever. One thread in
    the child avoids the pool."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


os.register_at_fork(after_in_child=_one_thread_after_fork)

_loaded: dict[tuple[str, str, str], LoadedModel] = {}
_load_locks: dict[tuple[str, str, str], threading.Lock] = {}
_registry_lock = threading.Lock()
_fingerprints: dict[tuple, str] = {}


def _hash_weight_files(directory: Path) -> str:
    """sha256 over the weight files of a checkpoint directory, memoised by size and mtime."""
    files = sorted(p for p in directory.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        raise ValueError(
            f"{directory} holds no weights (*.safetensors or *.bin); "
            "save the model with save_pretrained() first"
        )
    stats = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    memo_key = (str(directory), stats)
    if memo_key not in _fingerprints:
        digest = hashlib.sha256()
        for path in files:
            digest.update(path.name.encode())
            with path.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
        _fingerprints[memo_key] = digest.hexdigest()[:16]
    return _fingerprints[memo_key]


def _allowed_dirs() -> tuple[Path, ...]:
    return (DEMO_DIR.parent.resolve(), *get_settings().model_dirs)


def _resolve_path(text: str, *, allow_any_path: bool) -> ModelSpec:
    path = Path(text).expanduser().resolve()
    if not allow_any_path and not any(path.is_relative_to(root) for root in _allowed_dirs()):
        raise ValueError(
            f"{text!r} is not inside an allowed model directory; add its parent to "
            "MEMLENS_MODEL_DIRS to load checkpoints from there"
        )
    if not (path / "config.json").is_file():
        raise ValueError(
            f"{text!r} is not a Hugging Face checkpoint directory (no config.json there)"
        )
    return ModelSpec(model_id=str(path), source=str(path), fingerprint=_hash_weight_files(path))


def _official_name(name: str) -> str:
    from transformer_lens.supported_models import OFFICIAL_MODEL_NAMES, get_official_model_name

    try:
        return get_official_model_name(name)
    except ValueError:
        close = difflib.get_close_matches(name, [DEMO_MODEL, *OFFICIAL_MODEL_NAMES], n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(
            f"unknown model {name!r}: use {DEMO_MODEL!r}, a TransformerLens model name "
            f"(gpt2, pythia-70m, ...) or a checkpoint directory.{hint}"
        ) from None


def _hub_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot directory of a Hugging Face repo, or None when it is not cached."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json")
    return Path(config).parent if isinstance(config, str) else None


def resolve_model(name_or_path: str, *, allow_any_path: bool = False) -> ModelSpec:
    """Find a model without loading it.

    Args:
        name_or_path: ``memlens-demo``, a TransformerLens model name or alias, or a directory
            holding a Hugging Face GPT-2-family checkpoint.
        allow_any_path: Accept a directory anywhere. Off by default, so a name that arrives from
            the UI or a URL can only reach the embedded model and ``MEMLENS_MODEL_DIRS``.

    Returns:
        The model's :class:`ModelSpec`.

    Raises:
        ValueError: The name is unknown or the path is not an allowed checkpoint directory.
        ModelUnavailableError: The model is known, but its weights are not cached here.
    """
    if name_or_path is not None and not isinstance(name_or_path, str):
        raise ValueError(
            f"choose a model: a model is a name or a path, got {type(name_or_path).__name__}"
        )
    if not name_or_path or not name_or_path.strip():
        raise ValueError("choose a model: the model name is empty")
    name = name_or_path.strip()
    if "\x00" in name:
        raise ValueError("the model name contains a NUL character")

    if name == DEMO_MODEL:
        return ModelSpec(DEMO_MODEL, str(DEMO_DIR), _hash_weight_files(DEMO_DIR))
    # Hub ids ("EleutherAI/pythia-70m") contain a slash too; paths are the ones that look like it.
    if name.startswith(("/", "./", "../", "~")) or Path(name).is_dir():
        return _resolve_path(name, allow_any_path=allow_any_path)

    repo_id = _official_name(name)
    snapshot = _hub_snapshot(repo_id)
    if snapshot is None:
        raise ModelUnavailableError(
            f"the weights of {repo_id!r} are not in the Hugging Face cache and MemLens never "
            f"downloads. On a machine with internet run `hf download {repo_id}` and copy "
            "~/.cache/huggingface/hub here (or set HF_HOME), or save the model with "
            "save_pretrained() into a directory listed in MEMLENS_MODEL_DIRS."
        )
    # Hub blobs are named by the hash of their content, so the snapshot's links fingerprint it.
    blobs = sorted(
        os.path.basename(os.path.realpath(p))
        for p in snapshot.iterdir()
        if p.name.endswith(WEIGHT_SUFFIXES)
    )
    fingerprint = hashlib.sha256("".join(blobs).encode()).hexdigest()[:16]
    return ModelSpec(model_id=name, source=repo_id, fingerprint=fingerprint)


def pick_device(requested: str | None = None) -> str:
    """``cuda`` when it is asked for (or ``auto``) and present, ``cpu`` otherwise."""
    import torch

    requested = (requested or get_settings().device).lower()
    if requested not in {"auto", "cpu", "cuda"}:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {requested!r}")
    if requested in {"auto", "cuda"} and torch.cuda.is_available():
        return "cuda"
    if requested == "cuda":
        logger.warning("CUDA was requested but is not available; using the CPU")
    return "cpu"


def _boot(spec: ModelSpec, device: str):
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(spec.source, device=device)
    bridge.enable_compatibility_mode(disable_warnings=True)
    bridge.eval()
    return bridge


def load_model(
    name_or_path: str | None = None, *, device: str | None = None, allow_any_path: bool = False
) -> LoadedModel:
    """Load a model once per process and return it.

    Args:
        name_or_path: See :func:`resolve_model`; ``None`` means ``MEMLENS_DEFAULT_MODEL``.
        device: ``auto``, ``cpu`` or ``cuda``; ``None`` means ``MEMLENS_DEVICE``.
        allow_any_path: See :func:`resolve_model`.

    Returns:
        The :class:`LoadedModel`, shared by every caller in this process.
    """
    spec = resolve_model(
        name_or_path or get_settings().default_model, allow_any_path=allow_any_path
    )
    device = pick_device(device)
    key = (spec.model_id, spec.fingerprint, device)

    with _registry_lock:
        if key in _loaded:
            return _loaded[key]
        load_lock = _load_locks.setdefault(key, threading.Lock())

    with load_lock:
        if key in _loaded:  # another thread loaded it while we waited
            return _loaded[key]
        started = time.perf_counter()
        try:
            bridge = _boot(spec, device)
        except OSError as exc:
            raise ModelUnavailableError(f"could not load {spec.model_id!r}: {exc}") from None
        loaded = LoadedModel(spec=spec, bridge=bridge, device=device)
        with _registry_lock:
            _loaded[key] = loaded
        logger.info(
            "loaded %s (%s) on %s in %.1fs",
            spec.model_id,
            spec.fingerprint,
            device,
            time.perf_counter() - started,
        )
        return loaded


def available_models() -> list[str]:
    """Models that load here without a download: the demo, cached hub models, local dirs."""
    from transformer_lens.supported_models import OFFICIAL_MODEL_NAMES

    names = [DEMO_MODEL]
    try:
        from huggingface_hub import scan_cache_dir

        cached = {repo.repo_id for repo in scan_cache_dir().repos if repo.repo_type == "model"}
    except Exception:  # no cache directory yet, or one we cannot read
        cached = set()
    names += sorted(name for name in OFFICIAL_MODEL_NAMES if name in cached)
    for root in get_settings().model_dirs:
        if root.is_dir():
            names += sorted(str(p) for p in root.iterdir() if (p / "config.json").is_file())
    return names


def usable_model(model: str, default: str, messages: list[str]) -> str:
    """``model`` when it resolves, else ``default`` with a message appended (for links)."""
    if model == default:
        return model
    try:
        resolve_model(model)
    except ValueError as exc:
        messages.append(f"{str(exc).rstrip('.')}. Showing {default} instead.")
        return default
    return model
