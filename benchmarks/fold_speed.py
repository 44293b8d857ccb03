"""Folded vs unfolded inference on CPU: latency at batch 1 and throughput at batch 256, for the seed
MLPs and seed 002's CNN with BN, measured in one run (interleaved, best of N).

    .venv/bin/python benchmarks/fold_speed.py [--repeats 30]

Prints, per model, seconds per batch unfolded with bnlab's BN, unfolded with torch.nn.BatchNorm*d
(native kernels), and folded, with the ratios folded / unfolded (below 1 = folding is faster).
The literature reports 2-8 % on CPU for large CNNs (against native BN).
"""

from __future__ import annotations

import argparse

import torch

from bnlab.deploy import fold
from bnlab.models import build_model, load_model_spec
from bnlab.nn import BatchNorm
from bnlab.timing import interleaved_best_times

MODELS = ("fashion-mlp-bn-before", "fashion-mlp-bn-after", "cifar100-cnn-bn")


def with_torch_bn(model):
    """The same network with torch.nn.BatchNorm1d/2d (native kernels) in place of bnlab's BN."""
    import copy

    out = copy.deepcopy(model)
    for name, m in list(out.named_children()):
        if isinstance(m, BatchNorm):
            cls = torch.nn.BatchNorm2d if isinstance(getattr(out, name), BatchNorm) and any(
                isinstance(c, torch.nn.Conv2d) for c in out.children()) else torch.nn.BatchNorm1d
            tbn = cls(m.num_features, eps=m.eps)
            tbn.load_state_dict(m.state_dict())
            setattr(out, name, tbn)
    return out.eval()


def prepared(name: str):
    model = build_model(load_model_spec(name), seed=0)
    model.train()
    with torch.no_grad():  # realistic running statistics
        for _ in range(3):
            model(torch.randn(32, *model.spec.input_shape))
    model.eval()
    return model, with_torch_bn(model), fold(model)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPU, torch.inference_mode")
    print(f"{'model':24s} {'batch':>5s} {'bnlab_bn_s':>12s} {'torch_bn_s':>12s} {'folded_s':>12s} "
          f"{'folded/bnlab':>12s} {'folded/torch':>12s}")
    for name in MODELS:
        model, native, folded = prepared(name)
        n_bn = sum(isinstance(m, BatchNorm) for m in model.modules())
        for batch in (1, 256):
            x = torch.randn(batch, *model.spec.input_shape)
            with torch.inference_mode():
                t = interleaved_best_times({"bnlab": lambda: model(x), "torch": lambda: native(x),
                                            "folded": lambda: folded(x)},
                                           repeats=args.repeats if batch == 1 else max(5, args.repeats // 3))
            print(f"{name:24s} {batch:5d} {t['bnlab']:12.6f} {t['torch']:12.6f} {t['folded']:12.6f} "
                  f"{t['folded'] / t['bnlab']:12.3f} {t['folded'] / t['torch']:12.3f}   ({n_bn} BN layers)")


if __name__ == "__main__":
    main()
