"""Small random GPT-2 checkpoints for tests and benchmarks, saved like any local model."""

from __future__ import annotations

import shutil
from pathlib import Path

from analysis.models import DEMO_DIR

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")

# The shape of GPT-2 small, for benchmarks that must be comparable with the real model.
GPT2_SMALL_SHAPE = {"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024}


def make_random_gpt2(
    directory: Path | str,
    *,
    n_layer: int = 2,
    n_head: int = 4,
    n_embd: int = 64,
    n_positions: int = 128,
    vocab_size: int | None = None,
    seed: int = 0,
) -> Path:
    """Save a randomly initialised ``GPT2LMHeadModel`` with the demo tokenizer to ``directory``.

    Args:
        directory: Where to write the checkpoint (created if needed).
        vocab_size: Defaults to the demo tokenizer's size; a larger value (50257 for a
            GPT-2-shaped benchmark) only widens the embedding, the tokenizer stays the same.
        seed: Seed of the initialisation, so tests can compare runs.

    Returns:
        The checkpoint directory, ready for :func:`analysis.load_model`.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(DEMO_DIR / name, directory / name)
    tokenizer = GPT2TokenizerFast.from_pretrained(directory)

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size or len(tokenizer),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(directory)
    return directory
