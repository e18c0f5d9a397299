"""Memory of one web worker: the app imported, a model loaded and one prompt analysed.

Each model is measured in a fresh Python process that does what a gunicorn worker does before
its first answer (import ``app``, which builds every page) and then what its first Analyse
does (load the model, run one forward pass on a 128-token prompt, cache it). The figure is that
process's peak resident set size, ``VmHWM`` (not ``ru_maxrss``, which a process started from
this one inherits). GPT-2 small is measured on a checkpoint of its shape with random weights,
built here: real weights are never downloaded.

Prints the numbers; asserts nothing.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/bench_memory.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

N_TOKENS = 128
WORKER = """
import sys, time
def peak_mb():
    status = open("/proc/self/status").read()
    return int(status.split("VmHWM:")[1].split()[0]) // 1024
started = time.perf_counter()
import app  # noqa: F401  (builds every page, as a gunicorn worker does)
import analysis
imported = peak_mb()
model, n_tokens = sys.argv[1], int(sys.argv[2])
loaded = analysis.load_model(model)
ids = loaded.tokenizer.encode(" ".join(["memory"] * (2 * n_tokens)))
text = loaded.tokenizer.decode(ids[: n_tokens - 1])
pa = analysis.analyze(text, model)
print(imported, peak_mb(), pa.n_pos, f"{time.perf_counter() - started:.1f}")
"""


def measure(model: str, env: dict) -> tuple[int, int, int, str]:
    """``(MB after import, peak MB, tokens analysed, seconds)`` of a fresh worker process."""
    done = subprocess.run(
        [sys.executable, "-c", WORKER, model, str(N_TOKENS)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"measuring {model} failed:\n{done.stderr[-3000:]}")
    imported, peak, n_pos, seconds = done.stdout.split()[-4:]
    return int(imported), int(peak), int(n_pos), seconds


def main() -> None:
    from analysis.models import DEMO_MODEL
    from analysis.testing import GPT2_SMALL_SHAPE, make_random_gpt2

    with tempfile.TemporaryDirectory(prefix="memlens-memory-") as tmp:
        models = Path(tmp) / "models"
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "MEMLENS_CACHE_DIR": str(Path(tmp) / "cache"),
            "MEMLENS_MODEL_DIRS": str(models),
        }
        gpt2 = make_random_gpt2(models / "gpt2-small-random", **GPT2_SMALL_SHAPE, vocab_size=50257)
        print(f"one web worker: import app, load the model, analyse a {N_TOKENS}-token prompt")
        print(f"{'model':<28} {'after import MB':>16} {'peak MB':>8} {'tokens':>7} {'s':>6}")
        for name, model in ((DEMO_MODEL, DEMO_MODEL), ("GPT-2 small shape", str(gpt2))):
            imported, peak, n_pos, seconds = measure(model, env)
            print(f"{name:<28} {imported:>16} {peak:>8} {n_pos:>7} {seconds:>6}")


if __name__ == "__main__":
    main()
