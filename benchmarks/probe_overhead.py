"""Training time with probes at their default sampling vs without, in one run (interleaved).

The demo's network (3 x 100 sigmoid MLP, BN before the activation) on mnist-5k, batch 60, SGD.
Goal: overhead under 10 % at the default sampling (every 50 steps).

    .venv/bin/python benchmarks/probe_overhead.py [--epochs 5] [--rounds 3] [--every 50]
"""

from __future__ import annotations

import argparse
import time

from bnlab.data import load_dataset
from bnlab.models import build_model, load_model_spec
from bnlab.probes import ProbeConfig
from bnlab.train import fit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--every", type=int, default=ProbeConfig().every)
    args = p.parse_args()
    data = load_dataset("mnist-5k")
    spec = load_model_spec("paper-mnist-mlp-bn")

    def run(probes):
        model = build_model(spec, seed=0)
        t0 = time.perf_counter()
        fit(model, data, lr=0.1, batch_size=60, epochs=args.epochs, progress=False, probes=probes)
        return time.perf_counter() - t0

    run(None)  # warm-up
    best = {"off": float("inf"), "on": float("inf")}
    for r in range(args.rounds):
        off, on = run(None), run(ProbeConfig(every=args.every))
        best["off"], best["on"] = min(best["off"], off), min(best["on"], on)
        print(f"round {r + 1}: without probes {off:.3f} s, with probes {on:.3f} s")
    print(f"probes every {args.every} steps, {args.epochs} epochs")
    print(f"without_s={best['off']:.3f}")
    print(f"with_s={best['on']:.3f}")
    print(f"overhead_ratio={best['on'] / best['off']:.3f} (goal < 1.10)")


if __name__ == "__main__":
    main()
