"""How much of each input token survives, layer by layer: the Retention view's metrics.

Every metric reads a cached :class:`~analysis.prompt.PromptAnalysis`. Where model weights are
needed (``W_E``, ``W_U``, the final LayerNorm) the model is loaded with
:func:`analysis.load_model`; expensive results are written back to the analysis's own store under
``{pa.key}/<name>``, so selecting another token or position never recomputes them.

Layer indices follow :meth:`PromptAnalysis.resid`: a *stage* ``l`` in ``0 .. n_layers`` is
``resid_pre`` of block ``l``, and stage ``n_layers`` is the final ``resid_post`` (before
``ln_final``). So every per-layer array here has ``n_layers + 1`` rows.

The model runs in TransformerLens's compatibility mode (see :mod:`analysis.models`): LayerNorm
weights are folded into the next linear map and every component that writes to the residual
stream is centred, so ``ln_final`` only centres and rescales, and ``W_U``/``b_U`` carry its
weight and bias. The functions below fold any ``ln_final`` weight and bias that is left into
``W_U``/``b_U`` all the same, so they stay exact on a model where that is not the case.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import numpy as np

from analysis.models import LoadedModel, load_model
from analysis.prompt import PromptAnalysis
from analysis.store import ArrayStore, CorruptEntryError, key_lock

logger = logging.getLogger(__name__)

DEFAULT_LENS_TOP_K = 5
# The identity share of attention rollout (Abnar & Zuidema 2020 use 0.5 · A + 0.5 · I).
DEFAULT_RESIDUAL_WEIGHT = 0.5
# Logits are computed for at most this many (position, vocabulary) entries at a time.
_LOGIT_CHUNK_ELEMENTS = 1 << 22


# ---------------------------------------------------------------------------------------------
# Caching and model access shared by the Retention, Heads and Horizon metrics.


def cached_arrays(
    store: ArrayStore,
    prefix: str,
    names: Sequence[str],
    compute: Callable[[], dict[str, np.ndarray]],
    *,
    tag: str,
    compress: bool = False,
) -> dict[str, np.ndarray]:
    """Read the arrays ``{prefix}.{name}`` from ``store``, or compute and write them all.

    A missing or corrupt entry (evicted, half written by a killed worker) makes the whole group
    recompute, so a caller never mixes arrays from two runs. A miss holds the prefix's
    :func:`~analysis.store.key_lock` while it computes, so two threads asking for the same group
    compute it once; ``compute`` may raise (a cancelled job), which writes nothing.

    Args:
        store: The analysis cache.
        prefix: Key prefix built from primitives, e.g. ``f"{pa.key}/lens.k5"``.
        names: The arrays in the group.
        compute: Returns ``{name: array}`` for every name; called only on a miss.
        tag: Eviction tag (the analysis key, so evicting an analysis drops these too).
        compress: zlib-compress the arrays (worth it for triangular or sparse ones).

    Returns:
        ``{name: array}``.
    """
    arrays = _read_group(store, prefix, names)
    if arrays is None:
        with key_lock(prefix):
            # Another thread may have written the group while this one waited for the lock.
            arrays = _read_group(store, prefix, names)
            if arrays is None:
                return _compute_group(store, prefix, names, compute, tag, compress)
    logger.info("cache hit %s", prefix[-40:])
    return arrays


def _read_group(store: ArrayStore, prefix: str, names: Sequence[str]) -> dict | None:
    """Every array of the group, or None when one is missing or corrupt."""
    arrays = {}
    try:
        for name in names:
            array = store.get_array(f"{prefix}.{name}")
            if array is None:
                return None
            arrays[name] = array
    except CorruptEntryError as exc:
        logger.warning("cache entry under %s is corrupt (%s); recomputing", prefix, exc)
        return None
    return arrays


def _compute_group(store, prefix, names, compute, tag, compress) -> dict[str, np.ndarray]:
    """Run ``compute`` and write every array it returns under ``prefix``."""
    started = time.perf_counter()
    arrays = compute()
    missing = set(names) - set(arrays)
    if missing:
        raise RuntimeError(f"computing {prefix} did not produce {sorted(missing)}")
    for name in names:
        store.put_array(f"{prefix}.{name}", arrays[name], tag=tag, compress=compress)
    logger.info("computed %s in %.2fs", prefix[-40:], time.perf_counter() - started)
    return {name: arrays[name] for name in names}


def model_for(pa: PromptAnalysis) -> LoadedModel:
    """The model ``pa`` was computed on; ValueError when its weights have changed since."""
    loaded = load_model(pa.model_id, allow_any_path=True)
    fingerprint = pa.meta.get("fingerprint")
    if fingerprint is not None and loaded.spec.fingerprint != fingerprint:
        raise ValueError(
            f"the weights of {pa.model_id!r} changed after this prompt was analysed "
            f"({fingerprint} then, {loaded.spec.fingerprint} now); analyse the prompt again"
        )
    return loaded


def unembedding(loaded: LoadedModel, columns: Sequence[int] | None = None):
    """``(W_U, b_U, eps)`` with ``ln_final``'s weight and bias folded in.

    Args:
        loaded: The model.
        columns: Only these token ids (cheaper than copying a large vocabulary); all if None.

    Returns:
        ``W_U`` ``[d_model, d_vocab]`` and ``b_U`` ``[d_vocab]`` as float32 tensors on the CPU
        (``d_vocab`` is ``len(columns)`` when given), and the LayerNorm epsilon, such that
        ``logits = apply_ln_final(resid, eps) @ W_U + b_U``.
    """
    import torch

    bridge = loaded.bridge
    with torch.no_grad():
        W_U = bridge.W_U.detach()
        b_U = bridge.b_U.detach()
        if columns is not None:
            index = torch.as_tensor(list(columns), dtype=torch.long, device=W_U.device)
            W_U, b_U = W_U[:, index], b_U[index]
        W_U, b_U = W_U.float().cpu(), b_U.float().cpu()
        ln = bridge.ln_final
        w = getattr(ln, "w", None)
        b = getattr(ln, "b", None)
        # y = w * normalized + b, so y @ W_U + b_U = normalized @ (w * W_U) + (b @ W_U + b_U).
        if b is not None:
            b_U = b_U + b.detach().float().cpu() @ W_U
        if w is not None:
            W_U = w.detach().float().cpu()[:, None] * W_U
    return W_U, b_U, float(loaded.cfg.eps)


def resid_stack(pa: PromptAnalysis) -> np.ndarray:
    """The residual stream at every stage, ``[n_layers + 1, pos, d_model]`` float32."""
    return np.stack([pa.resid(layer) for layer in range(pa.n_layers + 1)])


# ---------------------------------------------------------------------------------------------
# 1. The residual stream: size and identity.


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity along the last axis, 0 where either vector is zero.

    Args:
        a: ``[..., d]``.
        b: ``[..., d]`` (broadcast against ``a``).

    Returns:
        ``[...]``.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    norms = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    dots = (a * b).sum(-1)
    return np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0).astype(np.float32)


def resid_norms(pa: PromptAnalysis) -> np.ndarray:
    """L2 norm of the residual stream at every stage and position.

    Args:
        pa: The prompt's analysis.

    Returns:
        ``[n_layers + 1, pos]`` float32; row ``l`` is ``||resid_pre[l]||`` (row ``n_layers``
        is the final ``resid_post``).
    """
    return np.linalg.norm(resid_stack(pa), axis=-1).astype(np.float32)


def embedding_cosine(pa: PromptAnalysis, *, include_pos: bool = False) -> np.ndarray:
    """How much of each token's identity survives: cosine of the residual stream to its embedding.

    The token's identity is its row of the embedding matrix, ``W_E[token]``. By default the
    positional embedding is left out: ``W_pos[pos]`` is the same for every token at that
    position, so it says where a token is, not which token it is; stage 0 is then below 1 by
    exactly the positional share. With ``include_pos=True`` the reference is what block 0
    receives, ``W_E[token] + W_pos[pos]``, and stage 0 is 1 by construction — useful as a
    baseline for how fast the whole input is overwritten. Both are compatibility-mode (centred)
    weights, the coordinates the residual stream is cached in.

    Args:
        pa: The prompt's analysis.
        include_pos: Compare with ``W_E[token] + W_pos[pos]`` instead of ``W_E[token]``.

    Returns:
        ``[n_layers + 1, pos]`` float32 cosine similarities in [-1, 1].
    """
    name = "embed_cos_pos" if include_pos else "embed_cos"

    def compute() -> dict[str, np.ndarray]:
        loaded = model_for(pa)
        W_E = loaded.bridge.W_E.detach().float().cpu().numpy()
        reference = W_E[pa.tokens]
        if include_pos:
            reference = reference + loaded.bridge.W_pos.detach().float().cpu().numpy()[: pa.n_pos]
        return {"cos": cosine_similarity(resid_stack(pa), reference[None])}

    return cached_arrays(pa.store, f"{pa.key}/{name}", ["cos"], compute, tag=pa.key)["cos"]


# ---------------------------------------------------------------------------------------------
# 2. The logit lens.


def apply_ln_final(resid, eps: float):
    """Final LayerNorm without weights, with the scale recomputed from ``resid`` itself.

    This is what ``ActivationCache.apply_ln_to_stack(..., recompute_ln=True)`` does for the
    logit lens: each intermediate residual stream is normalised by its own statistics, not by
    the final one's. In compatibility mode ``ln_final``'s weight and bias live in ``W_U`` and
    ``b_U`` (see :func:`unembedding`).

    Args:
        resid: ``[..., d_model]`` tensor.
        eps: The LayerNorm epsilon (``cfg.eps``).

    Returns:
        ``[..., d_model]``: ``(x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps)``.
    """
    centred = resid - resid.mean(-1, keepdim=True)
    scale = (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    return centred / scale


@dataclass(frozen=True)
class LogitLens:
    """The logit lens over every stage and position of one prompt (nostalgebraist 2020).

    Ranks are zero-based over the whole vocabulary (0 is the top prediction), as in
    TransformerLens's ``logit_lens``: the number of tokens with a strictly larger logit.

    Attributes:
        token_rank: ``[n_layers + 1, pos]`` int64, rank of the position's own token.
        token_prob: ``[n_layers + 1, pos]`` float32, its probability.
        next_rank: ``[n_layers + 1, pos - 1]`` int64, rank of the next token (entry ``i`` is
            position ``i`` predicting token ``i + 1``, aligned with ``PromptAnalysis.loss``).
        next_prob: ``[n_layers + 1, pos - 1]`` float32, its probability.
        top_ids: ``[n_layers + 1, pos, k]`` int64, the k most probable tokens.
        top_probs: ``[n_layers + 1, pos, k]`` float32, their probabilities (descending).
        kl_to_final: ``[n_layers + 1, pos]`` float32, ``KL(p_final || p_stage)`` in nats; the
            last row is 0.
    """

    token_rank: np.ndarray
    token_prob: np.ndarray
    next_rank: np.ndarray
    next_prob: np.ndarray
    top_ids: np.ndarray
    top_probs: np.ndarray
    kl_to_final: np.ndarray

    @property
    def mean_kl_to_final(self) -> np.ndarray:
        """``[n_layers + 1]``: :attr:`kl_to_final` averaged over positions."""
        return self.kl_to_final.mean(-1)


_LENS_FIELDS = [f.name for f in fields(LogitLens)]


def logit_lens_from_resid(
    resid,
    tokens,
    W_U,
    b_U,
    *,
    eps: float,
    top_k: int = DEFAULT_LENS_TOP_K,
) -> LogitLens:
    """Read every stage of the residual stream through ``ln_final`` and the unembedding.

    The logit lens (nostalgebraist 2020, "interpreting GPT: the logit lens"): the residual
    stream at stage ``l`` is decoded as if it were the last one, ``logits_l =
    apply_ln_final(resid_l) @ W_U + b_U``. The last stage reproduces the model's logits. KL is
    measured from the final distribution, ``KL(p_final || p_l)``, as in the tuned-lens paper
    (Belrose et al. 2023).

    Args:
        resid: ``[n_stages, pos, d_model]`` tensor, the last stage being the final
            ``resid_post``.
        tokens: ``[pos]`` token ids.
        W_U: ``[d_model, d_vocab]`` with ``ln_final``'s weight folded in.
        b_U: ``[d_vocab]`` with ``ln_final``'s bias folded in.
        eps: The LayerNorm epsilon.
        top_k: How many top tokens to keep per stage and position.

    Returns:
        A :class:`LogitLens` (arrays shaped with ``n_stages`` rows).
    """
    import torch

    resid = torch.as_tensor(resid)
    n_stages, n_pos, _ = resid.shape
    d_vocab = W_U.shape[-1]
    if not 1 <= top_k <= d_vocab:
        raise ValueError(f"top_k must be from 1 to the vocabulary size {d_vocab}, got {top_k}")
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    out = {
        "token_rank": torch.zeros(n_stages, n_pos, dtype=torch.long),
        "token_prob": torch.zeros(n_stages, n_pos),
        "next_rank": torch.zeros(n_stages, max(n_pos - 1, 0), dtype=torch.long),
        "next_prob": torch.zeros(n_stages, max(n_pos - 1, 0)),
        "top_ids": torch.zeros(n_stages, n_pos, top_k, dtype=torch.long),
        "top_probs": torch.zeros(n_stages, n_pos, top_k),
        "kl_to_final": torch.zeros(n_stages, n_pos),
    }

    # Positions in chunks, so that [chunk, d_vocab] logits stay small for large vocabularies;
    # within a chunk the final stage first, since every other stage's KL needs it.
    chunk = max(1, _LOGIT_CHUNK_ELEMENTS // d_vocab)
    with torch.no_grad():
        for start in range(0, n_pos, chunk):
            span = slice(start, min(start + chunk, n_pos))
            own = tokens[span]
            next_span = slice(start, min(start + chunk, n_pos - 1))
            following = tokens[start + 1 : next_span.stop + 1]
            n_next = len(following)
            final_logprobs = None
            for stage in reversed(range(n_stages)):
                x = apply_ln_final(resid[stage, span].float(), eps)
                logits = x @ W_U + b_U
                logprobs = logits.log_softmax(-1)
                if final_logprobs is None:
                    final_logprobs = logprobs

                own_logit = logits.gather(-1, own[:, None])
                out["token_rank"][stage, span] = (logits > own_logit).sum(-1)
                out["token_prob"][stage, span] = logprobs.gather(-1, own[:, None])[:, 0].exp()
                if n_next:
                    next_logit = logits[:n_next].gather(-1, following[:, None])
                    out["next_rank"][stage, next_span] = (logits[:n_next] > next_logit).sum(-1)
                    picked = logprobs[:n_next].gather(-1, following[:, None])[:, 0]
                    out["next_prob"][stage, next_span] = picked.exp()
                top_logprobs, top_ids = logprobs.topk(top_k, dim=-1)
                out["top_ids"][stage, span] = top_ids
                out["top_probs"][stage, span] = top_logprobs.exp()
                kl = (final_logprobs.exp() * (final_logprobs - logprobs)).sum(-1)
                out["kl_to_final"][stage, span] = kl.clamp_min(0.0)

    return LogitLens(**{name: value.numpy() for name, value in out.items()})


def logit_lens(pa: PromptAnalysis, *, top_k: int = DEFAULT_LENS_TOP_K) -> LogitLens:
    """The logit lens of a cached prompt analysis, computed once and then read from the cache.

    See :func:`logit_lens_from_resid` for the definition. The residual stream comes from the
    cache, stored as float16, so probabilities are within about 1e-3 of a float32 forward pass.

    Args:
        pa: The prompt's analysis.
        top_k: How many top tokens to keep per stage and position.

    Returns:
        A :class:`LogitLens` with ``n_layers + 1`` stages.
    """
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= 100:
        raise ValueError(f"top_k must be an integer from 1 to 100, got {top_k!r}")

    def compute() -> dict[str, np.ndarray]:
        import torch

        W_U, b_U, eps = unembedding(model_for(pa))
        lens = logit_lens_from_resid(
            torch.from_numpy(resid_stack(pa)), pa.tokens, W_U, b_U, eps=eps, top_k=top_k
        )
        return {name: getattr(lens, name) for name in _LENS_FIELDS}

    arrays = cached_arrays(pa.store, f"{pa.key}/lens.k{top_k}", _LENS_FIELDS, compute, tag=pa.key)
    return LogitLens(**arrays)


def logit_lens_top_k_str(pa: PromptAnalysis, lens: LogitLens) -> list[list[list[str]]]:
    """The top-k ids of ``lens`` decoded to strings, ``[n_layers + 1][pos][k]``."""
    tokenizer = load_model(pa.model_id, allow_any_path=True).tokenizer
    vocab = {int(t): tokenizer.decode([int(t)]) for t in np.unique(lens.top_ids)}
    return [[[vocab[int(t)] for t in row] for row in stage] for stage in lens.top_ids]


# ---------------------------------------------------------------------------------------------
# 3. Attention rollout.


def attention_rollout(
    patterns: np.ndarray, *, residual_weight: float = DEFAULT_RESIDUAL_WEIGHT
) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema 2020, "Quantifying attention flow in transformers").

    Each layer's heads are averaged, the residual connection is modelled as attention to
    oneself, ``Â_l = (1 - w) · mean_h A_l + w · I`` with rows renormalised, and the layers are
    multiplied through: ``R_0 = I``, ``R_{l+1} = Â_l @ R_l``. Row ``q`` of ``R_l`` is how the
    stream at position ``q`` entering block ``l`` is made of the input tokens.

    Args:
        patterns: ``[n_layers, n_heads, q_pos, k_pos]`` attention weights (rows sum to 1).
        residual_weight: ``w``, the identity's share (0.5 in the paper).

    Returns:
        ``[n_layers + 1, q_pos, k_pos]`` float32: stage 0 is the identity, stage ``n_layers``
        the rollout through every layer. Rows sum to 1.
    """
    patterns = np.asarray(patterns, dtype=np.float64)
    if patterns.ndim != 4 or patterns.shape[-1] != patterns.shape[-2]:
        raise ValueError(
            f"expected patterns shaped [n_layers, n_heads, q_pos, k_pos], got {patterns.shape}"
        )
    if not 0.0 <= residual_weight <= 1.0:
        raise ValueError(f"residual_weight must be in [0, 1], got {residual_weight}")

    n_layers, _, n_pos, _ = patterns.shape
    identity = np.eye(n_pos)
    rollout = np.empty((n_layers + 1, n_pos, n_pos))
    rollout[0] = identity
    for layer in range(n_layers):
        mixed = (1.0 - residual_weight) * patterns[layer].mean(0) + residual_weight * identity
        mixed /= mixed.sum(-1, keepdims=True)
        rollout[layer + 1] = mixed @ rollout[layer]
    return rollout.astype(np.float32)


def rollout(pa: PromptAnalysis) -> np.ndarray:
    """Attention rollout of a cached prompt, ``[n_layers + 1, pos, pos]`` float32.

    See :func:`attention_rollout`; computed once per analysis and then read from the cache.
    """

    def compute() -> dict[str, np.ndarray]:
        patterns = np.stack([pa.attention(layer) for layer in range(pa.n_layers)])
        return {"matrix": attention_rollout(patterns)}

    prefix = f"{pa.key}/rollout.w{DEFAULT_RESIDUAL_WEIGHT}"
    return cached_arrays(pa.store, prefix, ["matrix"], compute, tag=pa.key, compress=True)["matrix"]


def _check_pos(pa: PromptAnalysis, pos: int, what: str = "pos") -> int:
    if isinstance(pos, bool) or not isinstance(pos, (int, np.integer)):
        raise ValueError(f"{what} must be an integer, got {pos!r}")
    if not 0 <= pos < pa.n_pos:
        raise ValueError(
            f"{what} {pos} is out of range: this prompt has positions 0-{pa.n_pos - 1}"
        )
    return int(pos)


def rollout_shares(pa: PromptAnalysis, pos: int) -> np.ndarray:
    """What the stream at ``pos`` is made of, after every layer.

    Args:
        pa: The prompt's analysis.
        pos: The query position.

    Returns:
        ``[n_layers + 1, pos]`` float32: row ``l`` is the share of each input token in the
        stream entering block ``l`` (row 0 is one-hot on ``pos``); rows sum to 1 and are 0
        after ``pos``.
    """
    return rollout(pa)[:, _check_pos(pa, pos), :]


def memory_reach(pa: PromptAnalysis, source_pos: int, *, layer: int | None = None) -> np.ndarray:
    """How much of one input token reaches each later position.

    Args:
        pa: The prompt's analysis.
        source_pos: The input token's position.
        layer: The stage to read (0 .. n_layers); ``None`` means after the last layer.

    Returns:
        ``[pos]`` float32: the rollout share of ``source_pos`` in each position's stream; 0
        before ``source_pos``.
    """
    source_pos = _check_pos(pa, source_pos, "source_pos")
    layer = pa.n_layers if layer is None else layer
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise ValueError(f"layer must be an integer, got {layer!r}")
    if not 0 <= layer <= pa.n_layers:
        raise ValueError(f"layer {layer} is out of range: stages are 0-{pa.n_layers}")
    return rollout(pa)[layer, :, source_pos]


# ---------------------------------------------------------------------------------------------
# 4. Retention curves.


def retention_curves(pa: PromptAnalysis, positions: Sequence[int]) -> dict[str, np.ndarray]:
    """The chosen tokens' identity across layers, by three measures.

    Args:
        pa: The prompt's analysis.
        positions: Positions of the tokens to follow.

    Returns:
        ``{name: [n_tokens, n_layers + 1]}`` with

        - ``embedding_cosine``: cosine of the stream at the token's position to ``W_E[token]``
          (:func:`embedding_cosine`);
        - ``token_rank``: logit-lens rank of the token itself at its position (0 = top);
        - ``token_prob``: its logit-lens probability;
        - ``rollout_share``: the rollout share of the token in its own position's stream,
          ``rollout[l, pos, pos]`` (1 at stage 0).
    """
    chosen = np.asarray([_check_pos(pa, p) for p in positions], dtype=np.int64)
    lens = logit_lens(pa)
    matrix = rollout(pa)
    return {
        "embedding_cosine": embedding_cosine(pa)[:, chosen].T,
        "token_rank": lens.token_rank[:, chosen].T,
        "token_prob": lens.token_prob[:, chosen].T,
        "rollout_share": matrix[:, chosen, chosen].T,
    }


# ---------------------------------------------------------------------------------------------
# 5. Direct logit attribution.


@dataclass(frozen=True)
class LogitAttribution:
    """Each component's direct contribution to one logit at one position.

    The final residual stream is the sum of its parts (TransformerLens's ``decompose_resid``
    with per-head results from ``stack_head_results``):
    ``embed + pos_embed + sum_l (sum_h head_l,h + b_O_l + mlp_out_l)``. ``ln_final`` is linear
    once its scale at this position is frozen, so each part maps to a logit contribution
    ``(part - mean(part)) / scale @ W_U[:, token]``, and the logit is their sum plus
    ``b_U[token]``.

    Attributes:
        pos: The position read.
        token: The token whose logit is attributed.
        logit: The model's logit for ``token`` at ``pos``.
        embed: Contribution of the token embedding.
        pos_embed: Contribution of the positional embedding.
        heads: ``[n_layers, n_heads]`` contribution of each head's output (``z @ W_O``).
        attn_bias: ``[n_layers]`` contribution of each attention layer's ``b_O``.
        mlp: ``[n_layers]`` contribution of each MLP's output (bias included).
        unembed_bias: ``b_U[token]`` (with ``ln_final``'s bias folded in).
        scale: ``ln_final``'s scale at ``pos``, by which every part is divided.
    """

    pos: int
    token: int
    logit: float
    embed: float
    pos_embed: float
    heads: np.ndarray
    attn_bias: np.ndarray
    mlp: np.ndarray
    unembed_bias: float
    scale: float

    @property
    def attn(self) -> np.ndarray:
        """``[n_layers]``: each attention layer's contribution (its heads plus ``b_O``)."""
        return self.heads.sum(-1) + self.attn_bias

    @property
    def total(self) -> float:
        """Sum of every part and bias; equals :attr:`logit` up to float round-off."""
        return float(
            self.embed
            + self.pos_embed
            + self.heads.sum()
            + self.attn_bias.sum()
            + self.mlp.sum()
            + self.unembed_bias
        )


def logit_attribution(
    *,
    z,
    W_O,
    b_O,
    mlp_out,
    embed,
    pos_embed,
    scale: float,
    W_U_column,
    b_U_token: float,
    logit: float,
    pos: int,
    token: int,
) -> LogitAttribution:
    """Direct logit attribution of one (position, token) from the components at that position.

    Direct logit attribution as in TransformerLens (``ActivationCache.logit_attrs`` on a stack
    from ``decompose_resid``/``stack_head_results`` with ``apply_ln=True``): every component is
    centred, divided by ``ln_final``'s frozen scale at this position and projected on the
    token's unembedding column. Components are already centred in compatibility mode; centring
    again is exact and keeps the sum right on any model.

    Args:
        z: ``[n_layers, n_heads, d_head]`` tensor, ``hook_z`` at ``pos``.
        W_O: ``[n_layers, n_heads, d_head, d_model]``.
        b_O: ``[n_layers, d_model]``.
        mlp_out: ``[n_layers, d_model]``, ``hook_mlp_out`` at ``pos``.
        embed: ``[d_model]``, ``hook_embed`` at ``pos``.
        pos_embed: ``[d_model]``, ``hook_pos_embed`` at ``pos``.
        scale: ``ln_final.hook_scale`` at ``pos``.
        W_U_column: ``[d_model]``, ``W_U[:, token]`` with ``ln_final``'s weight folded in.
        b_U_token: ``b_U[token]`` with ``ln_final``'s bias folded in.
        logit: The model's logit, reported next to the parts.
        pos: The position, reported.
        token: The token id, reported.

    Returns:
        A :class:`LogitAttribution`.
    """
    import torch

    def project(part: torch.Tensor) -> torch.Tensor:
        part = part.double()
        return ((part - part.mean(-1, keepdim=True)) / scale) @ W_U_column.double()

    heads = torch.einsum("lhd,lhdm->lhm", z.double(), W_O.double())
    return LogitAttribution(
        pos=int(pos),
        token=int(token),
        logit=float(logit),
        embed=float(project(embed)),
        pos_embed=float(project(pos_embed)),
        heads=project(heads).float().numpy(),
        attn_bias=project(b_O).float().numpy(),
        mlp=project(mlp_out).float().numpy(),
        unembed_bias=float(b_U_token),
        scale=float(scale),
    )


def _dla_names(n_layers: int) -> list[str]:
    names = ["embed", "pos_embed", "scale", "resid_final"]
    names += [f"z.{layer}" for layer in range(n_layers)]
    names += [f"mlp_out.{layer}" for layer in range(n_layers)]
    return names


def _dla_components(pa: PromptAnalysis) -> dict[str, np.ndarray]:
    """Per-head ``hook_z``, ``hook_mlp_out``, embeddings, ``ln_final`` scale and final resid,
    all positions, float32; one hooked forward pass per analysis, then read from the cache."""

    def compute() -> dict[str, np.ndarray]:
        import torch

        loaded = model_for(pa)
        n_layers = loaded.n_layers
        final = f"blocks.{n_layers - 1}.hook_resid_post"
        wanted = {"hook_embed", "hook_pos_embed", "ln_final.hook_scale", final}
        wanted |= {f"blocks.{layer}.attn.hook_z" for layer in range(n_layers)}
        wanted |= {f"blocks.{layer}.hook_mlp_out" for layer in range(n_layers)}
        tokens = torch.as_tensor(pa.tokens)[None].to(loaded.device)

        # run_with_cache removes its hooks when it returns, also on error.
        with loaded.lock, torch.no_grad():
            _, cache = loaded.bridge.run_with_cache(tokens, names_filter=lambda n: n in wanted)

        def grab(name: str) -> np.ndarray:
            return cache[name][0].float().cpu().numpy()

        arrays = {
            "embed": grab("hook_embed"),
            "pos_embed": grab("hook_pos_embed"),
            "scale": grab("ln_final.hook_scale")[:, 0],
            "resid_final": grab(final),
        }
        for layer in range(n_layers):
            arrays[f"z.{layer}"] = grab(f"blocks.{layer}.attn.hook_z")
            arrays[f"mlp_out.{layer}"] = grab(f"blocks.{layer}.hook_mlp_out")
        return arrays

    names = _dla_names(pa.n_layers)
    return cached_arrays(pa.store, f"{pa.key}/dla", names, compute, tag=pa.key)


def direct_logit_attribution(
    pa: PromptAnalysis, pos: int, token: int | None = None
) -> LogitAttribution:
    """Which heads and layers write the logit of a token at a position.

    One hooked forward pass per analysis keeps ``hook_z`` and ``hook_mlp_out`` of every layer
    and position as float32 (about four times the size of the cached float16 residual stream);
    any later (position, token) is then a few small products. See :func:`logit_attribution`
    for the definition.

    Args:
        pa: The prompt's analysis.
        pos: The position whose prediction is explained.
        token: The token whose logit is attributed; ``None`` means the model's top prediction
            at ``pos``.

    Returns:
        A :class:`LogitAttribution`; its parts plus ``unembed_bias`` add up to ``logit``.
    """
    import torch

    pos = _check_pos(pa, pos)
    if token is None:
        token = int(pa.top_k()[0][pos, 0])
    loaded = model_for(pa)
    d_vocab = int(loaded.cfg.d_vocab)
    if isinstance(token, bool) or not isinstance(token, (int, np.integer)):
        raise ValueError(f"token must be a token id (an integer), got {token!r}")
    if not 0 <= token < d_vocab:
        raise ValueError(f"token id {token} is out of range: the vocabulary has {d_vocab} tokens")

    parts = _dla_components(pa)
    W_U, b_U, eps = unembedding(loaded, [token])
    bridge = loaded.bridge
    layers = range(pa.n_layers)
    with torch.no_grad():
        W_O = torch.stack(
            [bridge.blocks[layer].attn.W_O.detach().float().cpu() for layer in layers]
        )
        b_O = torch.stack(
            [bridge.blocks[layer].attn.b_O.detach().float().cpu() for layer in layers]
        )
    resid_final = torch.from_numpy(parts["resid_final"][pos])
    logit = float(apply_ln_final(resid_final, eps) @ W_U[:, 0] + b_U[0])

    return logit_attribution(
        z=torch.from_numpy(np.stack([parts[f"z.{layer}"][pos] for layer in layers])),
        W_O=W_O,
        b_O=b_O,
        mlp_out=torch.from_numpy(np.stack([parts[f"mlp_out.{layer}"][pos] for layer in layers])),
        embed=torch.from_numpy(parts["embed"][pos]),
        pos_embed=torch.from_numpy(parts["pos_embed"][pos]),
        scale=float(parts["scale"][pos]),
        W_U_column=W_U[:, 0],
        b_U_token=float(b_U[0]),
        logit=logit,
        pos=pos,
        token=token,
    )
