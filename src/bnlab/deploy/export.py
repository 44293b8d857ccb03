"""ONNX export (optional extra ``bnlab[onnx]``): the folded model by default, with a dynamic batch axis."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: str | Path, *, opset: int = 17) -> Path:
    if model.training:
        raise ValueError("export_onnx() needs a model in eval mode: call model.eval() first")
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ImportError("ONNX export needs the optional extra: pip install 'bnlab[onnx]'") from None
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    p = next(model.parameters())
    dummy = torch.zeros((2, *input_shape), dtype=p.dtype, device=p.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation and tracer notes
        torch.onnx.export(model, (dummy,), str(path), dynamo=False, opset_version=opset, input_names=["x"],
                          output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    return path


def onnx_predict(path: str | Path, x) -> "np.ndarray":  # noqa: F821
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": np.asarray(x, dtype=np.float32)})[0]
