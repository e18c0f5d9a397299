"""A 144-head ablation sweep, batched vs one forward pass per head; prints figures, asserts nothing.

    python bench/bench_ablation.py [--lengths 64 256] [--batch-size N] [--budget-s 240]

On a GPT-2-small-shaped random model (12 layers x 12 heads, vocab 50257), for each prompt
length, zero-ablates every head one at a time in two ways:

- batched: :func:`analysis.ablation.ablation_sweep` with ``kinds=["head"]``, ablation i in batch
  row i, ``--batch-size`` rows per pass (default: the automatic, memory-bounded choice);
- per head: what a notebook loop does, one batch-1 ``run_with_hooks`` per head with a hook that
  zeroes that head's ``hook_z``, and the same per-token loss;
- whole model (diagnostic): the sweep's batched passes, but each running the whole model
  instead of starting at the ablated layer, to separate the gain of batching from that of
  skipping the blocks below the ablation ("batching only" is per head / whole model).

Timing interleaves the three in one process, so a machine whose load changes during the run
slows all alike: after each batched pass (reported by ``progress``), the same heads are run in a
whole-model pass and one pass each, and that time is taken out of the sweep's. Every total
includes one clean pass. When the run would pass ``--budget-s``, ``should_stop`` ends the sweep
and every total is extrapolated from the heads done (the output says so).

Memory is measured in separate subprocesses, one per method, so the figures do not mix: the
peak resident set size (RSS) during two batched passes, or during a few per-head passes, minus
the RSS just before, sampled from ``/proc/self/statm`` every 5 ms by a thread (tracemalloc does
not see torch's allocations). The ``maxrss`` column is the increase of ``resource.getrusage``'s
high-water mark, which stays 0 while the sweep peaks below the model load's own peak.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from analysis import ablation, analyze, load_model  # noqa: E402
from analysis.ablation import AblationCancelled, Component, ablation_sweep  # noqa: E402
from analysis.prompt import tokenize  # noqa: E402
from analysis.store import ArrayStore  # noqa: E402
from analysis.testing import GPT2_SMALL_SHAPE, make_random_gpt2  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def prompt_of(n_tokens: int, loaded) -> str:
    """A prompt of exactly ``n_tokens`` tokens, BOS included."""
    words = " ".join(f"w{i % 97}" for i in range(n_tokens * 2))
    ids = loaded.tokenizer(words)["input_ids"][: n_tokens - 1]
    text = loaded.tokenizer.decode(ids)
    tokens, _ = tokenize(loaded, text, prepend_bos=True, truncate=False)
    assert tokens.shape[1] == n_tokens, (tokens.shape, n_tokens)
    return text


class PeakRss:
    """Highest resident set size seen while the block runs, sampled every 5 ms."""

    def __enter__(self):
        self.start = self.peak = self._rss()
        self.maxrss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.maxrss_delta = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.maxrss_start
        )

    def _sample(self):
        while not self._done.wait(0.005):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * PAGE


def per_head_pass(loaded, tokens, layer: int, head: int) -> None:
    """One batch-1 forward pass with one head zeroed, and its per-token loss."""

    def zero_head(z, hook):
        z = z.clone()
        z[:, :, head] = 0.0
        return z

    name = Component("head", layer, head).hook_name
    with loaded.lock, torch.inference_mode():
        logits = loaded.bridge.run_with_hooks(tokens, fwd_hooks=[(name, zero_head)])
        logprobs = logits[0].float().log_softmax(-1)
        logprobs[:-1].gather(-1, tokens[0, 1:, None])


def clean_pass(loaded, tokens) -> float:
    """Seconds of one plain batch-1 forward pass with its loss."""
    started = time.perf_counter()
    with loaded.lock, torch.inference_mode():
        loaded.bridge(tokens).float().log_softmax(-1)
    return time.perf_counter() - started


def whole_model_pass(loaded, tokens, heads) -> None:
    """The sweep's batched pass for ``heads`` run through the whole model, as it is when the
    model's blocks cannot be started midway (isolates the gain of batching alone)."""
    rows = [(Component("head", layer, head),) for layer, head in heads]
    logits, _ = ablation._ablated_run(loaded, tokens, rows, {}, start=None)
    ablation._token_loss(logits, tokens)


def measure_time(pa, loaded, budget_s: float, batch_size: int | None) -> dict:
    """The real sweep; after every pass, the same heads in a whole-model batched pass and in
    one pass each."""
    tokens = torch.as_tensor(pa.tokens)[None]
    heads = [(layer, head) for layer in range(pa.n_layers) for head in range(pa.n_heads)]
    total = len(heads)
    per_head_s = [clean_pass(loaded, tokens)]  # the clean pass the loop needs too
    whole_s = [per_head_s[0]]
    marks: list[tuple[float, int]] = []  # (sweep seconds so far, heads done)
    started = time.perf_counter()
    outside = 0.0  # seconds spent in the other methods, not part of the sweep

    def progress(done: int, _total: int) -> None:
        nonlocal outside
        marks.append((time.perf_counter() - started - outside, done))
        begin = marks[-2][1] if len(marks) > 1 else done
        if begin == done:
            return
        tick = time.perf_counter()
        whole_model_pass(loaded, tokens, heads[begin:done])
        whole_s.append(time.perf_counter() - tick)
        outside += whole_s[-1]
        for layer, head in heads[begin:done]:
            tick = time.perf_counter()
            per_head_pass(loaded, tokens, layer, head)
            per_head_s.append(time.perf_counter() - tick)
            outside += per_head_s[-1]

    stopped = False
    try:
        ablation_sweep(
            pa,
            kinds=["head"],
            batch_size=batch_size,
            progress=progress,
            should_stop=lambda: time.perf_counter() - started > budget_s,
        )
    except AblationCancelled:
        stopped = True
    done = marks[-1][1]
    rows = marks[1][1] if len(marks) > 1 else 0
    batched_s, looped_s, whole = marks[-1][0], sum(per_head_s), sum(whole_s)
    if stopped and done:
        # The first pass also holds the sweep's clean pass; later passes are the steady state.
        later = [(t1 - t0, n1 - n0) for (t0, n0), (t1, n1) in itertools.pairwise(marks[1:])]
        if later:
            per_row = sum(t for t, _ in later) / sum(n for _, n in later)
        else:
            per_row = (marks[1][0] - per_head_s[0]) / rows
        batched_s = marks[1][0] + (total - rows) * per_row
        looped_s = per_head_s[0] + sum(per_head_s[1:]) / done * total
        whole = whole_s[0] + sum(whole_s[1:]) / done * total
    elif stopped:
        batched_s = looped_s = whole = float("nan")  # the clean pass alone outran the budget
    return {
        "batched_s": batched_s,
        "whole_model_s": whole,
        "per_head_s": looped_s,
        "clean_s": per_head_s[0],
        "heads_timed": done,
        "rows": rows,
        "extrapolated": stopped,
    }


def measure_memory(pa, loaded, method: str, batch_size: int | None) -> dict:
    """Peak RSS increase of two batched passes, or of a few per-head passes."""
    tokens = torch.as_tensor(pa.tokens)[None]
    with PeakRss() as rss:
        if method == "batched":
            passes = []
            with contextlib.suppress(AblationCancelled):
                ablation_sweep(
                    pa,
                    kinds=["head"],
                    batch_size=batch_size,
                    progress=lambda done, total: passes.append(done),
                    should_stop=lambda: len(passes) > 2,
                )
        else:
            for head in range(3):
                per_head_pass(loaded, tokens, 0, head)
    return {"peak_mb": (rss.peak - rss.start) / 1e6, "maxrss_mb": rss.maxrss_delta / 1e6}


def worker(args) -> None:
    """One measurement in this fresh process; prints its figures as JSON on the last line."""
    loaded = load_model(args.model_dir, allow_any_path=True)
    prompt = prompt_of(args.tokens, loaded)
    store = ArrayStore(tempfile.mkdtemp(prefix="memlens-bench-abl-"), 2**34)
    pa = analyze(prompt, args.model_dir, allow_any_path=True, store=store)
    clean_pass(loaded, torch.as_tensor(pa.tokens)[None])  # warm-up: first calls allocate
    if args.worker == "time":
        figures = measure_time(pa, loaded, args.budget_s, args.batch_size)
    else:
        figures = measure_memory(pa, loaded, args.worker, args.batch_size)
    print(json.dumps(figures))


def run_worker(mode: str, model_dir: Path, n_tokens: int, args) -> dict:
    command = [sys.executable, __file__, "--worker", mode, "--model-dir", str(model_dir)]
    command += ["--tokens", str(n_tokens), "--budget-s", str(args.budget_s)]
    if args.batch_size:
        command += ["--batch-size", str(args.batch_size)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"the {mode} measurement at {n_tokens} tokens failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--budget-s", type=float, default=240.0)
    parser.add_argument("--worker", choices=["time", "batched", "per-head"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.worker:
        worker(args)
        return

    work = Path(tempfile.mkdtemp(prefix="memlens-bench-"))
    model_dir = make_random_gpt2(work / "gpt2-small-shaped", **GPT2_SMALL_SHAPE, vocab_size=50257)
    print(
        "model: GPT-2-small shape (12 layers x 12 heads, d_model 768, vocab 50257), random "
        f"weights, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}"
    )
    print(
        "time: 144-head zero-ablation sweep incl. one clean pass, batched and per head "
        "interleaved in one process; memory: peak RSS increase (sampled every 5 ms) and "
        "ru_maxrss increase (batched/per head), each method in its own process"
    )
    header = f"{'tokens':>6} {'rows':>5} {'batched s':>10} {'whole-model s':>14} "
    header += f"{'per-head s':>11} {'speedup':>8} {'batching only':>14}"
    header += f" {'batched MB':>11} {'per-head MB':>12} {'maxrss MB':>10}  note"
    print(header)
    for n_tokens in args.lengths:
        timing = run_worker("time", model_dir, n_tokens, args)
        batched = run_worker("batched", model_dir, n_tokens, args)
        per_head = run_worker("per-head", model_dir, n_tokens, args)
        note = "all 144 heads"
        if timing["extrapolated"]:
            note = (
                f"extrapolated from the first {timing['heads_timed']}/144 heads (batched: an "
                "over-estimate, passes for later layers skip more blocks)"
            )
        speedup = timing["per_head_s"] / timing["batched_s"]
        batching_only = timing["per_head_s"] / timing["whole_model_s"]
        maxrss = f"{batched['maxrss_mb']:.0f}/{per_head['maxrss_mb']:.0f}"
        print(
            f"{n_tokens:>6} {timing['rows']:>5} {timing['batched_s']:>10.1f} "
            f"{timing['whole_model_s']:>14.1f} {timing['per_head_s']:>11.1f} {speedup:>7.2f}x "
            f"{batching_only:>13.2f}x {batched['peak_mb']:>11.0f} "
            f"{per_head['peak_mb']:>12.0f} {maxrss:>10}  {note}; clean pass "
            f"{timing['clean_s']:.2f}s, load {os.getloadavg()[0]:.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
