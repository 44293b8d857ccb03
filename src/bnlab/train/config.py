"""The typed configuration of one training run, and the default recipe of each model preset."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from bnlab.probes import ProbeConfig


class AugmentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shear_range: float = Field(0.0, ge=0, description="degrees, as Keras")
    zoom_range: float = Field(0.0, ge=0, lt=1)
    horizontal_flip: bool = False


class TrainConfig(BaseModel):
    """Everything besides the model that decides a run's result."""

    model_config = ConfigDict(extra="forbid")
    dataset: str = "mnist-5k"
    data_dir: str | None = None
    validation: int | float | None = None  # None: the dataset's default
    scaling: Literal["none", "unit", "center", "standardize"] | None = None
    dataset_options: dict = {}
    optimizer: Literal["sgd", "rmsprop", "adam"] = "sgd"
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0)
    keras_defaults: bool = True
    batch_size: int = Field(32, ge=1)
    epochs: int = Field(10, ge=1)
    seed: int = 0  # initial weights, shuffling, dropout, augmentation
    data_seed: int = 0  # the validation split: the same for every seed, so runs differ by training only
    target_accuracy: float | None = Field(None, gt=0, le=1)
    patience: int | None = Field(None, ge=1)
    monitor: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    max_steps: int | None = Field(None, ge=1)
    max_seconds: float | None = Field(None, gt=0)
    augment: AugmentConfig | None = None
    engine: Literal["auto", "native", "fused", "autograd"] = "auto"
    probes: ProbeConfig | None = None
    device: str = "auto"


# the seed notebooks' settings for each model preset family
RECIPES: dict[str, dict] = {
    "fashion-": {"dataset": "fashion-mnist", "optimizer": "sgd", "lr": 1e-3, "batch_size": 32, "epochs": 10,
                 "validation": 5000},
    "mnist-": {"dataset": "mnist", "optimizer": "sgd", "lr": 1e-3, "batch_size": 32, "epochs": 10,
               "validation": 5000},
    "cifar100-": {"dataset": "cifar100", "optimizer": "rmsprop", "lr": 1e-3, "batch_size": 80, "epochs": 20,
                  "scaling": "center",
                  "augment": {"shear_range": 0.2, "zoom_range": 0.2, "horizontal_flip": True}},
    "paper-": {"dataset": "mnist", "optimizer": "sgd", "lr": 0.5, "batch_size": 60, "epochs": 1, "max_steps": 50000,
               "validation": 5000},
}


def recipe_for(model_name: str) -> dict:
    """Default training settings for a model preset (empty for spec files)."""
    return next((dict(r) for prefix, r in RECIPES.items() if model_name.startswith(prefix)), {})
