"""The typed configuration of one training run, and the default recipe of each model preset."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictFloat, StrictInt,
                      field_validator)

from bnlab.probes import ProbeConfig
from bnlab.train.optim import LR_SCHEDULES


# bounds that keep a run possible: a typo such as 1e12 epochs is refused before anything starts
MAX_EPOCHS = 100_000
MAX_BATCH = 1 << 20
MAX_STEPS = 10**9
MAX_SEED = 2**31 - 1
MAX_VALIDATION = 10**8
# the largest learning rate (and weight decay) accepted: enough to study divergence (the tests make runs
# diverge with 1e12), far below float32's 3.4e38, where the update itself overflows ("value cannot be
# converted to type float without overflow": a failed run, not a diverged one)
MAX_LR = 1e12
DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]{1,2})?)$"


# Numbers are strict everywhere a spec is read: a boolean is not an integer (``epochs = true``), a string
# is not a number (``lr = "0.1"``), a float is not an integer (``epochs = 2.0``); an integer is a float
# (``lr = 1``). pydantic's Strict* types, which name what was expected ("Input should be a valid integer").


def _validation_value(v):
    """``validation``: None (the dataset's default), a count of images (an int >= 1: the first N of the
    training split) or a fraction (a float strictly between 0 and 1, split off seeded and stratified).
    1.0 is refused as ambiguous (one image, or the whole split?), as is any other integral float >= 1."""
    rule = (f"expected a count of images (an integer from 1 to {MAX_VALIDATION:,}, e.g. 5000) or a fraction "
            "of the training split (a number strictly between 0 and 1, e.g. 0.2)")
    if v is None:
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"{rule}, not a {type(v).__name__}")
    if isinstance(v, int):
        if not 1 <= v <= MAX_VALIDATION:
            raise ValueError(f"{rule}; a count must be from 1 to {MAX_VALIDATION:,}")
        return v
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"{rule}; a finite number is needed")
    if v == 1.0:
        raise ValueError(f"{rule}; 1.0 is ambiguous: write 1 for one image, or a fraction below 1")
    if v >= 1 and v.is_integer():
        raise ValueError(f"{rule}; a count is written as an integer ({int(v)}), a float is a fraction")
    if not 0 < v < 1:
        raise ValueError(f"{rule}; a fraction must be strictly between 0 and 1")
    return v


# the one rule for ``validation`` wherever it is read (TrainConfig, an experiment's [data] and its fallback)
Validation = Annotated[StrictInt | StrictFloat | None, BeforeValidator(_validation_value)]


class AugmentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    shear_range: StrictFloat = Field(0.0, ge=0, description="degrees, as Keras")
    zoom_range: StrictFloat = Field(0.0, ge=0, lt=1)
    horizontal_flip: StrictBool = False


def _all_corruptions() -> list[str]:
    from bnlab.data.corrupt import CORRUPTIONS

    return list(CORRUPTIONS)


def _all_test_batches() -> list[int]:
    from bnlab.deploy.shift import TEST_BATCH_SIZES

    return list(TEST_BATCH_SIZES)


class ShiftConfig(BaseModel):
    """The distribution-shift evaluation of a run's final model (``bnlab.deploy.shift.shift_grid``; the
    ``bn-shift`` study): every corruption at every severity, BN with each statistics option, and test-batch
    statistics at each test batch size."""

    model_config = ConfigDict(extra="forbid")
    corruptions: list[str] = Field(default_factory=_all_corruptions, min_length=1,
                                   description="names from bnlab.data.corrupt.CORRUPTIONS (default: all)")
    severities: list[StrictInt] = Field([1, 2, 3], min_length=1, description="from bnlab.data.corrupt.SEVERITIES")
    test_batch_sizes: list[Annotated[StrictInt, Field(ge=1, le=MAX_BATCH)]] = Field(
        default_factory=_all_test_batches, description="test batches for BN's test-batch statistics ([]: none)")
    test_images: StrictInt | None = Field(None, ge=1, le=10**8, description="None: the whole test set; N: its first N")
    seed: StrictInt = Field(0, ge=0, le=MAX_SEED, description="of the corruptions' random draws: the same in every run")

    @field_validator("corruptions")
    @classmethod
    def _corruptions(cls, v):
        from bnlab.data.corrupt import CORRUPTIONS

        return _known(v, CORRUPTIONS, "corruptions", lambda bad: f"unknown corruption(s) {', '.join(map(repr, bad))}: "
                      f"expected names from {', '.join(CORRUPTIONS)}")

    @field_validator("severities")
    @classmethod
    def _severities(cls, v):
        from bnlab.data.corrupt import SEVERITIES

        return _known(v, SEVERITIES, "severities", lambda bad: f"severity {', '.join(map(str, bad))} unknown: "
                      f"expected values from {', '.join(map(str, SEVERITIES))}")

    @field_validator("test_batch_sizes")
    @classmethod
    def _batches(cls, v):
        return _distinct(v, "test_batch_sizes")


def _known(values: list, allowed, name: str, complaint) -> list:
    """``values`` if each is in ``allowed`` and none repeats; else a ValueError (``complaint(unknown ones)``)."""
    if bad := [v for v in values if v not in allowed]:
        raise ValueError(complaint(bad))
    return _distinct(values, name)


def _distinct(values: list, name: str) -> list:
    if len(set(values)) != len(values):
        raise ValueError(f"{name} must not repeat a value (got {values})")
    return values


OUTPUT_FIELDS = {"tensorboard", "csv_log"}  # TrainConfig fields that say what is written, not what is computed
# settings added after experiments were stored: left out of a run's settings while at their default, so
# a store written before they existed keeps its run keys (and resumes)
LATER_DEFAULTS = {"precision": "fp32", "devices": 1, "lr_schedule": "constant", "shift": None}


def later_defaults(config: "TrainConfig") -> set[str]:
    """The LATER_DEFAULTS fields ``config`` leaves at their default (to exclude from its settings)."""
    return {k for k, v in LATER_DEFAULTS.items() if getattr(config, k) == v}


class TrainConfig(BaseModel):
    """Everything besides the model that decides a run's result."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    dataset: str = "mnist-5k"
    data_dir: str | None = None
    # None: the dataset's default; a count (an int: the first N of the training split) or a fraction (a float
    # in (0, 1)); 1.0 is refused as ambiguous (_validation_value)
    validation: Validation = None
    scaling: Literal["none", "unit", "center", "standardize"] | None = None
    dataset_options: dict = {}
    optimizer: Literal["sgd", "rmsprop", "adam"] = "sgd"
    # finite and at most MAX_LR: huge values are a way to study divergence, an overflowing step is not
    lr: StrictFloat = Field(1e-3, gt=0)
    lr_schedule: Literal[LR_SCHEDULES] = Field(
        "constant", description="constant | cosine | step over the run's budget: bnlab.train.optim.scheduled_lr")
    momentum: StrictFloat = Field(0.0, ge=0, lt=1)
    nesterov: StrictBool = False
    weight_decay: StrictFloat = Field(0.0, ge=0)
    keras_defaults: StrictBool = True
    batch_size: StrictInt = Field(32, ge=1, le=MAX_BATCH)
    epochs: StrictInt = Field(10, ge=1, le=MAX_EPOCHS)
    seed: StrictInt = Field(0, ge=0, le=MAX_SEED)  # initial weights, shuffling, dropout, augmentation
    # the validation split: the same for every seed, so runs differ by training only
    data_seed: StrictInt = Field(0, ge=0, le=MAX_SEED)
    target_accuracy: StrictFloat | None = Field(None, gt=0, le=1)
    patience: StrictInt | None = Field(None, ge=1, le=MAX_EPOCHS)
    monitor: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    max_steps: StrictInt | None = Field(None, ge=1, le=MAX_STEPS)
    max_seconds: StrictFloat | None = Field(None, gt=0, le=10**8)
    augment: AugmentConfig | None = None
    engine: Literal["auto", "native", "fused", "autograd"] = "auto"
    precision: Literal["fp32", "bf16-mixed", "fp16-mixed"] = Field(
        "fp32", description="fp32 | bf16-mixed | fp16-mixed (CUDA only): bnlab.train.precision")
    probes: ProbeConfig | None = None
    # after training: the final model under distribution shift (None: not measured)
    shift: ShiftConfig | None = None
    devices: StrictInt = Field(1, ge=1, le=64, description="data-parallel processes (DDP; gloo on CPU, nccl on CUDA): "
                               "bnlab.train.distributed")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N")
    # outputs, not settings: they change no result, so a run's fingerprint leaves them out (OUTPUT_FIELDS)
    tensorboard: StrictBool = Field(False, description="write TensorBoard logs to <run folder>/tensorboard")
    csv_log: StrictBool = Field(False, description="write one row per epoch to <run folder>/epochs.csv")

    @field_validator("lr", "weight_decay")
    @classmethod
    def _step_size(cls, v, info):
        if v > MAX_LR:
            raise ValueError(f"expected a number > 0 and at most {MAX_LR:g}: a larger {info.field_name} overflows "
                             "float32 weights in the update itself instead of making the run diverge (values up "
                             f"to {MAX_LR:g} are accepted to study divergence)")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v):
        if not re.fullmatch(DEVICE_PATTERN, v):
            raise ValueError("expected auto, cpu, cuda or cuda:N")
        return v

    @field_validator("dataset_options")
    @classmethod
    def _options(cls, v, info):
        from bnlab.data import check_dataset_options

        dataset = info.data.get("dataset")
        return check_dataset_options(dataset, v) if dataset is not None else v


# the seed notebooks' settings for each model preset family
RECIPES: dict[str, dict] = {
    "fashion-": {"dataset": "fashion-mnist", "optimizer": "sgd", "lr": 1e-3, "batch_size": 32, "epochs": 10,
                 "validation": 5000},
    "mnist-": {"dataset": "mnist", "optimizer": "sgd", "lr": 1e-3, "batch_size": 32, "epochs": 10,
               "validation": 5000},
    "cifar100-": {"dataset": "cifar100", "optimizer": "rmsprop", "lr": 1e-3, "batch_size": 80, "epochs": 20,
                  "scaling": "center",
                  "augment": {"shear_range": 0.2, "zoom_range": 0.2, "horizontal_flip": True}},
    # Ioffe & Szegedy's 50,000 steps at batch 60: on MNIST's 55,000 training digits (917 steps an epoch) 55
    # epochs reach them and max_steps binds; on a smaller dataset (mnist-5k: 4,000 training digits, 67 steps an
    # epoch, 3,685 in 55 epochs, ~10 s here) the epochs bind and `bnlab train` says so (``budget_note``)
    "paper-": {"dataset": "mnist", "optimizer": "sgd", "lr": 0.5, "batch_size": 60, "epochs": 55, "max_steps": 50000,
               "validation": 5000},
}


def steps_per_epoch(train_examples: int, batch_size: int) -> int:
    """Optimizer steps in one epoch: every example once, the last batch partial (ceil)."""
    return -(-int(train_examples) // int(batch_size))


def budget_note(epochs: int, max_steps: int | None, per_epoch: int) -> str | None:
    """Which budget binds when a run sets both: None when max_steps is unset or reached within ``epochs``
    (then it binds, and the run stops at max_steps); else the sentence saying the epochs bind and
    max_steps is never reached, so a small epoch count never hides behind a large step budget."""
    if max_steps is None or per_epoch < 1 or epochs * per_epoch >= max_steps:
        return None
    need = -(-max_steps // per_epoch)
    return (f"training stops after {epochs} epoch{'s' if epochs != 1 else ''} ({epochs * per_epoch:,} steps, "
            f"{per_epoch:,} an epoch); max_steps {max_steps:,} is never reached (it needs {need:,} epochs: "
            f"pass --epochs {need:,} for that budget)")


def recipe_for(model_name: str) -> dict:
    """Default training settings for a model preset (empty for spec files)."""
    return next((dict(r) for prefix, r in RECIPES.items() if model_name.startswith(prefix)), {})
