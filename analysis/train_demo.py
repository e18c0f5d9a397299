"""Train `memlens-demo`, the small GPT-2 that MemLens ships and opens on.

The model must show the memory mechanisms the dashboard is about, so half of the training rows
carry random token segments that repeat inside natural text: that is what makes previous-token
and induction heads form within half an hour on one CPU core (Olsson et al. 2022, "In-context
learning and induction heads"). What made them form in that budget, where smaller batches and
weight decay stayed on the plateau of copying unigram statistics: 32 rows a step, short rows
(128 tokens) until the phase change, a constant learning rate of 3e-3, no weight decay.

Run it with ``python -m analysis.train_demo``; it overwrites ``analysis/weights/memlens-demo``.
Everything is seeded, so the same machine gives the same files. Text sources (all from Debian
packages, redistributable):

- ``dict-jargon``: the Jargon File 4.4.7 (public domain)
- ``dict-devil``: Ambrose Bierce, *The Devil's Dictionary* (public domain)
- ``python3.11-doc``: the Python 3.11 documentation sources (PSF licence)
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

DEMO_DIR = Path(__file__).resolve().parent / "weights" / "memlens-demo"
EOT = "<|endoftext|>"

# Where Debian puts each text, and the package that provides it.
TEXT_SOURCES = {
    "/usr/share/dictd/jargon.dict.dz": "dict-jargon",
    "/usr/share/dictd/devil.dict.dz": "dict-devil",
    "/usr/share/doc/python3.11/html/_sources": "python3.11-doc",
}


@dataclass(frozen=True)
class TrainConfig:
    """Every knob of the run; written next to the weights so a run can be reproduced.

    Training runs in two phases. The first ``short_steps`` use rows of ``short_ctx`` tokens and
    a constant learning rate: with 32 rows a step, the induction head forms after about 2,600
    steps (the loss on repeated segments then drops within a few hundred steps, the "phase
    change" of Olsson et al.). The rest uses rows of the full ``n_ctx``, half as many so a step
    sees as many tokens, while the learning rate decays to ``final_lr_fraction``: the model
    learns the positions the first phase never reached, and the heads sharpen.
    """

    seed: int = 0
    vocab_size: int = 1024
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 128
    n_ctx: int = 256
    steps: int = 5000
    short_steps: int = 3500
    short_ctx: int = 128
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 100
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.0
    beta2: float = 0.98
    synthetic_fraction: float = 0.5
    # Of the repeated segments, this share are spans of natural text rather than random tokens:
    # with random tokens only, the induction head learns to copy random strings and little else.
    text_segment_fraction: float = 0.5
    min_segment: int = 8
    max_segment: int = 64

    def phase(self, step: int) -> tuple[int, int]:
        """``(rows, row length)`` of the batch at ``step``."""
        if step < self.short_steps:
            return self.batch_size, self.short_ctx
        return self.batch_size * self.short_ctx // self.n_ctx, self.n_ctx

    def lr_factor(self, step: int) -> float:
        """The learning rate at ``step`` as a fraction of ``lr``."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        if step < self.short_steps:
            return 1.0
        progress = (step - self.short_steps) / max(1, self.steps - self.short_steps)
        low = self.final_lr_fraction
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress))


def read_corpus() -> list[str]:
    """Documents from the Debian text packages, in a fixed order."""
    missing = [pkg for path, pkg in TEXT_SOURCES.items() if not Path(path).exists()]
    if missing:
        raise SystemExit(
            f"training text not found; install it with: apt-get install -y {' '.join(missing)}"
        )

    docs: list[str] = []
    for path in sorted(TEXT_SOURCES):
        source = Path(path)
        if source.is_dir():
            for file in sorted(source.rglob("*.txt")):
                docs.append(file.read_text(encoding="utf-8", errors="replace"))
        else:
            # dictd's .dz files are gzip-compatible; split the dictionary into its entries.
            text = gzip.decompress(source.read_bytes()).decode("utf-8", errors="replace")
            docs.extend(chunk for chunk in text.split("\n\n\n") if chunk.strip())
    return docs


def train_tokenizer(docs: list[str], config: TrainConfig, out_dir: Path):
    """A byte-level BPE with a small vocabulary, saved as a GPT-2 style fast tokenizer."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        docs,
        vocab_size=config.vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        show_progress=False,
    )
    raw = out_dir / "bpe.json"
    bpe.save(str(raw))
    tokenizer = GPT2TokenizerFast(
        tokenizer_file=str(raw), bos_token=EOT, eos_token=EOT, unk_token=EOT
    )
    raw.unlink()
    tokenizer.model_max_length = config.n_ctx
    return tokenizer


def encode_corpus(docs: list[str], tokenizer) -> np.ndarray:
    """One long token stream, documents separated by the end-of-text token."""
    eot = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        ids.append(eot)
        ids.extend(tokenizer(doc)["input_ids"])
    return np.asarray(ids, dtype=np.int64)


def make_batch(
    stream: np.ndarray,
    config: TrainConfig,
    rng: np.random.Generator,
    rows: int,
    ctx: int,
) -> torch.Tensor:
    """``rows`` natural text windows of ``ctx`` tokens, a ``synthetic_fraction`` of them
    overwritten in places by segments that repeat two or three times: random tokens, or a
    ``text_segment_fraction`` of the time a span of text from elsewhere in the corpus."""
    batch = []
    for _ in range(rows):
        start = int(rng.integers(0, len(stream) - ctx))
        row = stream[start : start + ctx].copy()
        if rng.random() < config.synthetic_fraction:
            pos = int(rng.integers(0, 32))
            while True:
                length = int(rng.integers(config.min_segment, config.max_segment + 1))
                repeats = int(rng.integers(2, 4))
                if pos + length * repeats > ctx:
                    break
                if rng.random() < config.text_segment_fraction:
                    begin = int(rng.integers(0, len(stream) - length))
                    segment = stream[begin : begin + length]
                else:
                    segment = rng.integers(1, config.vocab_size, size=length)
                row[pos : pos + length * repeats] = np.tile(segment, repeats)
                pos += length * repeats + int(rng.integers(0, 48))
        batch.append(row)
    return torch.from_numpy(np.stack(batch))


def sinusoidal_positions(n_ctx: int, d_model: int) -> torch.Tensor:
    """The fixed position encoding of "Attention is all you need", ``[n_ctx, d_model]``."""
    position = torch.arange(n_ctx, dtype=torch.float32)[:, None]
    frequency = torch.exp(torch.arange(0, d_model, 2) * (-math.log(10000.0) / d_model))
    table = torch.zeros(n_ctx, d_model)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table


def _repeat_loss_ratio(logits: torch.Tensor, tokens: torch.Tensor, seg_len: int) -> float:
    """Mean loss on the second copy of a ``seg_len`` segment repeated twice in ``tokens`` over
    that on the first (tokens 1 on), from the model's ``logits`` for them."""
    logprobs = logits.log_softmax(-1)[:, :-1]
    loss = -logprobs.gather(-1, tokens[:, 1:, None])[..., 0].mean(0)
    return float(loss[seg_len:].mean()) / float(loss[: seg_len - 1].mean())


def memory_scores(
    model, config: TrainConfig, seed: int = 1, seg_len: int = 50, stream: np.ndarray | None = None
) -> dict:
    """Best induction and previous-token head scores, and the loss ratio on repeats of random
    tokens (and, given the corpus ``stream``, on repeats of text from it)."""
    gen = torch.Generator().manual_seed(seed)
    half = torch.randint(1, config.vocab_size, (16, seg_len), generator=gen)
    tokens = torch.cat([half, half], dim=1)
    # Training runs on the fused kernel; attention weights need the eager one.
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(tokens, output_attentions=True)
    model.set_attn_implementation("sdpa")
    induction, previous = 0.0, 0.0
    for pattern in out.attentions:  # [batch, head, q, k]
        q = torch.arange(seg_len, 2 * seg_len)
        ind = pattern[:, :, q, q - seg_len + 1].mean(dim=(0, 2))
        q1 = torch.arange(1, 2 * seg_len)
        prev = pattern[:, :, q1, q1 - 1].mean(dim=(0, 2))
        induction = max(induction, float(ind.max()))
        previous = max(previous, float(prev.max()))
    scores = {
        "induction": induction,
        "previous_token": previous,
        "loss_ratio": _repeat_loss_ratio(out.logits, tokens, seg_len),
    }
    if stream is not None:
        starts = np.random.default_rng(seed).integers(0, len(stream) - seg_len, size=16)
        half = torch.from_numpy(np.stack([stream[s : s + seg_len] for s in starts]))
        text = torch.cat([half, half], dim=1)
        with torch.no_grad():
            logits = model(text).logits
        scores["text_loss_ratio"] = _repeat_loss_ratio(logits, text, seg_len)
    return scores


def train(config: TrainConfig, out_dir: Path = DEMO_DIR) -> dict:
    """Train tokenizer and model, write them to ``out_dir`` and return the final scores."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(config.seed)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(config.seed)
    out_dir.mkdir(parents=True, exist_ok=True)

    # Tokenizer and data.
    docs = read_corpus()
    tokenizer = train_tokenizer(docs, config, out_dir)
    stream = encode_corpus(docs, tokenizer)
    logger.info("corpus: %d documents, %d tokens", len(docs), len(stream))

    # Model: a plain GPT-2, without dropout so that training is reproducible and quick.
    model_config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=config.n_ctx,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = GPT2LMHeadModel(model_config)
    # Sinusoidal starting values for the learned positions (Vaswani et al. 2017): attending to
    # "the previous token" is then easy to express, so the previous-token head, which every
    # induction head builds on, forms within the first few hundred steps.
    with torch.no_grad():
        model.transformer.wpe.weight.copy_(0.05 * sinusoidal_positions(config.n_ctx, config.n_embd))
    model.set_attn_implementation("sdpa")
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=config.lr,
        betas=(0.9, config.beta2),
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, config.lr_factor)

    # Training loop.
    started = time.monotonic()
    for step in range(config.steps):
        batch = make_batch(stream, config, rng, *config.phase(step))
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % 100 == 0 or step == config.steps - 1:
            model.eval()
            scores = memory_scores(model, config, stream=stream)
            model.train()
            logger.info(
                "step %d/%d loss %.3f induction %.2f prev %.2f loss-ratio %.2f text %.2f (%.0fs)",
                step,
                config.steps,
                loss.item(),
                scores["induction"],
                scores["previous_token"],
                scores["loss_ratio"],
                scores["text_loss_ratio"],
                time.monotonic() - started,
            )

    # Save in Hugging Face format, with the recipe beside it.
    model.eval()
    scores = memory_scores(model, config, stream=stream)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    recipe = {"train_config": asdict(config), "sources": TEXT_SOURCES, "final_scores": scores}
    (out_dir / "memlens_recipe.json").write_text(json.dumps(recipe, indent=2, sort_keys=True))
    return scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEMO_DIR, help="output directory")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps, help="training steps")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (the shipped weights used 1)"
    )
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1)))
    scores = train(TrainConfig(steps=args.steps), args.out)
    logger.info("final scores: %s", scores)


if __name__ == "__main__":
    main()
