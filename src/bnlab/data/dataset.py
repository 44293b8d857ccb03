"""A prepared dataset: tensors for train / validation / test, scaled with train statistics."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch

Scaling = Literal["none", "unit", "center", "standardize"]
SCALINGS = ("none", "unit", "center", "standardize")


@dataclass(frozen=True)
class RawData:
    """Arrays as a source provides them: x (N, ...) uint8 or float, y (N,) integer labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    pixel_max: float | None = None  # 255 for 8-bit images, 16 for sklearn digits, None for features
    classes: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Dataset:
    """Tensors on one device; x float32 (N, *input_shape), y int64 (N,)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    classes: tuple[str, ...] | None = None
    preprocessing: dict = field(default_factory=dict)  # what was fitted on train, to redo at predict

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def to(self, device: str | torch.device) -> "Dataset":
        move = {k: getattr(self, k).to(device) for k in
                ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")}
        return replace(self, **move)

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, input_shape={self.input_shape}, classes={self.num_classes}, "
                f"train={len(self.y_train)}, val={len(self.y_val)}, test={len(self.y_test)}, "
                f"scaling={self.preprocessing.get('scaling')!r})")


def split_validation(x: np.ndarray, y: np.ndarray, validation: int | float, seed: int):
    """int n: the first n training examples (as the seed notebooks do); float f: a seeded,
    stratified random fraction f. Returns (x_train, y_train, x_val, y_val)."""
    n = len(y)
    if isinstance(validation, bool) or not isinstance(validation, (int, float)):
        raise TypeError(f"validation must be an int count or a float fraction (got {validation!r})")
    if isinstance(validation, int):
        if not 0 <= validation < n:
            raise ValueError(f"validation count must be in [0, {n}) for {n} training examples (got {validation})")
        return x[validation:], y[validation:], x[:validation], y[:validation]
    if not 0.0 < validation < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1) (got {validation})")
    rng = np.random.default_rng(seed)
    val_idx = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        k = int(round(len(idx) * validation))
        val_idx.append(rng.choice(idx, size=k, replace=False))
    val = np.sort(np.concatenate(val_idx))
    if val.size == 0 or n - val.size < 2:  # a fraction that rounds to nothing (1e-300) or to everything
        raise ValueError(f"validation fraction {validation:g} of {n} training examples gives {val.size} validation "
                         f"and {n - val.size} training examples (rounded per class): expected at least 1 validation "
                         "and 2 training examples; use a fraction that leaves both, or a count")
    mask = np.ones(n, bool)
    mask[val] = False
    return x[mask], y[mask], x[val], y[val]


def fit_scaling(x_train: np.ndarray, scaling: str, pixel_max: float | None) -> dict:
    """Statistics of the TRAINING split only; applied unchanged to every split."""
    if scaling not in SCALINGS:
        raise ValueError(f"unknown scaling {scaling!r}: expected one of {SCALINGS}")
    unit = float(pixel_max) if pixel_max and scaling != "none" else 1.0
    params: dict = {"scaling": scaling, "divide": unit}
    xs = x_train.astype(np.float64) / unit
    if scaling == "center":
        params["mean"] = float(xs.mean())  # one scalar, as seed 002 (but from train only)
    elif scaling == "standardize":
        axes = tuple(i for i in range(xs.ndim) if i != 1) if xs.ndim > 2 else (0,)
        params["mean"] = xs.mean(axis=axes).tolist()  # per channel (images) or per feature
        params["std"] = np.maximum(xs.std(axis=axes), 1e-8).tolist()
    return params


def apply_scaling(x: np.ndarray, params: dict) -> np.ndarray:
    out = x.astype(np.float32) / np.float32(params["divide"])
    if params["scaling"] == "center":
        out -= np.float32(params["mean"])
    elif params["scaling"] == "standardize":
        shape = (1, -1) + (1,) * (x.ndim - 2)
        out -= np.asarray(params["mean"], np.float32).reshape(shape)
        out /= np.asarray(params["std"], np.float32).reshape(shape)
    return out


def unscale(x: np.ndarray, params: dict) -> np.ndarray:
    """The inverse of ``apply_scaling``: raw values (as the source gives them) from scaled ones."""
    out = x.astype(np.float64)
    if params["scaling"] == "center":
        out += params["mean"]
    elif params["scaling"] == "standardize":
        shape = (1, -1) + (1,) * (x.ndim - 2)
        out = out * np.asarray(params["std"]).reshape(shape) + np.asarray(params["mean"]).reshape(shape)
    return (out * params["divide"]).astype(np.float32)


def prepare(name: str, raw: RawData, *, validation: int | float, scaling: str, seed: int = 0,
            device: str | torch.device = "cpu") -> Dataset:
    x_tr, y_tr, x_val, y_val = split_validation(raw.x_train, raw.y_train, validation, seed)
    params = fit_scaling(x_tr, scaling, raw.pixel_max)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(apply_scaling(a, params))).to(device)  # noqa: E731
    lab = lambda a: torch.from_numpy(np.asarray(a, np.int64)).to(device)  # noqa: E731
    return Dataset(name, t(x_tr), lab(y_tr), t(x_val), lab(y_val), t(raw.x_test), lab(raw.y_test),
                   raw.num_classes, raw.classes, {**params, "validation": validation, "seed": seed})
