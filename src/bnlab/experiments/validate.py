"""Checks of an experiment made before anything is stored or spawned: can every variant's model take the
experiment's data, and can its settings run here (``bnlab.train.runnable.check_runnable``)."""

from __future__ import annotations

import torch
from torch import nn

from bnlab.experiments.spec import RunPlan, SpecError
from bnlab.train.config import TrainConfig
from bnlab.train.runnable import check_runnable


def check_models_fit(plans: list[RunPlan], data, *, here: bool = True) -> None:
    """Every variant's model, adapted to the data's input shape and class count as a run adapts it,
    must take a batch of the data: built on that shape and run forward on two training examples; and
    its training settings must run here (``check_runnable``). A model that cannot (a CNN on feature
    vectors, a kernel or pooling larger than the image, BN at batch size 1) or a setting this machine
    cannot run (fp16-mixed without CUDA) is a SpecError naming the variant, so no run starts that would
    only fail. ``here=False``: the runs go to other machines (a Ray cluster), so this machine's devices
    decide nothing: only what holds everywhere is checked (the model and the data, batch size 1 under BN)."""
    from bnlab.models import build_model, parse_model_spec
    from bnlab.nn.norms import plan_run_length
    from bnlab.train.single import adapt_spec_to_data

    problems = []
    x = data.x_train[:2].cpu()
    for plan in {p.variant: p for p in plans}.values():  # one run per variant: the seed does not change shapes
        try:
            spec, _ = adapt_spec_to_data(parse_model_spec(plan.model), data.input_shape, data.num_classes)
            model = build_model(spec, seed=0)
            plan_run_length(model, 1)  # a training-mode forward: layers sized by the run's length need one
            xs = x.to(next(model.parameters()).dtype)
            with torch.no_grad():
                out = model.train()(xs)
            if tuple(out.shape) != (len(x), data.num_classes):
                raise ValueError(f"it gives outputs of shape {tuple(out.shape)} for a batch of {len(x)}, "
                                 f"expected ({len(x)}, {data.num_classes})")
        except (RuntimeError, ValueError) as e:
            lines = str(e).strip().splitlines() or [type(e).__name__]
            # the first line (torch's errors go on for pages), or a list a line announces ("cannot convert: ...")
            first = "\n    ".join(lines) if lines[0].endswith(":") else lines[0]
            problems.append(f"  variants.{plan.variant}: the model cannot take the data of {data.name!r} "
                            f"(inputs of shape {tuple(data.input_shape)}): {first}")
            continue
        config = TrainConfig(**plan.train)
        if not here:  # another machine's devices: only what holds on any (the batch for N processes, BN at 1)
            config = config.model_copy(update={"device": "cpu", "precision": "fp32"})
        problems += [f"  variants.{plan.variant}.train.{p}" for p in check_runnable(config, model, xs)]
    if problems:
        raise SpecError("the experiment cannot run on its data on this machine:\n" + "\n".join(problems))
