"""Single-sample and batch prediction from a checkpoint: inputs are read the way the training data
was (raw pixels 0..255 for image datasets) and scaled with the preprocessing fitted on its training
split, which the checkpoint carries.

Which model: a checkpoint folder, or a run folder and ``which`` ("best", the best-validation model,
by default, as Keras's ``save_best_only``; or "final"); every prediction says which model made it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bnlab.data.dataset import apply_scaling

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


class InputError(ValueError):
    """An input that does not fit the model; the message says what was expected and what arrived."""


@dataclass
class Prediction:
    label: int
    name: str
    probabilities: list[float]


def image_to_array(data: bytes, input_shape: tuple[int, ...]) -> np.ndarray:
    """Image bytes -> (C, H, W) float array of raw pixel values, resized to the model's input."""
    from PIL import Image, UnidentifiedImageError

    if len(input_shape) != 3:
        raise InputError(f"this model takes feature vectors of shape {input_shape}, not images")
    c, h, w = input_shape
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"the bytes are not an image PIL can read ({e})") from None
    img = img.convert("L" if c == 1 else "RGB")
    if img.size != (w, h):
        img = img.resize((w, h))
    arr = np.asarray(img, dtype=np.float32)
    return arr[None] if c == 1 else arr.transpose(2, 0, 1)


def read_input(path: str | Path, input_shape: tuple[int, ...]) -> np.ndarray:
    """A PNG/JPEG image or a .npy array (one sample or a batch) -> (N, *input_shape) raw values."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return image_to_array(path.read_bytes(), input_shape)[None]
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise InputError(f"{path}: not a readable .npy array ({e})") from None
        return as_batch(arr, input_shape, str(path))
    raise InputError(f"{path}: expected an image ({', '.join(IMAGE_SUFFIXES)}) or a .npy array")


def as_batch(arr, input_shape: tuple[int, ...], where: str = "input") -> np.ndarray:
    """Accept one sample (input_shape, or (H, W) for one-channel images) or a batch (N, *input_shape)."""
    arr = np.asarray(arr)
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{where}: expected numbers (got dtype {arr.dtype})")
    arr = arr.astype(np.float32)
    shape = tuple(input_shape)
    if arr.shape == shape:
        arr = arr[None]
    elif len(shape) == 3 and shape[0] == 1 and arr.shape == shape[1:]:
        arr = arr[None, None]
    elif arr.shape[1:] != shape or arr.shape[0] == 0:
        raise InputError(f"{where}: expected shape {shape} or (N, {', '.join(map(str, shape))}) "
                         f"(got {tuple(arr.shape)})")
    if not np.isfinite(arr).all():
        raise InputError(f"{where}: contains NaN or infinite values")
    return arr


@torch.no_grad()
def predict(model: nn.Module, batch: np.ndarray, preprocessing: dict, classes=None, *,
            prescaled: bool = False) -> list[Prediction]:
    """Class and probabilities for each row of ``batch`` (raw values unless ``prescaled``)."""
    if model.training:
        raise ValueError("predict() needs a model in eval mode: call model.eval() first (in training mode BN "
                         "would normalise with the statistics of this batch, and a batch of one has none)")
    x = batch if prescaled or not preprocessing else apply_scaling(batch, preprocessing)
    p = next(model.parameters())
    probs = torch.softmax(model(torch.as_tensor(np.ascontiguousarray(x), dtype=p.dtype, device=p.device)), 1)
    out = []
    for row in probs.cpu().tolist():
        k = int(np.argmax(row))
        out.append(Prediction(k, str(classes[k]) if classes else str(k), row))
    return out


def predict_files(checkpoint: str | Path, paths, *, which: str | None = None, prescaled: bool = False):
    """Load a checkpoint (or the ``which`` model of a run folder) and predict every input file.

    Returns (the Checkpoint, one dict per sample: input, class, name, probabilities, and the model
    used: its kind, "best" or "final", and epoch)."""
    from bnlab.checkpoint import load_checkpoint

    ck = load_checkpoint(checkpoint, which=which)
    shape = tuple(ck.model.spec.input_shape)
    results = []
    for path in paths:
        batch = read_input(path, shape)
        for i, p in enumerate(predict(ck.model, batch, ck.preprocessing, ck.meta.get("classes"), prescaled=prescaled)):
            results.append({"input": str(path) + (f"[{i}]" if len(batch) > 1 else ""), "class": p.label,
                            "name": p.name, "probabilities": [round(q, 6) for q in p.probabilities],
                            "model": ck.kind, "epoch": ck.meta.get("epoch")})
    return ck, results
