import os
import sys
from pathlib import Path

import pytest

# Keras 3 (a test dependency: it writes real Keras files) runs on torch here, never TensorFlow
os.environ.setdefault("KERAS_BACKEND", "torch")
# the example networks (examples/resnet.py: a ResNet-18-shaped torch model) are imported by tests too
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own dataset cache, except mnist-5k's parsed copy which is shared
    (parsing the CSV takes a few tenths of a second)."""
    shared = tmp_path_factory.getbasetemp() / "bnlab-cache"
    monkeypatch.setenv("BNLAB_DATA", str(shared))
    os.environ.setdefault("COLUMNS", "160")
    yield


DIGITS_SPEC = {"kind": "mlp", "input_shape": [1, 8, 8], "num_classes": 10, "hidden": [16], "bn": "after"}


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory) -> Path:
    """A small checkpoint on scikit-learn's digits (embedded, fast; recalibrate reloads them), with
    non-trivial BN running statistics."""
    import torch

    from bnlab.checkpoint import save_checkpoint
    from bnlab.data import load_dataset
    from bnlab.models import build_model

    folder = tmp_path_factory.mktemp("ck") / "checkpoint"
    ds = load_dataset("digits")
    model = build_model(DIGITS_SPEC, seed=0).train()
    with torch.no_grad():
        model(ds.x_train[:64])
    save_checkpoint(folder, model.eval(), preprocessing=ds.preprocessing,
                    meta={"kind": "best", "epoch": 1, "dataset": "digits", "classes": list(ds.classes),
                          "train": {"dataset": "digits", "batch_size": 32}, "val_accuracy": 0.5})
    return folder
