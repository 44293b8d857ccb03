"""How long one run of the ``paper-mnist`` preset takes on this machine, on the data the preset would choose
here (MNIST if downloaded, else its fallback), with the preset's probes, in one process of one torch thread
(a runner worker's share on a 2-core machine). Also the same steps without probes, and K seeds stacked.

    .venv/bin/python benchmarks/paper_mnist_time.py [--steps 50000] [--variant bn] [--stacked 0]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from bnlab.experiments.spec import choose_data, expand, load_experiment
from bnlab.train.config import TrainConfig
from bnlab.train.single import train_run, train_runs_stacked


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=50000)
    p.add_argument("--variant", default="bn", choices=["bn", "no-bn"])
    p.add_argument("--no-probes", action="store_true", help="time the run without its probes")
    p.add_argument("--stacked", type=int, default=0, help="time this many seeds trained stacked instead")
    args = p.parse_args()
    torch.set_num_threads(1)
    spec, choice = choose_data(load_experiment("paper-mnist"))
    print(choice.note())
    plans = [pl for pl in expand(spec) if pl.variant == args.variant]

    def config(plan):
        return TrainConfig(**{**plan.train, "max_steps": args.steps,
                              **({"probes": None} if args.no_probes else {})})

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        if args.stacked:
            chosen = plans[:args.stacked]
            results = train_runs_stacked(chosen[0].model, [config(pl) for pl in chosen],
                                         [f"{tmp}/{pl.seed}" for pl in chosen])
            what = f"{len(chosen)} seeds stacked"
        else:
            results = [train_run(plans[0].model, config(plans[0]), out=f"{tmp}/run", progress=False)]
            what = f"one run ({results[0].history.engine} step)"
        seconds = time.perf_counter() - t0
    h = results[0].history
    print(f"{args.variant}, {what}, {h.epochs[-1].steps} steps in {len(h.epochs)} epochs, "
          f"{'no probes' if args.no_probes else f'{len(h.probes)} probe rows'}: {seconds:.1f} s "
          f"(test accuracy {results[0].test_accuracy:.4f})")


if __name__ == "__main__":
    main()
