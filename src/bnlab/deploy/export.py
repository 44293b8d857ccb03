"""ONNX export (optional extra ``bnlab[onnx]``): the folded model by default, with a dynamic batch axis.

``metadata`` is written into the ONNX file's ``metadata_props`` (``bnlab export`` records there which
model it exported: ``bnlab.model`` best or final, ``bnlab.epoch``, ``bnlab.checkpoint``)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn


def export_onnx(model: nn.Module, input_shape: tuple[int, ...], path: str | Path, *, opset: int = 17,
                metadata: dict | None = None) -> Path:
    if model.training:
        raise ValueError("export_onnx() needs a model in eval mode: call model.eval() first")
    try:
        import onnx
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
    if metadata:
        proto = onnx.load(str(path))
        onnx.helper.set_model_props(proto, {str(k): str(v) for k, v in metadata.items()})
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
