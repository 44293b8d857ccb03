"""One training run from a model spec and a TrainConfig, with its results written to a folder."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bnlab.data import load_dataset
from bnlab.data.augment import RandomAffine
from bnlab.models import build_model, parse_model_spec
from bnlab.models.spec import spec_to_dict
from bnlab.train.config import TrainConfig
from bnlab.train.engine import evaluate, fit
from bnlab.train.history import History


@dataclass
class RunResult:
    history: History
    test_loss: float
    test_accuracy: float
    spec: dict
    config: TrainConfig
    notes: list[str]
    out: Path | None


def adapt_spec_to_data(spec, input_shape: tuple[int, ...], num_classes: int):
    """The spec with the dataset's input shape and class count, and notes on what changed."""
    notes = []
    changes = {}
    if tuple(spec.input_shape) != tuple(input_shape):
        notes.append(f"input shape {tuple(spec.input_shape)} -> {tuple(input_shape)} to fit the dataset")
        changes["input_shape"] = tuple(input_shape)
    if spec.num_classes != num_classes:
        notes.append(f"num_classes {spec.num_classes} -> {num_classes} to fit the dataset")
        changes["num_classes"] = num_classes
    return (spec.model_copy(update=changes) if changes else spec), notes


def train_run(spec, config: TrainConfig, *, out: str | Path | None = None, progress: bool = True) -> RunResult:
    """Load the data, build the model (adapted to the data), fit, evaluate on test, save."""
    data = load_dataset(config.dataset, data_dir=config.data_dir, validation=config.validation,
                        scaling=config.scaling, seed=config.data_seed, **config.dataset_options)
    spec, notes = adapt_spec_to_data(parse_model_spec(spec), data.input_shape, data.num_classes)
    model = build_model(spec, seed=config.seed)
    out = Path(out) if out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        # the resolved config goes next to the results before training, so a crash keeps it
        (out / "run.json").write_text(json.dumps({"model": spec_to_dict(spec), "train": config.model_dump()},
                                                 indent=2))
    aug = RandomAffine(**config.augment.model_dump()) if config.augment else None
    hist = fit(model, data, optimizer=config.optimizer, lr=config.lr, momentum=config.momentum,
               nesterov=config.nesterov, weight_decay=config.weight_decay, batch_size=config.batch_size,
               epochs=config.epochs, seed=config.seed, target_accuracy=config.target_accuracy, augment=aug,
               engine=config.engine, device=config.device, checkpoint_dir=out / "checkpoint" if out else None,
               monitor=config.monitor, patience=config.patience, max_steps=config.max_steps,
               max_seconds=config.max_seconds, probes=config.probes, progress=progress,
               keras_defaults=config.keras_defaults, checkpoint_meta={"train": config.model_dump()})
    test_loss, test_acc = evaluate(model, data.x_test, data.y_test)
    if out is not None:
        (out / "history.json").write_text(json.dumps(
            {**hist.to_dict(), "test_loss": test_loss, "test_accuracy": test_acc, "notes": notes}, indent=2))
    return RunResult(hist, test_loss, test_acc, spec_to_dict(spec), config, notes, out)
