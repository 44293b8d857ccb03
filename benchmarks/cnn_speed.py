"""The seed-002 CNN training step (cifar100-cnn-bn: 10 conv 3x3 + BN + ReLU, max-pooling and dropout 0.15
after every second block, Flatten, Dense 100; batch 80, RMSprop, 32x32x3 inputs), in one run:

  (a) a plain fp32 PyTorch loop (torch.nn.BatchNorm2d, NCHW, the usual zero_grad / backward / step);
  (b) the best plain loop: channels_last + torch.autocast("cpu", bfloat16);
  (c) bnlab's step in fp32 (the step ``fit`` takes for this model, with its optimizer);
  (d) bnlab's step in bf16-mixed.

    .venv/bin/python benchmarks/cnn_speed.py [--steps 30] [--rounds 3]

Each configuration runs ``--steps`` steps per round after a warm-up, interleaved round by round; the
median step time over all rounds is reported. Prints ms/step, the ratios c/a, d/a and d/b with the
issue's goals (c/a <= 0.9, d/a <= 0.30, d/b <= 0.6), the CPU and whether it has AMX tiles.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from bnlab.models import build_model, load_model_spec
from bnlab.train.engine import make_step
from bnlab.train.optim import make_optimizer

from stacked_seeds import cpu_name

BATCH = 80


def plain_model() -> nn.Sequential:
    layers, c = [], 3
    for width in (60, 60, 60, 60):
        for _ in range(2):
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width, eps=1e-3, momentum=0.01), nn.ReLU()]
            c = width
        layers += [nn.MaxPool2d(2), nn.Dropout(0.15)]
    for _ in range(2):
        layers += [nn.Conv2d(c, 100, 3, padding=1), nn.BatchNorm2d(100, eps=1e-3, momentum=0.01), nn.ReLU()]
        c = 100
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(400, 100))


def plain_stepper(channels_last: bool, bf16: bool):
    torch.manual_seed(0)
    model = plain_model()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-4, alpha=0.9, eps=1e-7)

    def step(x, y):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return step


def bnlab_stepper(precision: str):
    model = build_model(load_model_spec("cifar100-cnn-bn"), seed=0)
    gen = torch.Generator().manual_seed(0)
    inner, engine = make_step(model, "auto", gen, precision=precision)
    opt = make_optimizer("rmsprop", list(model.parameters()), lr=1e-4)

    def step(x, y):
        inner(x, y)
        opt.step()
    step.engine = engine
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH * 8, 3, 32, 32, generator=g)
    y = torch.randint(0, 100, (BATCH * 8,), generator=g)
    configs = {"plain fp32": plain_stepper(False, False), "plain channels_last+bf16": plain_stepper(True, True),
               "bnlab fp32": bnlab_stepper("fp32"), "bnlab bf16-mixed": bnlab_stepper("bf16-mixed")}
    times: dict[str, list[float]] = {k: [] for k in configs}
    for name, step in configs.items():  # warm-up
        for i in range(3):
            step(x[i * BATCH:(i + 1) * BATCH], y[i * BATCH:(i + 1) * BATCH])
    for _ in range(args.rounds):
        for name, step in configs.items():
            for i in range(args.steps):
                j = i % 8
                xb, yb = x[j * BATCH:(j + 1) * BATCH], y[j * BATCH:(j + 1) * BATCH]
                t0 = time.perf_counter()
                step(xb, yb)
                times[name].append(time.perf_counter() - t0)
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    amx = "amx_tile" in open("/proc/cpuinfo").read() if __import__("os").path.exists("/proc/cpuinfo") else False
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, AMX tiles: {'yes' if amx else 'no'}")
    for k, v in ms.items():
        extra = f" ({configs[k].engine} engine)" if hasattr(configs[k], "engine") else ""
        print(f"  {k:28s} {v:7.1f} ms/step{extra}")
    a, b, c, d = ms["plain fp32"], ms["plain channels_last+bf16"], ms["bnlab fp32"], ms["bnlab bf16-mixed"]
    print(f"bnlab fp32 / plain fp32          = {c / a:.2f} (goal <= 0.9)")
    print(f"bnlab bf16-mixed / plain fp32    = {d / a:.2f} (goal <= 0.30)")
    print(f"bnlab bf16-mixed / best plain    = {d / b:.2f} (goal <= 0.6)")


if __name__ == "__main__":
    main()
