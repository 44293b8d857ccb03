"""The built-in verification behind ``bnlab check``.

Each check returns rows of (check, measured error, tolerance, passed). Errors are max-norm
relative errors, max|a - b| / max(max|a|, max|b|) (see ``bnlab.reference.relative_error``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bnlab import reference as ref
from bnlab.nn import BatchNorm
from bnlab.timing import interleaved_best_times

GRADCHECK_TOL = 1e-7  # float64 central differences
TORCH_TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
SPEED_GOAL = 1.5  # bnlab fwd+bwd time / torch.nn.BatchNorm2d time


@dataclass(frozen=True)
class CheckRow:
    group: str  # e.g. "vs torch.nn.BatchNorm (float32)"
    case: str  # e.g. "(32, 16, 8, 8) momentum=0.1"
    quantity: str  # e.g. "dx"
    value: float
    tolerance: float
    passed: bool


def _row(group: str, case: str, quantity: str, value: float, tol: float) -> CheckRow:
    return CheckRow(group, case, quantity, value, tol, bool(np.isfinite(value) and value <= tol))


GRADCHECK_CASES = {
    "(N,C)": ((16, 4), 1),
    "(N,C,L)": ((6, 3, 5), 1),
    "(N,C,H,W)": ((4, 3, 3, 3), 1),
    "(N,H,W,C) axis=-1": ((4, 3, 3, 2), -1),
}


def reference_gradient_checks(seed: int = 0) -> list[CheckRow]:
    """Central-difference checks of the NumPy reference in float64, and compact vs staged."""
    rng = np.random.default_rng(seed)
    rows = []
    for label, (shape, axis) in GRADCHECK_CASES.items():
        c = shape[axis]
        x = rng.standard_normal(shape) * 2.0 + 0.5
        gamma, beta = rng.standard_normal(c), rng.standard_normal(c)
        errs = ref.check_batch_norm_gradients(x, gamma, beta, eps=1e-5, axis=axis, seed=seed)
        for quantity, err in errs.items():
            rows.append(_row("reference gradient check (float64)", label, quantity, err, GRADCHECK_TOL))
        y, cache = ref.batch_norm_forward(x, gamma, beta, eps=1e-5, axis=axis)
        dy = rng.standard_normal(y.shape)
        compact = ref.batch_norm_backward(dy, cache)
        staged = ref.batch_norm_backward_staged(dy, cache)
        err = max(ref.relative_error(a, b) for a, b in zip(compact, staged))
        rows.append(_row("reference gradient check (float64)", label, "compact=staged", err, 1e-12))
    return rows


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ref.relative_error(a.detach().double().cpu().numpy(), b.detach().double().cpu().numpy())


def compare_with_torch(shape: tuple[int, ...], *, dtype=torch.float32, momentum: float | None = 0.1,
                       steps: int = 3, seed: int = 0) -> dict[str, float]:
    """Run ``steps`` training steps then one eval step through bnlab and torch BatchNorm with the
    same inputs and parameters; return the worst relative error of each quantity."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    ours = BatchNorm(c, momentum=momentum, dtype=dtype)
    theirs = (torch.nn.BatchNorm1d if len(shape) < 4 else torch.nn.BatchNorm2d)(
        c, momentum=momentum, dtype=dtype)
    with torch.no_grad():
        w, b = torch.randn(c, generator=g, dtype=dtype), torch.randn(c, generator=g, dtype=dtype)
        for m in (ours, theirs):
            m.weight.copy_(w)
            m.bias.copy_(b)
    errs: dict[str, float] = {}

    def worst(key: str, value: float) -> None:
        errs[key] = max(errs.get(key, 0.0), value)

    for _ in range(steps):
        x = torch.randn(shape, generator=g, dtype=dtype) * 3 + 1
        dy = torch.randn(shape, generator=g, dtype=dtype)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        ya.backward(dy)
        yb.backward(dy)
        worst("y", _rel(ya, yb))
        worst("dx", _rel(xa.grad, xb.grad))
        worst("dgamma", _rel(ours.weight.grad, theirs.weight.grad))
        worst("dbeta", _rel(ours.bias.grad, theirs.bias.grad))
        worst("running_mean", _rel(ours.running_mean, theirs.running_mean))
        worst("running_var", _rel(ours.running_var, theirs.running_var))
        for m in (ours, theirs):
            m.zero_grad()
    if int(ours.num_batches_tracked) != int(theirs.num_batches_tracked):
        errs["num_batches_tracked"] = float("inf")
    ours.eval()
    theirs.eval()
    x = torch.randn(shape, generator=g, dtype=dtype)
    with torch.no_grad():
        worst("eval y", _rel(ours(x), theirs(x)))
    return errs


def torch_agreement_checks() -> list[CheckRow]:
    rows = []
    cases = [((64, 20), 0.1), ((16, 8, 12), None), ((32, 16, 8, 8), 0.1)]
    for dtype in (torch.float32, torch.float64):
        for shape, momentum in cases:
            errs = compare_with_torch(shape, dtype=dtype, momentum=momentum)
            for key, value in errs.items():
                rows.append(_row(f"vs torch.nn.BatchNorm ({str(dtype).removeprefix('torch.')})",
                                 f"{shape} momentum={momentum}", key, value, TORCH_TOL[dtype]))
    return rows


def keras_rule_checks(seed: int = 0) -> list[CheckRow]:
    """bnlab's keras convention against the documented Keras 3 rule computed by the reference."""
    rng = np.random.default_rng(seed)
    layer = BatchNorm(6, convention="keras", dtype=torch.float64)
    mean, var = np.zeros(6), np.ones(6)
    errs = []
    for _ in range(4):
        x = rng.standard_normal((10, 6)) * 2 + 1
        y = layer(torch.from_numpy(x)).detach().numpy()
        y_ref, cache = ref.batch_norm_forward(x, None, None, eps=1e-3)
        mean, var = ref.update_running_stats(mean, var, cache.mean, cache.var, count=10,
                                             momentum=0.99, convention="keras")
        errs.append(max(ref.relative_error(y, y_ref),
                        ref.relative_error(layer.running_mean.numpy(), mean),
                        ref.relative_error(layer.running_var.numpy(), var)))
    return [_row("keras convention vs its documented rule (float64)", "(10, 6), 4 steps",
                 "y, moving stats", max(errs), 1e-12)]


STEP_SPECS = {
    "relu, input BN + BN before": {"hidden": [10, 7], "bn": "before", "input_bn": True},
    "sigmoid, BN after": {"hidden": [9], "bn": "after", "activation": "sigmoid"},
    "elu, keras BN": {"hidden": [6], "bn": "after", "activation": "elu", "norm_options": {"convention": "keras"}},
}


def training_step_checks(seed: int = 0, steps: int = 3) -> list[CheckRow]:
    """The engine's fused and native MLP steps, and the fused CNN step, against the ordinary autograd
    step (float64): the weights and running statistics after a few plain-SGD steps, and the losses on
    the way."""
    from bnlab.train import native
    from bnlab.train.fused import FusedMLPStep

    kinds = {"fused": FusedMLPStep}
    if native.load() is not None:
        kinds["native"] = native.NativeMLPStep
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(16, 12, generator=g, dtype=torch.float64) * 2 + 0.5,
                torch.randint(0, 3, (16,), generator=g)) for _ in range(steps)]
    rows = []
    for label, spec in STEP_SPECS.items():
        rows += _step_rows(label, {**spec, "input_shape": [12], "num_classes": 3}, batches, kinds, seed)
    # the fused step on a CNN (channels_last, BN on feature maps, max-pooling); the native step is for MLPs
    images = [(torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))
              for _ in range(steps)]
    cnn = {"kind": "cnn", "input_shape": [3, 8, 8], "num_classes": 3, "blocks": [4], "final_block": 4,
           "bn": "before", "norm_options": {"convention": "keras"}}
    return rows + _step_rows("CNN, BN before ReLU, keras convention", cnn, images, {"fused": FusedMLPStep}, seed)


def _step_rows(label: str, spec: dict, batches, kinds: dict, seed: int) -> list[CheckRow]:
    from bnlab.models import build_model
    from bnlab.train.engine import AutogradStep

    rows = []
    ref_model = build_model(spec, seed=seed).double()
    ref_step = AutogradStep(ref_model)
    ref_losses = []
    for x, y in batches:
        ref_losses.append(float(ref_step(x, y)[0]))
        with torch.no_grad():
            for p in ref_model.parameters():
                p -= 0.05 * p.grad
    for kind, step_cls in kinds.items():
        model = build_model(spec, seed=seed).double()
        step = step_cls(model, sgd_lr=0.05)
        losses = [float(step(x, y)[0]) for x, y in batches]
        # per tensor, max|a - b| / max(1, max|b|): a parameter whose true gradient is exactly 0
        # (the input BN's beta when another BN follows) holds only rounding noise in both
        state = max(float((a - b).abs().max()) / max(1.0, float(b.abs().max())) for a, b in
                    zip(model.state_dict().values(), ref_model.state_dict().values()) if a.is_floating_point())
        rows.append(_row("training step vs autograd (float64, |a - b| / max(1, |b|))", f"{kind}: {label}", "weights, stats",
                         state, TORCH_TOL[torch.float64]))
        rows.append(_row("training step vs autograd (float64, |a - b| / max(1, |b|))", f"{kind}: {label}", "losses",
                         ref.relative_error(np.array(losses), np.array(ref_losses)), TORCH_TOL[torch.float64]))
    return rows


def speed_ratio(shape=(128, 64, 32, 32), repeats: int = 10) -> tuple[float, float, float]:
    """(bnlab seconds, torch seconds, ratio) for forward+backward of BN on a CNN-sized tensor."""
    x = torch.randn(shape, requires_grad=True)
    dy = torch.randn(shape)
    ours, theirs = BatchNorm(shape[1]), torch.nn.BatchNorm2d(shape[1])

    def step(module):
        def run():
            module(x).backward(dy)
        return run

    t = interleaved_best_times({"bnlab": step(ours), "torch": step(theirs)}, repeats=repeats)
    return t["bnlab"], t["torch"], t["bnlab"] / t["torch"]


@dataclass(frozen=True)
class SpeedResult:
    shape: tuple[int, ...]
    bnlab_s: float
    torch_s: float
    ratio: float
    goal: float = SPEED_GOAL


def correctness_checks() -> list[CheckRow]:
    return reference_gradient_checks() + torch_agreement_checks() + keras_rule_checks() + training_step_checks()


def speed_check(shape=(128, 64, 32, 32), repeats: int = 10) -> SpeedResult:
    """Reported, not a pass/fail correctness check: timings depend on the machine's load."""
    return SpeedResult(tuple(shape), *speed_ratio(shape, repeats))
