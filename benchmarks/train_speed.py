"""One epoch of fashion-mlp-bn-before (784-300-100-10, batch 32, SGD lr 1e-3, 55,000 samples of
28x28 synthetic pixels) through bnlab's engine and, in the same run, through a plain PyTorch loop
written the usual way (DataLoader over a TensorDataset, nn.Sequential with torch.nn.BatchNorm1d,
zero_grad / backward / step). Goal: ratio bnlab / plain <= 0.5.

    .venv/bin/python benchmarks/train_speed.py [--rounds 3] [--samples 55000]

Each round times both, interleaved (and, for orientation, a loop doing only this network's matrix
products: the floor any engine could reach), after one untimed warm-up epoch of each on 2,000 samples; the
best epoch time of each is reported. bnlab's engine is the C++ native step where it could be built
(the build, once per machine, is reported and not timed), else the Python fused step.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bnlab.data.dataset import Dataset
from bnlab.models import build_model, load_model_spec
from bnlab.train import fit, native


def plain_epoch(x: torch.Tensor, y: torch.Tensor, seed: int) -> float:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Flatten(), nn.BatchNorm1d(784),
        nn.Linear(784, 300, bias=False), nn.BatchNorm1d(300), nn.ReLU(),
        nn.Linear(300, 100, bias=False), nn.BatchNorm1d(100), nn.ReLU(),
        nn.Linear(100, 10))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    t0 = time.perf_counter()
    for xb, yb in loader:
        opt.zero_grad()
        loss = loss_fn(model(xb), yb)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def gemm_only_epoch(x: torch.Tensor, seed: int) -> float:
    """The floor: only this network's matrix products (forward, input gradients, SGD weight updates)."""
    torch.manual_seed(seed)
    w1, w2, w3 = torch.randn(300, 784) * 0.01, torch.randn(100, 300) * 0.01, torch.randn(10, 100) * 0.01
    flat = x.reshape(len(x), -1)
    t0 = time.perf_counter()
    for i in range(0, len(flat) - 31, 32):
        h0 = flat[i:i + 32]
        h1 = h0 @ w1.t()
        h2 = h1 @ w2.t()
        h3 = h2 @ w3.t()
        d2 = h3 @ w3
        w3.addmm_(h3.t(), h2, alpha=-1e-9)
        d1 = d2 @ w2
        w2.addmm_(d2.t(), h1, alpha=-1e-9)
        d1 @ w1  # the input BN's gradient needs it
        w1.addmm_(d1.t(), h0, alpha=-1e-9)
    return time.perf_counter() - t0


def bnlab_epoch(data: Dataset, seed: int) -> tuple[float, str]:
    model = build_model(load_model_spec("fashion-mlp-bn-before"), seed=seed)
    t0 = time.perf_counter()
    hist = fit(model, data, optimizer="sgd", lr=1e-3, batch_size=32, epochs=1, seed=seed, progress=False)
    total = time.perf_counter() - t0
    # the engine's epoch time includes one validation pass; report the whole call to be conservative
    return total, hist.engine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--samples", type=int, default=55000)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.samples, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (args.samples,), generator=g)
    val = 5000
    data = Dataset("synthetic-28x28", x, y, x[:val], y[:val], x[:0], y[:0], 10)
    native.load()
    print(f"native step: {'loaded in %.2f s' % native.load_seconds() if native.load_seconds() is not None else native.unavailable_reason()}")
    warm = Dataset("warm-up", x[:2000], y[:2000], x[:200], y[:200], x[:0], y[:0], 10)
    bnlab_epoch(warm, 0)
    plain_epoch(x[:2000], y[:2000], 0)
    best_b, best_p, best_g, engine = float("inf"), float("inf"), float("inf"), ""
    for r in range(args.rounds):
        b, engine = bnlab_epoch(data, r)
        pl = plain_epoch(x, y, r)
        g = gemm_only_epoch(x, r)
        best_b, best_p, best_g = min(best_b, b), min(best_p, pl), min(best_g, g)
        print(f"round {r + 1}: bnlab {b:.3f} s, plain {pl:.3f} s, GEMMs only {g:.3f} s")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, bnlab engine: {engine}")
    print(f"bnlab_s_per_epoch={best_b:.3f}")
    print(f"plain_s_per_epoch={best_p:.3f}")
    print(f"gemm_only_s_per_epoch={best_g:.3f} (ratio {best_g / best_p:.3f}: the floor for any engine)")
    print(f"ratio={best_b / best_p:.3f} (goal <= 0.5)")


if __name__ == "__main__":
    main()
