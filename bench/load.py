"""Load bench: many users switching heads on the Attention page while ablation sweeps run.

Starts ``python app.py serve`` (gunicorn) on loopback with a fresh cache directory and the
embedded ``memlens-demo`` model, analyses one prompt through the Attention page's Analyse
callback, then runs ``--users`` simulated browsers for ``--seconds``. Each user waits a think
time (uniform in 0.5-1.5 x ``--think`` seconds), picks another layer or head, and fires every
server callback the browser fires for that change (read from ``/_dash-dependencies``: the head
view, the layer grid, the selection frames, the URL), in parallel as the browser does, as real
``/_dash-update-component`` POSTs. Meanwhile one simulated user on the Ablate page runs ablation
sweeps through the real background-callback protocol (Analyse, then Run sweep, polled until it
answers), one after another on new prompts, so a sweep is running for the whole measurement.

A short warm-up (not counted) lets every web worker load the model before the clock starts.
Prints request and per-click latency (p50, p95, max), errors, finished sweeps, and the machine's
load. The client runs on the same machine as the server and takes CPU from it; its users are
spread over ``--client-processes`` processes, so that no one client GIL queues their requests.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/load.py --users 50 --seconds 60 --workers 4
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.dash_http import DashClient  # noqa: E402
from bench.processes import free_port, start, stop  # noqa: E402

MODEL = "memlens-demo"
PROMPT = (
    "When Mary and John went to the store, John gave a drink to Mary. The cat sat on the mat; "
    "the dog sat on the log. When Mary and John went to the store, John gave a drink to Mary. "
    "The cat sat on the mat; the dog sat on the log."
)
SWEEP_WORDS = (
    "the model keeps moves and loses memory of each token across layers while heads attend"
)
SWEEP_PROMPT_WORDS = 80  # about 200 tokens: within memlens-demo's 256-token context
LAYER, HEAD = "attention-layer.value", "attention-head.value"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def start_server(port: int, workers: int, cache_dir: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MEMLENS_CACHE_DIR": cache_dir,
        "MEMLENS_REDIS_URL": "",
    }
    command = [sys.executable, "app.py", "serve", "--host", "127.0.0.1", "--port", str(port)]
    return start([*command, "--workers", str(workers)], env, Path(cache_dir) / "server.log")


def wait_until_up(url: str, server: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}")
        try:
            if requests.get(url + "/", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server did not answer within {timeout_s:.0f}s")


def switch_callbacks(client: DashClient) -> dict[str, list[dict]]:
    """The server callbacks the browser fires when the layer, or the head, changes."""
    fired = {LAYER: [], HEAD: [], "all": client.dependencies()}
    for dependency in client.dependencies():
        names = {f"{i['id']}.{i['property']}" for i in dependency["inputs"]}
        if any(i["id"].startswith("{") for i in dependency["inputs"]):
            continue  # pattern-matching callbacks: not fired by a picker change
        for prop in (LAYER, HEAD):
            if prop in names:
                fired[prop].append(dependency)
    return fired


def analyse(client: DashClient, page: str, prompt: str) -> dict:
    """Press a page's Analyse button and return its analysis store."""
    dependency = client.find(f"{page}-analysis.data", trigger=f"{page}-analyse.n_clicks")
    values = {
        f"{page}-analyse.n_clicks": 1,
        f"{page}-prompt.value": prompt,
        f"{page}-model.value": MODEL,
        f"{page}-truncate.value": False,
        f"{page}-method.value": "zero",
        f"{page}-components.value": [],
    }
    result = client.call(dependency, values, [f"{page}-analyse.n_clicks"])
    data = result.outputs.get(f"{page}-analysis", {}).get("data")
    if not data:
        raise RuntimeError(f"the {page} page did not analyse the prompt: {result.outputs}")
    return data


class Recorder:
    """Latencies and errors from every thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests: list[float] = []
        self.by_callback: dict[str, list[float]] = {}
        self.clicks: list[float] = []
        self.errors: list[str] = []

    def request(self, name: str, seconds: float) -> None:
        with self.lock:
            self.requests.append(seconds)
            self.by_callback.setdefault(name, []).append(seconds)

    def click(self, seconds: float) -> None:
        with self.lock:
            self.clicks.append(seconds)

    def error(self, message: str) -> None:
        with self.lock:
            self.errors.append(message)

    def parts(self) -> tuple:
        """What a client process sends back (a lock does not cross processes)."""
        return self.requests, self.by_callback, self.clicks, self.errors

    def merge(self, parts: tuple) -> None:
        requests, by_callback, clicks, errors = parts
        self.requests += requests
        for name, values in by_callback.items():
            self.by_callback.setdefault(name, []).extend(values)
        self.clicks += clicks
        self.errors += errors


def callback_name(dependency: dict) -> str:
    first = dependency["output"].strip(".").split("...")[0]
    return first.split("@")[0]


def user(url, data, fired, stop_at, think, recorder, seed, count=True):
    """One browser on the Attention page, switching layers and heads until ``stop_at``."""
    rng = random.Random(seed)
    client = DashClient(url, dependencies=fired["all"])
    try:
        client.open("/")
    except Exception as exc:  # a user who cannot load the page is an error, not a silent exit
        recorder.error(f"open /: {str(exc)[:200]}")
        return
    state = {LAYER: 0, HEAD: 0}
    base = {"attention-analysis.data": data, "app-color-mode.value": False}
    with ThreadPoolExecutor(max_workers=4) as pool:
        while time.monotonic() < stop_at:
            time.sleep(think * rng.uniform(0.5, 1.5))
            if time.monotonic() >= stop_at:
                break
            prop = rng.choice([LAYER, HEAD])
            size = data["n_layers"] if prop == LAYER else data["n_heads"]
            state[prop] = (state[prop] + rng.randrange(1, size)) % size
            values = {**base, **state}

            def fire(dependency, values=values, prop=prop):
                try:
                    result = client.call(dependency, values, [prop])
                except Exception as exc:  # every failure is an error of the bench
                    recorder.error(f"{callback_name(dependency)}: {str(exc)[:200]}")
                    return
                if count:
                    recorder.request(callback_name(dependency), result.seconds)

            started = time.perf_counter()
            list(pool.map(fire, fired[prop]))
            if count:
                recorder.click(time.perf_counter() - started)


def user_group(url, data, fired, stop_at, think, seeds, queue) -> None:
    """Some of the users, in a client process of their own. In one process, the 200 threads of
    50 users would queue for its GIL, and that wait would be counted as the server's."""
    recorder = Recorder()
    threads = [
        threading.Thread(target=user, args=(url, data, fired, stop_at, think, recorder, seed))
        for seed in seeds
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    queue.put(recorder.parts())


def sweeper(url, stop_at, results, errors):
    """One browser on the Ablate page running sweeps back to back, each on a new prompt."""
    client = DashClient(url, timeout_s=120)
    client.open("/ablate")
    dependency = client.find("ablate-sweep-heads.figure", trigger="ablate-sweep-run.n_clicks")
    words = SWEEP_WORDS.split()
    index = 0
    while time.monotonic() < stop_at:
        index += 1
        rng = random.Random(index)
        prompt = " ".join(rng.choice(words) for _ in range(SWEEP_PROMPT_WORDS))
        try:
            data = analyse(client, "ablate", prompt)
            values = {
                "ablate-sweep-run.n_clicks": index,
                "ablate-analysis.data": data,
                "ablate-method.value": "zero",
                "ablate-source.value": "",
                "ablate-positions.value": "",
                "ablate-chosen.data": [],
                "app-color-mode.value": False,
            }
            result = client.run_background(
                dependency, values, ["ablate-sweep-run.n_clicks"], timeout_s=300
            )
            alert = result.outputs.get("ablate-sweep-alert", {})
            if alert.get("is_open"):
                errors.append(f"sweep refused: {alert.get('children')}")
            else:
                results.append((result.seconds, data["n_pos"]))
        except Exception as exc:  # every failure is an error of the bench
            errors.append(f"sweep: {str(exc)[:200]}")
            time.sleep(1)


def summary(name: str, values: list[float]) -> str:
    if not values:
        return f"{name}: none"
    ms = [1000 * v for v in values]
    return (
        f"{name}: p50 {percentile(ms, 50):.0f} ms, p95 {percentile(ms, 95):.0f} ms, "
        f"max {max(ms):.0f} ms (n={len(ms)})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=50, help="simulated browsers (50)")
    parser.add_argument("--seconds", type=float, default=60, help="measured duration (60)")
    parser.add_argument("--workers", type=int, default=4, help="gunicorn web workers (4)")
    parser.add_argument("--think", type=float, default=1.0, help="mean think time, s (1.0)")
    parser.add_argument("--no-sweep", action="store_true", help="no ablation sweeps meanwhile")
    parser.add_argument(
        "--client-processes", type=int, default=4, help="processes the users are spread over (4)"
    )
    args = parser.parse_args(argv)
    if (
        min(args.users, args.workers, args.client_processes) < 1
        or args.seconds <= 0
        or args.think < 0
    ):
        parser.error(
            "--users, --workers and --client-processes must be >= 1, --seconds > 0, --think >= 0"
        )

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="memlens-load-") as cache_dir:
        server = start_server(port, args.workers, cache_dir)
        failed = True
        try:
            failed = run(args, url, server) != 0
            return int(failed)
        finally:
            stop([server], grace_s=40)
            if failed:
                log = (Path(cache_dir) / "server.log").read_text()
                print(f"server log (last 3000 characters):\n{log[-3000:]}", file=sys.stderr)


def run(args, url: str, server: subprocess.Popen) -> int:
    started = time.perf_counter()
    wait_until_up(url, server)
    print(f"server up in {time.perf_counter() - started:.1f}s", flush=True)

    # Analyse the prompt once, through the page, and learn which callbacks a switch fires.
    client = DashClient(url, timeout_s=120)
    client.open("/")
    data = analyse(client, "attention", PROMPT)
    fired = switch_callbacks(client)
    names = {
        prop: [callback_name(d) for d in deps] for prop, deps in fired.items() if prop != "all"
    }
    print(f"prompt: {data['n_pos']} tokens on {MODEL}; a switch fires {names}", flush=True)

    # Warm-up (not counted): every worker thread loads the model and opens the cache.
    warm = Recorder()
    warm_stop = time.monotonic() + 5
    threads = [
        threading.Thread(target=user, args=(url, data, fired, warm_stop, 0.05, warm, -i, False))
        for i in range(4 * args.workers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # The measurement: sweeps in the background, users switching.
    recorder = Recorder()
    sweeps: list[tuple[float, int]] = []
    sweep_errors: list[str] = []
    load_before = os.getloadavg()
    server_tree = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
    cpu_before = sum(_cpu(p) for p in server_tree)
    me = psutil.Process()
    me_before = _cpu(me)
    wall = time.perf_counter()
    stop_at = time.monotonic() + args.seconds
    threads = []
    if not args.no_sweep:
        threads.append(threading.Thread(target=sweeper, args=(url, stop_at, sweeps, sweep_errors)))
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    groups = [
        context.Process(
            target=user_group,
            args=(url, data, fired, stop_at, args.think, seeds, queue),
        )
        for seeds in (
            range(args.users)[k :: args.client_processes] for k in range(args.client_processes)
        )
        if seeds
    ]
    for process in groups:
        process.start()
    for thread in threads:
        thread.start()
    for _ in groups:
        recorder.merge(queue.get(timeout=args.seconds + 300))
    for process in groups:
        process.join()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - wall
    server_tree = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
    cpu_server = sum(_cpu(p) for p in server_tree) - cpu_before
    cpu_client = _cpu(me) - me_before
    load_after = os.getloadavg()

    # The report.
    errors = recorder.errors + sweep_errors
    print(
        f"{args.users} users x {args.seconds:g} s, {args.workers} gunicorn workers (gthread, "
        f"4 threads each), think time {0.5 * args.think:g}-{1.5 * args.think:g} s",
        flush=True,
    )
    print(
        f"requests: {len(recorder.requests)} ({len(recorder.requests) / elapsed:.0f}/s), "
        f"clicks: {len(recorder.clicks)}, errors: {len(errors)}"
    )
    print(summary("latency per request", recorder.requests))
    print(summary("latency per click (all its callbacks)", recorder.clicks))
    for name, values in sorted(recorder.by_callback.items()):
        print("  " + summary(name, values))
    if not args.no_sweep:
        durations = [seconds for seconds, _ in sweeps]
        mean = f", {statistics.mean(durations):.1f} s each" if durations else ""
        tokens = f" on {sweeps[0][1]}-token prompts" if sweeps else ""
        print(f"ablation sweeps finished meanwhile: {len(sweeps)}{mean}{tokens}")
    print(
        f"machine: {os.cpu_count()} CPUs, load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after; CPU used: server {cpu_server / elapsed:.2f} cores, "
        f"bench client {cpu_client / elapsed:.2f} cores"
    )
    for message in errors[:10]:
        print("error:", message)
    return 1 if errors else 0


def _cpu(process: psutil.Process) -> float:
    try:
        times = process.cpu_times()
        return times.user + times.system + times.children_user + times.children_system
    except psutil.NoSuchProcess:
        return 0.0


if __name__ == "__main__":
    raise SystemExit(main())
