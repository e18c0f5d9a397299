"""Cold and warm analysis on a GPT-2-small-shaped model; prints figures, asserts nothing.

    python bench/bench_analysis.py [--lengths 16 128 512 1024] [--repeats 3]

For each prompt length: a bare ``run_with_cache`` (everything cached, what a notebook does),
a cold ``analyze`` (forward pass with ``names_filter`` plus writing the disk cache), a warm
one-layer ``attention(layer)`` read, and the bytes the analysis takes on disk. Targets: cold
<= 1.3x bare, warm read <= 5 ms at 128 tokens, <= 150 MB on disk at 1024 tokens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from analysis import analyze, load_model  # noqa: E402
from analysis.prompt import tokenize  # noqa: E402
from analysis.store import ArrayStore  # noqa: E402
from analysis.testing import GPT2_SMALL_SHAPE, make_random_gpt2  # noqa: E402


def prompt_of(n_tokens: int, loaded) -> str:
    """A prompt of exactly ``n_tokens`` tokens, BOS included."""
    words = " ".join(f"w{i % 97}" for i in range(n_tokens * 2))
    ids = loaded.tokenizer(words)["input_ids"][: n_tokens - 1]
    text = loaded.tokenizer.decode(ids)
    tokens, _ = tokenize(loaded, text, prepend_bos=True, truncate=False)
    assert tokens.shape[1] == n_tokens, (tokens.shape, n_tokens)
    return text


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 128, 512, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)

    work = Path(tempfile.mkdtemp(prefix="memlens-bench-"))
    model_dir = make_random_gpt2(work / "gpt2-small-shaped", **GPT2_SMALL_SHAPE, vocab_size=50257)
    loaded = load_model(str(model_dir), allow_any_path=True)
    print(
        f"model: GPT-2-small shape (12 layers x 12 heads, d_model 768), {torch.get_num_threads()}"
        " threads, random weights"
    )
    print(f"{'tokens':>6} {'bare s':>8} {'cold s':>8} {'ratio':>6} {'warm ms':>8} {'disk MB':>8}")

    for n_tokens in args.lengths:
        prompt = prompt_of(n_tokens, loaded)
        tokens, _ = tokenize(loaded, prompt, prepend_bos=True, truncate=False)

        def bare(tokens=tokens):
            with loaded.lock, torch.inference_mode():
                loaded.bridge.run_with_cache(tokens)

        bare()  # warm-up: first calls allocate
        bare_s = statistics.median(timed(bare, args.repeats))

        cold = []
        for repeat in range(args.repeats):
            store = ArrayStore(work / f"cache-{n_tokens}-{repeat}", 2**34)
            start = time.perf_counter()
            pa = analyze(prompt, str(model_dir), allow_any_path=True, store=store)
            cold.append(time.perf_counter() - start)
        cold_s = statistics.median(cold)

        layer = pa.n_layers // 2
        warm_ms = 1000 * statistics.median(
            timed(lambda pa=pa, layer=layer: pa.attention(layer), 20)
        )
        disk_mb = store.volume() / 1e6
        print(
            f"{n_tokens:>6} {bare_s:>8.3f} {cold_s:>8.3f} {cold_s / bare_s:>6.2f} "
            f"{warm_ms:>8.2f} {disk_mb:>8.1f}"
        )


if __name__ == "__main__":
    main()
