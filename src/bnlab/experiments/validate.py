"""Checks of an experiment against its data, made before anything is stored or spawned."""

from __future__ import annotations

import torch

from bnlab.experiments.spec import RunPlan, SpecError


def check_models_fit(plans: list[RunPlan], data) -> None:
    """Every variant's model, adapted to the data's input shape and class count as a run adapts it,
    must take a batch of the data: built on that shape and run forward on two training examples.
    A model that cannot (a CNN on feature vectors, a kernel or pooling larger than the image) is a
    SpecError naming the variant, so no run starts that would only fail."""
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
            with torch.no_grad():
                out = model.train()(x.to(next(model.parameters()).dtype))
            if tuple(out.shape) != (len(x), data.num_classes):
                raise ValueError(f"it gives outputs of shape {tuple(out.shape)} for a batch of {len(x)}, "
                                 f"expected ({len(x)}, {data.num_classes})")
        except (RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            problems.append(f"  variants.{plan.variant}: the model cannot take the data of {data.name!r} "
                            f"(inputs of shape {tuple(data.input_shape)}): {first}")
    if problems:
        raise SpecError("the experiment cannot run on its data:\n" + "\n".join(problems))
