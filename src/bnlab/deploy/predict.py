"""Single-sample and batch prediction from a checkpoint: inputs are read the way the training data
was (raw pixels 0..255 for image datasets) and scaled with the preprocessing fitted on its training
split, which the checkpoint carries.

Which model: a checkpoint folder, or a run folder and ``which`` ("best", the best-validation model,
by default, as Keras's ``save_best_only``; or "final"); every prediction says which model made it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bnlab.data.dataset import apply_scaling
from bnlab.payload import IMAGE_SUFFIXES, InputError, as_batch, image_to_array

__all__ = ["IMAGE_SUFFIXES", "InputError", "LooksPrescaled", "Prediction", "as_batch", "image_to_array", "predict", "predict_files",
           "read_input"]


@dataclass
class Prediction:
    label: int
    name: str
    probabilities: list[float]


def channels_last(spec) -> bool:
    """Whether a model takes images channels last, (H, W, C) (a model imported from Keras)."""
    return getattr(spec, "input_layout", "channels_first") == "channels_last" and len(spec.input_shape) == 3


def in_model_layout(data, spec):
    """A Dataset whose images are moved to the model's layout (a Keras model's (H, W, C) or (H, W)),
    the same Dataset when they already fit."""
    import dataclasses

    shape = tuple(spec.input_shape)
    if tuple(data.x_train.shape[1:]) == shape:
        return data
    last = channels_last(spec)
    move = lambda x: torch.from_numpy(as_batch(x.cpu().numpy(), shape, data.name, channels_last=last)).to(x.device)  # noqa: E731
    return dataclasses.replace(data, x_train=move(data.x_train), x_val=move(data.x_val), x_test=move(data.x_test))


def read_input(path: str | Path, input_shape: tuple[int, ...], *, channels_last: bool = False) -> np.ndarray:
    """A PNG/JPEG image or a .npy array (one sample or a batch) -> (N, *input_shape) raw values in the
    model's layout (``channels_last``: (H, W, C))."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return image_to_array(path.read_bytes(), input_shape, channels_last=channels_last)[None]
    if path.suffix.lower() == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise InputError(f"{path}: not a readable .npy array ({e})") from None
        return as_batch(arr, input_shape, str(path), channels_last=channels_last)
    raise InputError(f"{path}: expected an image ({', '.join(IMAGE_SUFFIXES)}) or a .npy array")


class LooksPrescaled(UserWarning):
    """Float inputs in [0, 1] given to a model whose preprocessing divides raw values by more than 1."""


def prescaled_warning(batch: np.ndarray, preprocessing: dict, prescaled: bool) -> str | None:
    """Why ``batch`` looks already scaled although it will be scaled again, or None. Raw image pixels
    run to 255; values all within [0, 1] then are almost surely pixels already divided by 255, which a
    second division turns into near-black images and wrong classes (silently)."""
    divide = (preprocessing or {}).get("divide", 1)
    if prescaled or divide <= 1 or batch.size == 0:
        return None
    lo, hi = float(batch.min()), float(batch.max())
    if lo >= 0 and hi <= 1 and hi > 0:
        return (f"the inputs lie in [{lo:g}, {hi:g}] but will be divided by {divide:g} like raw data; if they are "
                "already scaled, pass --prescaled (\"prescaled\": true over REST)")
    return None


def model_scaled(batch: np.ndarray, preprocessing: dict, prescaled: bool) -> np.ndarray:
    """Raw inputs scaled as the model's training data was (as given when ``prescaled`` or no scaling)."""
    return batch if prescaled or not preprocessing else apply_scaling(batch, preprocessing)


@torch.no_grad()
def predict(model: nn.Module, batch: np.ndarray, preprocessing: dict, classes=None, *,
            prescaled: bool = False) -> list[Prediction]:
    """Class and probabilities for each row of ``batch`` (raw values unless ``prescaled``; a
    ``LooksPrescaled`` warning when raw-looking values are already in [0, 1]).

    Refuses (InputError) a batch whose outputs are not finite: large finite inputs can overflow the
    logits, and a NaN probability is no answer (nor valid JSON)."""
    if model.training:
        raise ValueError("predict() needs a model in eval mode: call model.eval() first (in training mode BN "
                         "would normalise with the statistics of this batch, and a batch of one has none)")
    why = prescaled_warning(batch, preprocessing, prescaled)
    if why:
        warnings.warn(why, LooksPrescaled, stacklevel=2)
    x = model_scaled(batch, preprocessing, prescaled)
    p = next(model.parameters())
    try:
        logits = model(torch.as_tensor(np.ascontiguousarray(x), dtype=p.dtype, device=p.device))
    except (RuntimeError, ValueError) as e:  # an input the model cannot take is the input's fault: a 4xx
        from bnlab.deploy.testtime import batch_too_small, is_batch_too_small
        if is_batch_too_small(e):  # a model with test-batch BN statistics given one sample
            raise InputError(batch_too_small(len(x))) from None
        raise InputError(f"the model cannot run on inputs of shape {tuple(np.shape(x))} "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    bad = (~torch.isfinite(logits).all(1)).nonzero().flatten().tolist()
    if bad:
        raise InputError(f"the model's output is not finite for sample(s) {', '.join(map(str, bad[:10]))}"
                         f"{' ...' if len(bad) > 10 else ''} of {len(batch)} (inputs far outside the training "
                         "range overflow it)")
    probs = torch.softmax(logits, 1)
    out = []
    for row in probs.cpu().tolist():
        k = int(np.argmax(row))
        out.append(Prediction(k, str(classes[k]) if classes else str(k), row))
    return out


def read_inputs(paths, ck, *, prescaled: bool = False) -> torch.Tensor:
    """The samples of every file in ``paths``, scaled like the checkpoint's training data unless ``prescaled``."""
    shape = tuple(ck.model.spec.input_shape)
    raw = np.concatenate([read_input(p, shape, channels_last=channels_last(ck.model.spec)) for p in paths])
    x = model_scaled(raw, ck.preprocessing, prescaled)
    return torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32)


def model_for_bn_stats(ck, bn_stats: str = "running", recalibrate_on=(), *, prescaled: bool = False) -> nn.Module:
    """The checkpoint's model using ``bn_stats`` at test time (``bnlab.deploy.testtime``); "recalibrated"
    recalibrates on the inputs in the files ``recalibrate_on`` (unlabeled data of the test domain)."""
    from bnlab.deploy.testtime import check_bn_stats, for_bn_stats

    check_bn_stats(bn_stats)
    if bn_stats == "recalibrated" and not recalibrate_on:
        raise ValueError("BN statistics 'recalibrated' need unlabeled inputs of the test domain: give them with "
                         "--recalibrate-on FILE (images or .npy arrays, raw values like the inputs)")
    if bn_stats != "recalibrated" and recalibrate_on:
        raise ValueError(f"--recalibrate-on is for BN statistics 'recalibrated' (got {bn_stats!r})")
    unlabeled = read_inputs(recalibrate_on, ck, prescaled=prescaled) if recalibrate_on else None
    return for_bn_stats(ck.model, bn_stats, unlabeled)


def predict_files(checkpoint: str | Path, paths, *, which: str | None = None, prescaled: bool = False,
                  bn_stats: str = "running", recalibrate_on=(), trust_factory: bool = False):
    """Load a checkpoint (or the ``which`` model of a run folder) and predict every input file.

    ``bn_stats``: "running" (BN's moving averages), "batch" (each file's samples normalised with their own
    statistics: a file is one batch) or "recalibrated" (on the files ``recalibrate_on``).
    Returns (the Checkpoint, one dict per sample: input, class, name, probabilities, and the model
    used: its kind, "best" or "final", and epoch). ``trust_factory``: as ``load_checkpoint``'s."""
    from bnlab.checkpoint import load_checkpoint

    ck = load_checkpoint(checkpoint, which=which, trust_factory=trust_factory)
    model = model_for_bn_stats(ck, bn_stats, recalibrate_on, prescaled=prescaled)
    shape = tuple(ck.model.spec.input_shape)
    results = []
    for path in paths:
        batch = read_input(path, shape, channels_last=channels_last(ck.model.spec))
        for i, p in enumerate(predict(model, batch, ck.preprocessing, ck.meta.get("classes"), prescaled=prescaled)):
            results.append({"input": str(path) + (f"[{i}]" if len(batch) > 1 else ""), "class": p.label,
                            "name": p.name, "probabilities": [round(q, 6) for q in p.probabilities],
                            "model": ck.kind, "epoch": ck.meta.get("epoch"),
                            **({"bn_stats": bn_stats} if bn_stats != "running" else {})})
    return ck, results
