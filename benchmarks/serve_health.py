"""/health latency of `bnlab serve` while clients send full batches to /predict (issue 12's goal:
p99 under 50 ms with 4 clients).

    .venv/bin/python benchmarks/serve_health.py [--seconds 15] [--clients 4] [--decoders 2]

Builds a checkpoint of fashion-mlp-bn-after (seeded random weights, real BN statistics: accuracy is
not what is measured), starts `bnlab serve` on loopback in a subprocess, and starts `--clients`
client processes that each send full batches (MAX_BATCH samples of 28×28 pixel values as JSON,
~3.7 MB a request) on their own keep-alive connection, back to back. Once every client has had
its first answer, this process sends GET /health every 20 ms on its own connection for
`--seconds`. Prints /health latency idle and under load (p50, p90, p99, max) and /predict
throughput (requests/s, samples/s) and latency.
"""

import argparse
import http.client
import json
import multiprocessing
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def build_checkpoint(folder: Path) -> Path:
    import torch

    from bnlab.checkpoint import save_checkpoint
    from bnlab.models import build_model, load_model_spec

    model = build_model(load_model_spec("fashion-mlp-bn-after"), seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(64, 1, 28, 28, generator=g))
    return save_checkpoint(folder / "checkpoint", model.eval(), preprocessing={"scaling": "unit", "divide": 255.0},
                           meta={"classes": [str(i) for i in range(10)], "kind": "best", "epoch": 1})


def start_server(checkpoint: Path, log: Path, decoders: int) -> tuple[subprocess.Popen, int]:
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "bnlab", "serve", str(checkpoint), "--port", "0",
                                 "--decoders", str(decoders)], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", log.read_text(errors="replace"))
        if found:
            return proc, int(found.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not start:\n" + log.read_text(errors="replace"))


def client(port: int, body: bytes, started, stop, results) -> None:
    """Send the full batch back to back until ``stop``; report (latencies, statuses)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    latencies, statuses, first = [], {}, True
    while not stop.is_set():
        t = time.perf_counter()
        conn.request("POST", "/predict", body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        latencies.append(time.perf_counter() - t)
        statuses[response.status] = statuses.get(response.status, 0) + 1
        if first:
            started.put(1)
            first = False
    results.put((latencies, statuses))


def health_latencies(port: int, seconds: float, every: float = 0.02) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    out, end = [], time.monotonic() + seconds
    while time.monotonic() < end:
        t = time.perf_counter()
        conn.request("GET", "/health")
        response = conn.getresponse()
        assert response.status == 200 and response.read() == b'{"status":"ok"}'
        out.append(time.perf_counter() - t)
        time.sleep(max(0.0, every - (time.perf_counter() - t)))
    return out


def describe(seconds: list[float]) -> str:
    ms = np.asarray(seconds) * 1000
    return (f"n={len(ms)}  p50 {np.percentile(ms, 50):.1f} ms  p90 {np.percentile(ms, 90):.1f} ms  "
            f"p99 {np.percentile(ms, 99):.1f} ms  max {ms.max():.1f} ms")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--decoders", type=int, default=2)
    args = p.parse_args()
    from bnlab.deploy.serve import MAX_BATCH

    rng = np.random.default_rng(0)
    body = json.dumps({"inputs": rng.integers(0, 256, (MAX_BATCH, 1, 28, 28)).tolist()}).encode()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = build_checkpoint(Path(tmp))
        proc, port = start_server(checkpoint, Path(tmp) / "server.log", args.decoders)
        ctx = multiprocessing.get_context("spawn")
        started, results, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
        clients = [ctx.Process(target=client, args=(port, body, started, stop, results)) for _ in range(args.clients)]
        try:
            idle = health_latencies(port, 3)
            for c in clients:
                c.start()
            for _ in clients:
                started.get(timeout=120)
            t0 = time.perf_counter()
            loaded = health_latencies(port, args.seconds)
            stop.set()
            reports = [results.get(timeout=120) for _ in clients]
            elapsed = time.perf_counter() - t0
            for c in clients:
                c.join(timeout=60)
        finally:
            stop.set()
            for c in clients:
                if c.is_alive():
                    c.kill()
            proc.terminate()
            proc.wait(timeout=60)
    latencies = [x for lat, _ in reports for x in lat]
    statuses: dict = {}
    for _, s in reports:
        for k, v in s.items():
            statuses[k] = statuses.get(k, 0) + v
    print(f"bnlab serve, fashion-mlp-bn-after, {args.decoders} decoders, {args.clients} clients sending "
          f"{MAX_BATCH}-sample JSON batches ({len(body) / 1e6:.1f} MB), {multiprocessing.cpu_count()} CPUs")
    print(f"/health idle:        {describe(idle)}")
    print(f"/health under load:  {describe(loaded)}   (goal: p99 < 50 ms)")
    print(f"/predict:            {len(latencies)} requests in ~{elapsed:.1f} s = {len(latencies) / elapsed:.2f} "
          f"req/s = {len(latencies) * MAX_BATCH / elapsed:,.0f} samples/s; latency {describe(latencies)}; "
          f"statuses {statuses}")


if __name__ == "__main__":
    main()
