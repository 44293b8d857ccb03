"""ONNX export (optional extra ``bnlab[onnx]``): the folded model by default, with a dynamic batch axis,
taking RAW inputs like ``bnlab predict`` (the checkpoint's preprocessing is the graph's first ops) and,
on request, answering probabilities (a final softmax) instead of logits.

``metadata_props`` say what the file is (``onnx_metadata``): ``bnlab.version``, ``bnlab.spec_sha256``
(SHA-256 of the model spec's canonical JSON), ``bnlab.input_layout`` (NCHW, NHWC for an imported Keras
model, NF for feature vectors), ``bnlab.input_shape``, ``bnlab.preprocessing`` (the JSON applied, ``{}``
for none), ``bnlab.outputs`` (probabilities or logits), ``bnlab.classes`` (JSON list), plus what
``bnlab export`` adds (``bnlab.model`` best or final, ``bnlab.epoch``, ``bnlab.checkpoint``)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn


class Preprocess(nn.Module):
    """``bnlab.data.dataset.apply_scaling`` as torch ops: x / divide, then minus the mean (a scalar, or
    per channel for "standardize"), then / std per channel. An empty dict: x as it comes."""

    def __init__(self, params: dict, sample_ndim: int):
        super().__init__()
        self.active = bool(params)
        shape = (1, -1) + (1,) * (sample_ndim - 1)
        scaling = params.get("scaling", "none")
        self.register_buffer("divide", torch.tensor(float(params.get("divide", 1.0))))
        mean = params.get("mean") if scaling in ("center", "standardize") else None
        std = params.get("std") if scaling == "standardize" else None
        self.register_buffer("mean", None if mean is None else torch.tensor(mean, dtype=torch.float32).reshape(
            shape if isinstance(mean, list) else ()))
        self.register_buffer("std", None if std is None else torch.tensor(std, dtype=torch.float32).reshape(shape))

    def forward(self, x):
        if not self.active:
            return x
        x = x / self.divide
        if self.mean is not None:
            x = x - self.mean
        if self.std is not None:
            x = x / self.std
        return x


class ServingModel(nn.Module):
    """Raw inputs in, logits or probabilities out: what the ONNX file computes."""

    def __init__(self, model: nn.Module, preprocessing: dict, sample_ndim: int, softmax: bool):
        super().__init__()
        self.pre, self.model, self.softmax = Preprocess(preprocessing, sample_ndim), model, softmax

    def forward(self, x):
        out = self.model(self.pre(x))
        return torch.softmax(out, dim=1) if self.softmax else out


def input_layout(spec) -> str:
    shape = tuple(spec.input_shape)
    if len(shape) == 3:
        return "NHWC" if getattr(spec, "input_layout", "channels_first") == "channels_last" else "NCHW"
    return {1: "NF", 2: "NHW"}[len(shape)]


def raw_sample(input_shape: tuple[int, ...], preprocessing: dict | None, n: int = 4):
    """``n`` raw-looking inputs, seeded: uniform in [0, divide] (pixels 0..255 when the preprocessing divides by
    255), as ``bnlab predict`` takes them. ``bnlab export`` compares onnxruntime with bnlab on them."""
    import numpy as np

    return np.random.default_rng(0).uniform(0, (preprocessing or {}).get("divide", 1.0),
                                            (n, *input_shape)).astype(np.float32)


def check_finite_outputs(model: nn.Module, x: torch.Tensor) -> None:
    """A ValueError unless ``model`` answers finite outputs for ``x`` (raw inputs in its training range).
    Finite weights can still overflow float32 (max 3.4e38) in a product or a sum (weights of 3e38): such a
    model answers inf or NaN for ordinary inputs, so it is refused before anything is written, with the
    tensors to blame named (non-finite ones, else the largest weight)."""
    with torch.no_grad():
        out = model(x)
    if bool(torch.isfinite(out).all()):
        return
    tensors = [(n, t.detach()) for n, t in (*model.named_parameters(), *model.named_buffers())
               if t.is_floating_point() and t.numel()]
    bad = "NaN" if bool(torch.isnan(out).any()) else "inf"
    if broken := [n for n, t in tensors if not bool(torch.isfinite(t).all())]:
        why = (f"its tensor(s) {', '.join(broken[:5])}{' ...' if len(broken) > 5 else ''} hold inf or NaN (folding "
               "BN into weights near float32's limit overflows them)")
    elif tensors:
        name, t = max(tensors, key=lambda nt: float(nt[1].abs().max()))
        why = (f"its weights overflow float32 (max 3.4e38) in the forward pass (the largest, {name}, reaches "
               f"{float(t.abs().max()):.3g})")
    else:
        why = "it has no weights to blame: its inputs' preprocessing overflows"
    raise ValueError(f"the model cannot be exported: expected finite outputs for raw inputs in its training range, "
                     f"got {bad}: {why}")


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: str | Path, *, opset: int = 17,
                preprocessing: dict | None = None, softmax: bool = False, classes=None, spec=None,
                metadata: dict | None = None) -> Path:
    """Write ``model`` as ONNX taking raw inputs (``preprocessing`` applied first) and returning logits,
    or probabilities with ``softmax``. ``spec`` (the model spec) and ``classes`` go into the metadata.
    A model whose outputs are not finite on raw inputs in its training range (weights that overflow
    float32) is a ValueError, before anything is written (``check_finite_outputs``)."""
    if model.training:
        raise ValueError("export_onnx() needs a model in eval mode: call model.eval() first")
    try:
        import onnx
    except ImportError:
        raise ImportError("ONNX export needs the optional extra: pip install 'bnlab[onnx]'") from None
    from bnlab import __version__

    path = Path(path)
    p = next(model.parameters())
    wrapped = ServingModel(model, preprocessing or {}, len(input_shape), softmax).to(p.device).eval()
    check_finite_outputs(wrapped, torch.as_tensor(raw_sample(input_shape, preprocessing), dtype=p.dtype,
                                                  device=p.device))
    path.parent.mkdir(parents=True, exist_ok=True)
    dummy = torch.zeros((2, *input_shape), dtype=p.dtype, device=p.device)
    output = "probabilities" if softmax else "logits"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation and tracer notes
        torch.onnx.export(wrapped, (dummy,), str(path), dynamo=False, opset_version=opset, input_names=["x"],
                          output_names=[output], dynamic_axes={"x": {0: "batch"}, output: {0: "batch"}})
    props = {"bnlab.version": __version__, "bnlab.input_shape": json.dumps(list(input_shape)),
             "bnlab.preprocessing": json.dumps(preprocessing or {}, sort_keys=True), "bnlab.outputs": output,
             "bnlab.classes": json.dumps(list(classes) if classes else None)}
    if spec is not None:
        from bnlab.hashing import json_digest
        from bnlab.models.spec import spec_to_dict

        props["bnlab.spec_sha256"] = json_digest(spec_to_dict(spec))
        props["bnlab.input_layout"] = input_layout(spec)
    props.update({str(k): str(v) for k, v in (metadata or {}).items()})
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, str(path))
    return path


def onnx_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (which bnlab model it holds)."""
    import onnx

    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def onnx_predict(path: str | Path, x) -> "np.ndarray":  # noqa: F821
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": np.asarray(x, dtype=np.float32)})[0]
