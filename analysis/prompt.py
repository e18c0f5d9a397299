"""One forward pass per prompt, kept in the disk cache and read back lazily, layer by layer.

:func:`analyze` runs the model once with a ``names_filter`` that keeps only what the views need
(attention patterns and the residual stream), stores each layer as its own cache entry and
returns a :class:`PromptAnalysis` that reads them on demand. A second call with the same model
weights, prompt and options does no forward pass at all, in this process or any other.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import unicodedata
from dataclasses import dataclass

import numpy as np

from analysis.models import LoadedModel, load_model, resolve_model
from analysis.settings import get_settings
from analysis.store import (
    ArrayStore,
    CorruptEntryError,
    default_store,
    dequantize_attention,
    key_lock,
    quantize_attention,
)

logger = logging.getLogger(__name__)

# Bump when what is stored, or how, changes: old entries then simply stop matching.
FORMAT_VERSION = 1
DEFAULT_TOP_K = 10
_ALLOWED_CONTROL = {"\n", "\t", "\r"}


def validate_prompt(prompt: object, *, max_chars: int | None = None) -> str:
    """Return ``prompt`` if the model can take it; raise ``ValueError`` saying why not."""
    if not isinstance(prompt, str):
        raise ValueError(f"the prompt must be text, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError("the prompt is empty: type some text to analyse")
    max_chars = get_settings().max_prompt_chars if max_chars is None else max_chars
    if len(prompt) > max_chars:
        raise ValueError(
            f"the prompt is {len(prompt):,} characters; the limit is {max_chars:,} "
            "(MEMLENS_MAX_PROMPT_CHARS)"
        )
    for index, char in enumerate(prompt):
        category = unicodedata.category(char)
        if char not in _ALLOWED_CONTROL and category == "Cc":
            raise ValueError(
                f"the prompt contains the control character U+{ord(char):04X} at position "
                f"{index}; remove it (tabs and newlines are fine)"
            )
        if category == "Cs":  # half of a UTF-16 pair: no UTF-8 text, so no tokenizer, takes it
            raise ValueError(
                f"the prompt contains a lone surrogate U+{ord(char):04X} at position {index}, "
                "which is not text (a character cut in half); paste the text again"
            )
    return prompt


def _analysis_key(model_id: str, fingerprint: str, prompt: str, options: dict) -> str:
    payload = json.dumps(
        [FORMAT_VERSION, model_id, fingerprint, prompt, options], sort_keys=True
    ).encode()
    return hashlib.sha256(payload).hexdigest()


@dataclass(frozen=True)
class PromptAnalysis:
    """The cached activations of one prompt on one model, read lazily.

    Attention comes back within 1e-3 of the model's float32 values (fixed-point storage), the
    residual stream as float16 values widened to float32. Positions include the BOS token when
    one was prepended; ``str_tokens[0]`` is then ``<|endoftext|>`` for GPT-2 models.
    """

    key: str
    meta: dict
    store: ArrayStore

    @property
    def model_id(self) -> str:
        return self.meta["model_id"]

    @property
    def prompt(self) -> str:
        return self.meta["prompt"]

    @property
    def str_tokens(self) -> list[str]:
        return list(self.meta["str_tokens"])

    @property
    def tokens(self) -> np.ndarray:
        """Token ids, ``[pos]``."""
        return np.asarray(self.meta["tokens"], dtype=np.int64)

    @property
    def n_pos(self) -> int:
        return len(self.meta["tokens"])

    @property
    def n_layers(self) -> int:
        return int(self.meta["n_layers"])

    @property
    def n_heads(self) -> int:
        return int(self.meta["n_heads"])

    @property
    def d_model(self) -> int:
        return int(self.meta["d_model"])

    @property
    def options(self) -> dict:
        return dict(self.meta["options"])

    def attention(self, layer: int) -> np.ndarray:
        """Attention patterns of one layer, ``[n_heads, q_pos, k_pos]`` float32; rows sum to 1."""
        self._check_layer(layer, self.n_layers - 1)
        return dequantize_attention(self._read(f"attn.{layer}"))

    def resid(self, layer: int) -> np.ndarray:
        """``resid_pre`` of ``layer``, ``[pos, d_model]``; ``layer == n_layers`` is the final
        ``resid_post`` (before ``ln_final``)."""
        self._check_layer(layer, self.n_layers)
        return self._read(f"resid.{layer}").astype(np.float32)

    @property
    def loss(self) -> np.ndarray:
        """Per-token cross-entropy, ``[pos - 1]``: entry i is the loss of predicting token i+1."""
        return self._read("loss").astype(np.float32)

    def top_k(self) -> tuple[np.ndarray, np.ndarray]:
        """Top next-token predictions: ids ``[pos, k]`` and probabilities ``[pos, k]``."""
        return self._read("topk_ids").astype(np.int64), self._read("topk_probs").astype(np.float32)

    def top_k_str(self) -> list[list[str]]:
        """The top-k prediction ids of :meth:`top_k` as strings, ``[pos][k]``."""
        return [list(row) for row in self.meta["topk_str"]]

    def _check_layer(self, layer: int, highest: int) -> None:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
            raise ValueError(f"layer must be an integer, got {layer!r}")
        if not 0 <= layer <= highest:
            raise ValueError(f"layer {layer} is out of range: this model has layers 0-{highest}")

    def _read(self, name: str) -> np.ndarray:
        try:
            array = self.store.get_array(f"{self.key}/{name}")
        except CorruptEntryError as exc:
            logger.warning("cache entry %s/%s is corrupt (%s); recomputing", self.key, name, exc)
            array = None
        if array is None:
            # Evicted or corrupt: redo the whole analysis once, then read again.
            self.store.evict(self.key)
            _compute(
                load_model(self.model_id, allow_any_path=True),
                self.prompt,
                self.options,
                self.key,
                self.store,
            )
            array = self.store.get_array(f"{self.key}/{name}")
            if array is None:
                raise ValueError(
                    f"the disk cache dropped {name!r} of this analysis right after writing it: "
                    "it is too small for one analysis of this prompt. Raise "
                    "MEMLENS_CACHE_SIZE_GB, or analyse a shorter prompt"
                )
        return array


def analyze(
    prompt: str,
    model: str | None = None,
    *,
    top_k: int = DEFAULT_TOP_K,
    prepend_bos: bool = True,
    truncate: bool = False,
    allow_any_path: bool = False,
    store: ArrayStore | None = None,
) -> PromptAnalysis:
    """Analyse ``prompt`` on ``model``, from the cache when it was analysed before.

    Uses the compatibility-mode bridge (see :mod:`analysis.models`): HookedTransformer numerics.

    Args:
        prompt: The text. Tabs and newlines are fine; other control characters are not.
        model: Model name or checkpoint path (see :func:`analysis.models.resolve_model`);
            ``None`` means ``MEMLENS_DEFAULT_MODEL``.
        top_k: How many next-token predictions to keep per position.
        prepend_bos: Prepend the BOS token, as TransformerLens does by default.
        truncate: Keep the last tokens that fit instead of refusing a prompt that is too long.
        allow_any_path: Load a checkpoint from any directory (not just the allowed ones).
        store: The cache; the process's default store on ``MEMLENS_CACHE_DIR`` if None.

    Returns:
        The :class:`PromptAnalysis`.

    Raises:
        ValueError: Bad prompt, unknown model, or a prompt longer than the model accepts.
    """
    # Validate before touching the model or the cache, so bad input writes nothing.
    validate_prompt(prompt)
    if not isinstance(top_k, int) or not 1 <= top_k <= 100:
        raise ValueError(f"top_k must be an integer from 1 to 100, got {top_k!r}")
    spec = resolve_model(model or get_settings().default_model, allow_any_path=allow_any_path)
    store = default_store() if store is None else store
    options = {"top_k": top_k, "prepend_bos": bool(prepend_bos), "truncate": bool(truncate)}
    key = _analysis_key(spec.model_id, spec.fingerprint, prompt, options)

    # Warm path: the metadata entry is written last, so its presence means a complete analysis.
    meta = _read_meta(store, key)
    if meta is not None:
        logger.info("cache hit %s for %s", key[:12], spec.model_id)
        return PromptAnalysis(key=key, meta=meta, store=store)

    with key_lock(key):
        meta = _read_meta(store, key)
        if meta is None:
            loaded = load_model(spec.model_id, allow_any_path=True)
            meta = _compute(loaded, prompt, options, key, store)
    return PromptAnalysis(key=key, meta=meta, store=store)


def tokenize(loaded: LoadedModel, prompt: str, *, prepend_bos: bool, truncate: bool):
    """Token ids ``[1, pos]`` for ``prompt``; ValueError when it is too long and not truncated.

    Returns:
        ``(tokens, original_length)``, the latter before any truncation.
    """
    tokens = loaded.bridge.to_tokens(prompt, prepend_bos=prepend_bos, truncate=False)
    limit = min(loaded.n_ctx, get_settings().max_tokens)
    length = int(tokens.shape[1])
    if length > limit:
        if not truncate:
            raise ValueError(
                f"the prompt is {length:,} tokens; {loaded.spec.model_id} takes at most "
                f"{limit:,}. Shorten it, or ask for truncation to keep the last {limit:,}."
            )
        keep = tokens[:, -limit:].clone()
        if prepend_bos:
            keep[0, 0] = tokens[0, 0]
        tokens = keep
    return tokens, length


def _compute(loaded: LoadedModel, prompt: str, options: dict, key: str, store: ArrayStore) -> dict:
    """Run the forward pass, write every entry, then the metadata; return the metadata."""
    import torch

    started = time.perf_counter()
    tokens, original_length = tokenize(
        loaded, prompt, prepend_bos=options["prepend_bos"], truncate=options["truncate"]
    )
    wanted = {f"blocks.{layer}.attn.hook_pattern" for layer in range(loaded.n_layers)}
    wanted |= {f"blocks.{layer}.hook_resid_pre" for layer in range(loaded.n_layers)}
    final = f"blocks.{loaded.n_layers - 1}.hook_resid_post"
    wanted.add(final)

    with loaded.lock, torch.inference_mode():
        logits, cache = loaded.bridge.run_with_cache(
            tokens.to(loaded.device), names_filter=lambda name: name in wanted
        )
    forward_s = time.perf_counter() - started

    # Per-token loss and top-k predictions come from the logits, which are not kept.
    logprobs = logits[0].float().log_softmax(-1)
    targets = tokens[0, 1:].to(logprobs.device)
    loss = -logprobs[:-1].gather(-1, targets[:, None])[:, 0]
    top_probs, top_ids = logprobs.exp().topk(options["top_k"], dim=-1)

    for layer in range(loaded.n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0].float().cpu().numpy()
        store.put_array(f"{key}/attn.{layer}", quantize_attention(pattern), tag=key, compress=True)
        resid = cache[f"blocks.{layer}.hook_resid_pre"][0].cpu().numpy().astype(np.float16)
        store.put_array(f"{key}/resid.{layer}", resid, tag=key)
    final_resid = cache[final][0].cpu().numpy().astype(np.float16)
    store.put_array(f"{key}/resid.{loaded.n_layers}", final_resid, tag=key)
    store.put_array(f"{key}/loss", loss.cpu().numpy().astype(np.float32), tag=key)
    store.put_array(f"{key}/topk_ids", top_ids.cpu().numpy().astype(np.int32), tag=key)
    store.put_array(f"{key}/topk_probs", top_probs.cpu().numpy().astype(np.float16), tag=key)

    token_list = tokens[0].tolist()
    tokenizer = loaded.tokenizer
    meta = {
        "format": FORMAT_VERSION,
        "model_id": loaded.spec.model_id,
        "fingerprint": loaded.spec.fingerprint,
        "prompt": prompt,
        "options": options,
        "tokens": token_list,
        "str_tokens": [tokenizer.decode([t]) for t in token_list],
        "topk_str": [[tokenizer.decode([t]) for t in row] for row in top_ids.cpu().tolist()],
        "original_length": original_length,
        "n_layers": loaded.n_layers,
        "n_heads": loaded.n_heads,
        "d_model": int(loaded.cfg.d_model),
        "n_ctx": loaded.n_ctx,
    }
    store.put_json(f"{key}/meta", meta, tag=key)
    logger.info(
        "analysed %d tokens on %s: forward %.2fs, total %.2fs",
        len(token_list),
        loaded.spec.model_id,
        forward_s,
        time.perf_counter() - started,
    )
    return meta


def _read_meta(store: ArrayStore, key: str) -> dict | None:
    try:
        meta = store.get_json(f"{key}/meta")
    except CorruptEntryError as exc:
        logger.warning("analysis %s has corrupt metadata (%s); recomputing", key[:12], exc)
        store.evict(key)
        return None
    if meta is not None and meta.get("format") != FORMAT_VERSION:
        return None
    return meta
