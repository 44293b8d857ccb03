"""bnlab.nn.BatchNorm vs torch.nn.BatchNorm2d: forward+backward time on CPU, as a ratio.

Both are timed in the same run, interleaved, best of N. Goal: ratio <= 1.5.

    .venv/bin/python benchmarks/bn_layer_speed.py [--shape 128 64 32 32] [--repeats 20]
"""

from __future__ import annotations

import argparse

import torch

from bnlab.verify import speed_check


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=4, default=[128, 64, 32, 32])
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    r = speed_check(tuple(args.shape), repeats=args.repeats)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, shape {r.shape} float32")
    print(f"bnlab_s={r.bnlab_s:.5f}")
    print(f"torch_s={r.torch_s:.5f}")
    print(f"ratio={r.ratio:.3f} (goal <= {r.goal})")


if __name__ == "__main__":
    main()
