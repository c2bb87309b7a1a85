"""
Load test for app.py: the same requests with batching on and with --no-batching.

    python bench_app.py --runs runs/explained-demo runs/self_attention-demo [--clients 8] [--requests 200]
                        [--rounds 1] [--json FILE]

For each mode it starts app.py on a free loopback port, warms it up, sends
--requests greedy caption requests (the server's test images, in turn) from
--clients concurrent clients, and stops it. It reports failed requests, p50 and
p99 latency, requests per second, and the server's resident memory after the
warm-up and at the end. With --rounds N the two modes take turns N times and
each one's median round is kept. The exit status is 1 if any request failed.
"""

import argparse
import concurrent.futures
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """app.py in a subprocess on a free loopback port, until the `with` block ends."""

    def __init__(self, runs, *options, env=None, timeout=120):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "app.py"), "--runs", *map(str, runs), "--port", str(self.port), *options],
            cwd=REPO,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.wait_until_healthy(timeout)

    def wait_until_healthy(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"app.py exited {self.proc.returncode} while starting:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/api/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"app.py did not answer /api/health within {timeout}s:\n{self.output()}")

    def rss_mb(self):
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS in /proc: is this Linux?")

    def output(self):
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")[-5000:]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
        self.log.close()


def server_images(url):
    """(name, bytes) of every test image the server offers."""
    examples = httpx.get(f"{url}/api/examples").json()
    if not examples:
        raise SystemExit("the server has no test images to send: is the runs' data still there?")
    return [(f"test-{e['index']}.png", httpx.get(url + e["url"]).content) for e in examples]


def send(url, images, n_requests, n_clients):
    """[(seconds, status, body or error)] of n_requests greedy captions, n_clients at a time."""
    turns = itertools.cycle(images)
    lock = threading.Lock()

    def one(client):
        with lock:
            name, raw = next(turns)
        t0 = time.perf_counter()
        try:
            r = client.post(f"{url}/api/caption", files={"image": (name, raw)}, data={"strategy": "greedy"})
            return time.perf_counter() - t0, r.status_code, r.json()
        except (httpx.HTTPError, ValueError) as e:
            return time.perf_counter() - t0, None, repr(e)

    with httpx.Client(timeout=120, limits=httpx.Limits(max_connections=n_clients)) as client:
        with concurrent.futures.ThreadPoolExecutor(n_clients) as pool:
            return list(pool.map(lambda _: one(client), range(n_requests)))


def percentile(values, q):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def measure(runs, options, n_requests, n_clients):
    load = os.getloadavg()[0]  # other work on the machine slows both modes: say how much there was
    with Server(runs, *options) as server:
        images = server_images(server.url)
        send(server.url, images, 4 * n_clients, n_clients)  # warm-up: every batch size, allocator settled
        rss_warm = server.rss_mb()
        t0 = time.perf_counter()
        results = send(server.url, images, n_requests, n_clients)
        seconds = time.perf_counter() - t0
        rss_end = server.rss_mb()
    ok = [(s, body) for s, status, body in results if status == 200]
    failures = [f"{status}: {body}" for _, status, body in results if status != 200]
    latencies = [s * 1000 for s, _ in ok] or [float("nan")]
    batches = [c["batch_size"] for _, body in ok for c in body["captions"]]
    return {
        "requests": len(results),
        "failed": len(failures),
        "failures": failures[:5],
        "seconds": seconds,
        "requests_per_s": len(ok) / seconds,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "mean_batch_size": sum(batches) / max(len(batches), 1),
        "rss_after_warmup_mb": rss_warm,
        "rss_end_mb": rss_end,
        "load_average_before": load,
    }


def report(m):
    print(
        f"  {m['failed']} failed, {m['requests_per_s']:.1f} requests/s, p50 {m['p50_ms']:.0f} ms, "
        f"p99 {m['p99_ms']:.0f} ms, mean batch {m['mean_batch_size']:.1f}, server RSS "
        f"{m['rss_after_warmup_mb']:.0f} MB after warm-up, {m['rss_end_mb']:.0f} MB at the end "
        f"(machine load average {m['load_average_before']:.1f} before)",
        flush=True,
    )
    for failure in m["failures"]:
        print(f"  failed: {failure}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", default=["runs/explained-demo", "runs/self_attention-demo"])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=200, help="per mode and round")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure the modes in turn this many times and keep each one's median round "
        "(on a machine shared with other work, single rounds vary)",
    )
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args(argv)
    modes = {"batched": [], "no_batching": ["--no-batching"]}
    rounds = {mode: [] for mode in modes}
    for k in range(args.rounds):
        for mode, options in modes.items():
            print(f"{mode}, round {k + 1}: {args.requests} greedy requests from {args.clients} clients", flush=True)
            rounds[mode].append(measure(args.runs, options, args.requests, args.clients))
            report(rounds[mode][-1])
    figures = {"clients": args.clients, "requests": args.requests, "runs": args.runs, "cpus": os.cpu_count()}
    for mode, measured in rounds.items():
        figures[mode] = sorted(measured, key=lambda m: m["requests_per_s"])[len(measured) // 2]
        figures[mode]["rounds_requests_per_s"] = [m["requests_per_s"] for m in measured]
    figures["speedup"] = figures["batched"]["requests_per_s"] / figures["no_batching"]["requests_per_s"]
    print(
        f"batched: {figures['batched']['requests_per_s']:.1f} requests/s, no batching: "
        f"{figures['no_batching']['requests_per_s']:.1f} (medians of {args.rounds} round(s)): "
        f"{figures['speedup']:.1f}x the requests per second"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 1 if any(m["failed"] for measured in rounds.values() for m in measured) else 0


if __name__ == "__main__":
    sys.exit(main())
