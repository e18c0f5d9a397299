"""Head switch from the cache vs. recomputing per interaction, on a GPT-2-small-shaped model.

The switch is the Attention page's ``show_head`` callback, called directly with the analysis
cached, plus the JSON serialisation Dash does for the response. The baseline is what a
Streamlit-style rerun does on every click with the model kept in memory: tokenise, run a forward
pass (keeping only the one attention pattern needed) and build the same figure.

Prints the numbers; asserts nothing. Targets: >= 20x faster, p95 <= 30 ms at 128 tokens, one
head view <= 1 MB and the model overview <= 2 MB at 1024 tokens.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_switch.py
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SWITCHES = {128: 60, 1024: 12}
RERUNS = {128: 10, 1024: 3}
WORDS = "the model keeps moves and loses memory of each token across layers while heads attend"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def prompt_of_length(loaded, n_tokens: int) -> str:
    """Text that tokenises (with BOS) to exactly ``n_tokens`` tokens on ``loaded``."""
    words = (WORDS.split() * (n_tokens // 4 + 8))[: n_tokens * 2]
    ids = loaded.tokenizer.encode(" ".join(words))
    keep = n_tokens - 1
    for _ in range(20):
        text = loaded.tokenizer.decode(ids[:keep])
        count = int(loaded.bridge.to_tokens(text, prepend_bos=True).shape[1])
        if count == n_tokens:
            return text
        keep += n_tokens - count
    raise RuntimeError(f"could not build a prompt of exactly {n_tokens} tokens")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="memlens-bench-") as tmp:
        os.environ["MEMLENS_CACHE_DIR"] = str(Path(tmp) / "cache")
        os.environ["MEMLENS_MODEL_DIRS"] = str(Path(tmp) / "models")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

        import torch
        from dash._utils import to_json

        import analysis
        import app  # noqa: F401  (creates the Dash app, which registers the pages)
        from analysis.testing import GPT2_SMALL_SHAPE, make_random_gpt2
        from components.heatmaps import make_attention_heatmap
        from pages import attention

        started = time.perf_counter()
        model_dir = make_random_gpt2(
            Path(tmp) / "models" / "gpt2-small-random", **GPT2_SMALL_SHAPE, vocab_size=50257
        )
        model = str(model_dir)
        loaded = analysis.load_model(model)
        print(f"model: random GPT-2 small shape {GPT2_SMALL_SHAPE}, vocab 50257")
        print(
            f"built and loaded in {time.perf_counter() - started:.1f}s; torch threads: "
            f"{torch.get_num_threads()}, cpus: {os.cpu_count()}"
        )

        for n_tokens in (128, 1024):
            prompt = prompt_of_length(loaded, n_tokens)

            # Warm the cache: the one forward pass the app does per prompt.
            started = time.perf_counter()
            pa = analysis.analyze(prompt, model)
            analyse_s = time.perf_counter() - started
            data = {
                "model": model,
                "prompt": prompt,
                "n_layers": pa.n_layers,
                "n_heads": pa.n_heads,
                "n_pos": pa.n_pos,
            }
            attention.show_head(data, "0", "0", False)

            # Head switches from the cache: callback + response serialisation.
            switch_ms, head_bytes = [], 0
            for index in range(SWITCHES[n_tokens]):
                layer, head = index % pa.n_layers, (index * 5 + 1) % pa.n_heads
                started = time.perf_counter()
                figure, _ = attention.show_head(data, str(layer), str(head), False)
                head_bytes = len(to_json(figure))
                switch_ms.append((time.perf_counter() - started) * 1e3)

            # Baseline: a rerun per click with the model in memory.
            rerun_ms = []
            for index in range(RERUNS[n_tokens]):
                layer, head = index % pa.n_layers, (index * 5 + 1) % pa.n_heads
                hook = f"blocks.{layer}.attn.hook_pattern"
                started = time.perf_counter()
                tokens = loaded.bridge.to_tokens(prompt, prepend_bos=True)
                with loaded.lock, torch.inference_mode():
                    _, cache = loaded.bridge.run_with_cache(
                        tokens.to(loaded.device), names_filter=lambda name, h=hook: name == h
                    )
                pattern = cache[hook][0, head].float().cpu().numpy()
                str_tokens = [loaded.tokenizer.decode([t]) for t in tokens[0].tolist()]
                len(to_json(make_attention_heatmap(pattern, str_tokens)))
                rerun_ms.append((time.perf_counter() - started) * 1e3)

            started = time.perf_counter()
            overview = attention.show_overview(data, False, "0", "0")
            overview_s = time.perf_counter() - started
            overview_bytes = len(to_json(overview))

            p50, p95 = percentile(switch_ms, 50), percentile(switch_ms, 95)
            rerun = statistics.median(rerun_ms)
            print(f"\n{n_tokens} tokens (first analysis, one forward pass: {analyse_s:.2f}s)")
            print(
                f"  head switch from cache: p50 {p50:.1f} ms, p95 {p95:.1f} ms, n={len(switch_ms)}"
            )
            print(f"  rerun per click:        p50 {rerun:.1f} ms, n={len(rerun_ms)}")
            print(f"  speedup (p50 / p50):    {rerun / p50:.0f}x")
            print(f"  head view response:     {head_bytes:,} bytes")
            print(
                f"  model overview:         {overview_bytes:,} bytes "
                f"(first build, one pass over all layers: {overview_s:.2f}s)"
            )


if __name__ == "__main__":
    main()
