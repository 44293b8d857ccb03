"""Learning-rate schedules: the rate of each update against torch's own schedulers, and a whole run
against a plain torch loop driven by torch.optim.lr_scheduler (the independent oracle)."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from bnlab.data import load_dataset
from bnlab.models import build_model
from bnlab.train.config import TrainConfig, later_defaults
from bnlab.train.engine import batch_bounds, fit
from bnlab.train.optim import planned_updates, scheduled_lr

TOTAL = 40


def _torch_rates(schedule: str, lr: float = 0.2, total: int = TOTAL) -> list[float]:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total) if schedule == "cosine" else
             torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[total // 2, 3 * total // 4], gamma=0.1))
    rates = []
    for _ in range(total):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return rates


@pytest.mark.parametrize("schedule", ["cosine", "step"])
def test_rates_match_torch_schedulers(schedule):
    ours = [scheduled_lr(0.2, schedule, t, TOTAL) for t in range(TOTAL)]
    assert ours == pytest.approx(_torch_rates(schedule), rel=1e-12, abs=1e-15)


def test_rate_edges():
    assert [scheduled_lr(0.3, "constant", t, 10) for t in (0, 9, 50)] == [0.3] * 3
    assert scheduled_lr(0.3, "cosine", 0, 10) == 0.3
    assert scheduled_lr(0.3, "cosine", 5, 10) == pytest.approx(0.15)
    assert scheduled_lr(0.3, "cosine", 10, 10) == pytest.approx(0.0, abs=1e-17)
    assert scheduled_lr(0.3, "cosine", 99, 10) == pytest.approx(0.0, abs=1e-17)  # past the budget: stays at the end
    assert [scheduled_lr(1.0, "step", t, 8) for t in (3, 4, 5, 6, 7)] == pytest.approx([1, 0.1, 0.1, 0.01, 0.01])
    assert planned_updates(3, 20, None) == 60 and planned_updates(3, 20, 45) == 45 and planned_updates(3, 20, 99) == 60
    with pytest.raises(ValueError, match="unknown lr schedule 'linear'"):
        scheduled_lr(0.1, "linear", 0, 10)


def test_config_checks_the_schedule_and_keeps_old_fingerprints():
    with pytest.raises(ValidationError, match="lr_schedule"):
        TrainConfig(lr_schedule="exponential")
    assert "lr_schedule" in later_defaults(TrainConfig())
    assert "lr_schedule" not in later_defaults(TrainConfig(lr_schedule="cosine"))


def _plain_loop(model, data, *, lr, momentum, batch_size, epochs, seed, schedule):
    """What a PyTorch user writes: bnlab's seeded data order (a generator seeded by the run seed),
    torch.optim.SGD and torch's scheduler stepped after every update."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    n = len(data.y_train)
    bounds = batch_bounds(n, batch_size)
    total = epochs * len(bounds)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total) if schedule == "cosine" else
             torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[math.ceil(total / 2), math.ceil(3 * total / 4)],
                                                  gamma=0.1))
    order = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=order)
        for i, j in bounds:
            idx = perm[i:j]
            opt.zero_grad()
            F.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
            opt.step()
            sched.step()
    return model


@pytest.mark.parametrize("schedule,momentum", [("cosine", 0.9), ("step", 0.0), ("cosine", 0.0)])
def test_a_scheduled_run_equals_a_plain_torch_loop(schedule, momentum):
    """bnlab's run (MLP with BN; plain SGD would otherwise take the fused step that applies a constant
    rate itself) against the plain loop: the same weights to float32 rounding."""
    data = load_dataset("digits")
    spec = {"input_shape": [1, 8, 8], "hidden": [16], "bn": "before"}
    ours = build_model(spec, seed=4)
    theirs = copy.deepcopy(ours)
    kw = dict(lr=0.2, momentum=momentum, batch_size=64, epochs=3)
    fit(ours, data, seed=4, lr_schedule=schedule, progress=False, **kw)
    _plain_loop(theirs, data, seed=4, schedule=schedule, **kw)
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        assert torch.allclose(a.double(), b.double(), rtol=1e-4, atol=1e-5), name
    constant = build_model(spec, seed=4)
    fit(constant, data, seed=4, progress=False, **kw)
    assert not torch.allclose(constant[1].weight, ours[1].weight, atol=1e-3)  # the schedule did change the run


RENORM = {"kind": "cnn", "input_shape": [1, 8, 8], "blocks": [4], "final_block": 6, "bn": "before", "norm": "renorm"}


def test_renorm_warmup_as_a_share_of_the_run_equals_the_same_warmup_in_steps():
    """warmup_fraction f over a run of N updates is warmup_steps round(f N): same weights, bit for bit."""
    from bnlab.models.spec import spec_to_dict
    from bnlab.models import parse_model_spec
    from bnlab.nn.norms import BatchRenorm

    data = load_dataset("digits")
    kw = dict(lr=0.05, momentum=0.9, batch_size=64, epochs=2, seed=1, progress=False, engine="autograd")
    updates = 2 * len(batch_bounds(len(data.y_train), 64))
    share = build_model({**RENORM, "norm_options": {"warmup_fraction": 0.3}}, seed=1)
    steps = build_model({**RENORM, "norm_options": {"warmup_steps": round(0.3 * updates)}}, seed=1)
    fit(share, data, **kw)
    fit(steps, data, **kw)
    layers = [m for m in share.modules() if isinstance(m, BatchRenorm)]
    assert layers and all(m.warmup_steps == round(0.3 * updates) for m in layers)
    for (name, a), b in zip(share.state_dict().items(), steps.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    fit(build_model({**RENORM, "norm_options": {"warmup_fraction": 0.3}}, seed=1), data,
        **{**kw, "epochs": 4, "max_steps": 30})  # a step budget is the run's length
    # the default leaves stored fingerprints as they were
    assert "warmup_fraction" not in spec_to_dict(parse_model_spec(RENORM))["norm_options"]


def test_a_renorm_warmup_share_outside_fit_asks_for_the_run_length():
    from bnlab.nn.norms import BatchRenorm, plan_run_length

    layer = BatchRenorm(3, warmup_fraction=0.5).train()
    with pytest.raises(RuntimeError, match="plan_run_length"):
        layer(torch.randn(8, 3))
    plan_run_length(torch.nn.Sequential(layer), 10)
    assert layer.warmup_steps == 5 and layer.limits() == (1.0, 0.0)
    layer(torch.randn(8, 3))
    assert layer.limits() == pytest.approx((1.0 + 2.0 / 5, 5.0 / 5))
    with pytest.raises(ValueError, match="warmup_fraction must be in"):
        BatchRenorm(3, warmup_fraction=1.5)


def test_an_experiment_with_a_renorm_warmup_share_passes_the_model_check():
    from bnlab.experiments.spec import expand, parse_experiment
    from bnlab.experiments.validate import check_models_fit
    spec = parse_experiment({"name": "w", "seeds": 1, "model": {**RENORM, "norm_options": {"warmup_fraction": 0.25}},
                             "data": {"dataset": "digits"}, "variants": {"a": {}}})
    check_models_fit(expand(spec), load_dataset("digits"))  # raised before plan_run_length was called there


def test_a_renorm_warmup_is_given_once():
    from bnlab.models import parse_model_spec
    with pytest.raises(ValidationError, match=r"warmup_steps \(10\) or warmup_fraction \(0.5\), not both"):
        parse_model_spec({**RENORM, "norm_options": {"warmup_fraction": 0.5, "warmup_steps": 10}})
