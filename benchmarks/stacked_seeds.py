"""Many seeds as one model: K seeds of an MLP trained stacked (``bnlab.train.stacked.fit_stacked``) against
one model's epoch through ``fit`` (the engine it picks: the C++ native step where it builds), in one run.

    .venv/bin/python benchmarks/stacked_seeds.py [--samples 11000] [--rounds 2]

Workloads: (1) the seed MLP (fashion-mlp-bn-before: 784-300-100-10 with BN, batch 32, SGD lr 1e-3), K = 8;
goal: K = 8 stacked per epoch <= 2.5x one model's epoch; in fp32 and, both sides, in bf16-mixed. (2) the demo's network (paper-mnist-mlp-bn:
784-100-100-100-10 sigmoid with BN, batch 60, SGD lr 0.1), K = 5 (the demo's seeds): stacked against five
separate runs. Synthetic 28x28 pixels; each time is the best of ``--rounds`` epochs after a warm-up epoch.
Prints each ratio, the seed MLP's matrix-product floor (``train_speed.gemm_only_epoch``: 8 seeds cannot
take less than 8 of it), and the CPU.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from bnlab.data.dataset import Dataset
from bnlab.models import build_model, load_model_spec
from bnlab.train import fit
from bnlab.train.stacked import fit_stacked

from train_speed import gemm_only_epoch


def _data(n: int) -> Dataset:
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    return Dataset("synthetic", x, y, x[:0], y[:0], x[:0], y[:0], 10)


def _best(f, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times)


def workload(name: str, k: int, batch: int, lr: float, data: Dataset, rounds: int,
             precision: str = "fp32") -> tuple[float, float, str]:
    spec = load_model_spec(name)
    engine = []

    def one():
        h = fit(build_model(spec, seed=0), data, lr=lr, batch_size=batch, epochs=1, progress=False, precision=precision)
        engine.append(h.engine)

    def stacked():
        fit_stacked([build_model(spec, seed=s) for s in range(k)], data, list(range(k)), lr=lr, batch_size=batch,
                    epochs=1, precision=precision)

    warm = Dataset("warm", data.x_train[:2000], data.y_train[:2000], data.x_val, data.y_val, data.x_test,
                   data.y_test, 10)
    fit(build_model(spec, seed=0), warm, lr=lr, batch_size=batch, epochs=1, progress=False, precision=precision)
    fit_stacked([build_model(spec, seed=s) for s in range(k)], warm, list(range(k)), lr=lr, batch_size=batch, epochs=1,
                precision=precision)
    t_one = _best(one, rounds)
    t_stacked = _best(stacked, rounds)
    return t_one, t_stacked, engine[-1]


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=11000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    data = _data(args.samples)
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads; {args.samples} samples per epoch")
    one, stacked, engine = workload("fashion-mlp-bn-before", 8, 32, 1e-3, data, args.rounds)
    floor = _best(lambda: gemm_only_epoch(data.x_train, 0), args.rounds)
    print(f"seed MLP, batch 32: one model {one:.3f} s/epoch ({engine} engine); 8 seeds stacked {stacked:.3f} s/epoch; "
          f"one model's matrix products alone {floor:.3f} s/epoch (x8 = {8 * floor:.3f} s)")
    print(f"  ratio stacked(8) / one = {stacked / one:.2f} (goal <= 2.5); stacked / 8 separate = "
          f"{stacked / (8 * one):.2f}")
    one, stacked, engine = workload("fashion-mlp-bn-before", 8, 32, 1e-3, data, args.rounds, "bf16-mixed")
    print(f"seed MLP, batch 32, bf16-mixed (both): one model {one:.3f} s/epoch ({engine} engine); 8 seeds stacked "
          f"{stacked:.3f} s/epoch")
    print(f"  ratio stacked(8) / one = {stacked / one:.2f} (goal <= 2.5); stacked / 8 separate = "
          f"{stacked / (8 * one):.2f}")
    one, stacked, engine = workload("paper-mnist-mlp-bn", 5, 60, 0.1, data, args.rounds)
    print(f"demo MLP, batch 60: one model {one:.3f} s/epoch ({engine} engine); 5 seeds stacked {stacked:.3f} s/epoch")
    print(f"  ratio stacked(5) / 5 separate = {stacked / (5 * one):.2f}")


if __name__ == "__main__":
    main()
