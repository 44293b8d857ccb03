"""A Keras model (``files.read_keras_file``) as a bnlab ``layers`` spec and its torch weights, exactly.

* Dense kernel (in, out) -> torch weight (out, in); Conv2D kernel (kh, kw, in, out) -> (out, in, kh, kw).
* BatchNormalization keeps Keras's eps and momentum as a keras-convention bnlab BN (momentum weighs
  the OLD statistic, moving_variance biased), or, with ``convention="torch"``, becomes a torch-convention
  BN with momentum 1 - m (eval outputs identical; later training updates follow torch's rule).
* Image inputs stay as Keras takes them, (H, W, C): the model moves channels first itself
  (``input_layout = "channels_last"``). Keras flattens a feature map in (H, W, C) order, torch in
  (C, H, W): every per-feature array after such a Flatten (a BN's four vectors, the next Dense's input
  rows) is permuted, so outputs match.
* A final softmax (the last Dense's activation, or a trailing Activation / Softmax layer) is left out:
  bnlab models return logits and ``predict`` applies the softmax, giving Keras's probabilities. A
  model ending without one (logits) is read as it is; predict then reports the softmax of its outputs.

Everything else is refused up front, in one error that lists every unsupported layer with the reason.
A layer's settings are checked as a bnlab spec checks them (``epsilon`` > 0, at most 65,536 units ...) and
its arrays against the shapes its settings imply, before anything is built: a file cannot make bnlab
allocate more than the arrays it holds.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from pydantic import TypeAdapter, ValidationError

from bnlab.keras.files import KerasFileError, KerasModel
from bnlab.nn.activations import NAMES
from bnlab.models.build import keras_padding
from bnlab.models.spec import MAX_SIDE, LayerDef, Shape, parse_model_spec

_ACTIVATIONS = NAMES  # Keras's activation names are the specs'
KERAS3_LEAKY_SLOPE = 0.2  # keras.activations.leaky_relu's default negative_slope
# a bnlab layer setting -> the Keras config key it comes from (for messages naming the Keras field)
_KERAS_KEYS = {"eps": "epsilon", "slope": "negative_slope"}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
_SHAPE = TypeAdapter(Shape)


class _Refused(Exception):
    """A layer whose settings or arrays are wrong (not merely unsupported); its message is the reason."""


def _validation_message(e: ValidationError, keys: dict | None = None, config: dict | None = None) -> str:
    """pydantic's errors as one sentence: ``epsilon must be > 0 (got -1)``, naming the Keras field and the
    value the file holds where ``keys`` / ``config`` say which."""
    parts = []
    for err in e.errors():
        loc = [str(x) for x in err["loc"]]
        name = ".".join(loc) or "value"
        key = (keys or {}).get(name, name)
        got = (config or {}).get(key, err.get("input"))
        bound = next(((op, err["ctx"][k]) for k, op in
                      (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")) if k in (err.get("ctx") or {})), None)
        if err["type"] in _BOUNDS and bound:
            parts.append(f"{key} must be {bound[0]} {bound[1]:g} (got {got!r})" if isinstance(bound[1], float)
                         else f"{key} must be {bound[0]} {bound[1]:,} (got {got!r})")
        else:
            shown = f" (got {got!r})" if isinstance(got, (int, float, str, bool, type(None))) else ""
            parts.append(f"{key}: {err['msg'][:1].lower() + err['msg'][1:]}{shown}"[:300])
    return "; ".join(parts)


def _pair(v, name: str) -> int:
    """A square size / stride as one int (Keras stores (k, k) or k)."""
    vals = list(v) if isinstance(v, (list, tuple)) else [v]
    if len(set(vals)) != 1:
        raise ValueError(f"{name} {tuple(vals)} is not square")
    return int(vals[0])


def _activation_name(value) -> str:
    if isinstance(value, dict):  # a serialised activation object
        value = value.get("config", {}).get("name") or value.get("class_name", "")
    return str(value or "linear").lower()


class _Builder:
    def __init__(self, model: KerasModel, convention: str):
        self.model = model
        self.convention = convention
        self.layers: list[dict] = []
        self.torch_arrays: list[tuple[str, dict[str, np.ndarray]]] = []  # (Keras layer name, torch-side arrays)
        self.problems: list[str] = []
        self.perm: np.ndarray | None = None  # torch flat feature index -> Keras flat feature index
        self.flat_map: tuple[int, int, int] | None = None  # the (H, W, C) map flattened last, perm made on use
        self.softmax_seen = False
        self.shape_unknown = False
        self.shape: tuple[int, ...] | None = None  # the current Keras-side shape (no batch axis)
        self._current = None  # the Keras layer being converted

    def fail(self, layer, reason: str, *, shape_unknown: bool = True) -> None:
        """Record a refusal. Unless the layer keeps its input shape (``shape_unknown=False``: an
        activation), the shapes after it are unknown and the later layers are not read."""
        self.problems.append(f"layer {layer.name!r} ({layer.class_name}): {reason}")
        self.shape_unknown = self.shape_unknown or shape_unknown

    def per_feature(self, a: np.ndarray) -> np.ndarray:
        """A per-feature array (rows in Keras's flat order) in torch's order. The permutation is made here,
        once an array of the flat size exists (its size checked by ``weight``), never from the shape alone."""
        if self.flat_map is not None and self.perm is None:
            h, w, c = self.flat_map
            # Keras's flat index of torch's (c, h, w) element: (h·W + w)·C + c
            self.perm = np.arange(h * w * c).reshape(h, w, c).transpose(2, 0, 1).ravel()
        return a if self.perm is None else a[self.perm]

    def weight(self, layer, key: str, shape: tuple[int, ...]) -> np.ndarray:
        """The layer's array ``key``, which must have the shape its config and input imply."""
        a = layer.weights[key]
        if a.dtype.kind != "f":
            raise _Refused(f"{key} must be a floating-point array (got dtype {a.dtype} in the file)")
        if tuple(a.shape) != tuple(shape):
            raise _Refused(f"{key} has shape {tuple(a.shape)} in the file, the layer's config and input "
                           f"{self.shape} need {tuple(shape)}")
        return a

    def check(self, layer, ldef: dict) -> dict:
        """``ldef`` validated as a bnlab spec validates a layer (the Keras field named in the message)."""
        try:
            LayerDef.model_validate(ldef)
        except ValidationError as e:
            raise _Refused(_validation_message(e, _KERAS_KEYS, layer.config)) from None
        return ldef

    def add(self, ldef: dict, arrays: dict[str, np.ndarray] | None = None, source: str = "") -> None:
        self.layers.append(self.check(self._current, ldef))
        if arrays is not None:
            self.torch_arrays.append((source, arrays))

    def activation(self, layer, name: str, last: bool, slope: float | None = None) -> None:
        if name == "softmax":
            if not last or self.softmax_seen:
                self.fail(layer, "softmax inside the network or applied twice (only once, as the final activation)",
                          shape_unknown=False)
            self.softmax_seen = True
            return  # predict's softmax
        if last and name != "linear":
            self.fail(layer, f"the model's output activation is {name!r}: bnlab reads classifiers whose outputs are "
                             "softmax probabilities or logits (predict applies the softmax)", shape_unknown=False)
            return
        if name not in _ACTIVATIONS:
            self.fail(layer, f"activation {name!r} (supported: {', '.join(sorted(_ACTIVATIONS))}, softmax last)",
                      shape_unknown=False)
            return
        if name == "linear":
            return
        if name == "leaky_relu" and slope is None:
            slope = KERAS3_LEAKY_SLOPE
        self.add({"type": "activation", "activation": name, **({"slope": slope} if slope is not None else {})})


def _whole(value, key: str) -> int:
    """A Keras int setting (``units``, ``filters``): a JSON integer, refusing 3.0, 3.5, true or "8"."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Refused(f"{key} must be an integer (got {value!r})")
    return value


def _number(cfg: dict, key: str, default: float) -> float:
    """A Keras float setting (``epsilon``, ``momentum``, ``rate``): a JSON number, not a bool or a string."""
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _Refused(f"{key} must be a number (got {value!r})")
    return float(value)


def _flag(cfg: dict, key: str, default: bool) -> bool:
    """A Keras bool setting (``use_bias``, ``center``, ``scale``): a JSON true / false, not "false" or 0."""
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise _Refused(f"{key} must be true or false (got {value!r})")
    return value


def _is_last(layers, i: int) -> bool:
    """Whether only identities at inference (Dropout, a softmax) follow layer i."""
    for later in layers[i + 1:]:
        if later.class_name in ("Dropout",):
            continue
        if later.class_name == "Softmax" or (later.class_name == "Activation"
                                             and _activation_name(later.config.get("activation")) == "softmax"):
            continue
        return False
    return True


def _layer(b: _Builder, layers, i: int) -> None:
    layer, cfg, cls = layers[i], layers[i].config, layers[i].class_name
    last = _is_last(layers, i)
    shape = b.shape
    if cfg.get("data_format", "channels_last") != "channels_last":
        b.fail(layer, f"data_format {cfg.get('data_format')!r} (only channels_last)")
        return
    if cls == "InputLayer":
        return
    if cls == "Flatten":
        if len(shape) == 3:  # a map flattened: per-feature arrays after it are permuted (per_feature)
            b.flat_map, b.perm = tuple(shape), None
        b.shape = (math.prod(shape),)
        b.add({"type": "flatten"})
    elif cls == "Dense":
        if len(shape) != 1:
            b.fail(layer, f"Dense on a {len(shape)}-D input {shape} (only after Flatten / pooling)")
            return
        ldef = b.check(layer, {"type": "dense", "units": _whole(cfg["units"], "units"),
                               "use_bias": _flag(cfg, "use_bias", True)})
        units = ldef["units"]
        kernel = b.per_feature(b.weight(layer, "kernel", (shape[0], units)))  # (in, out), rows in Keras's order
        arrays = {"weight": kernel.T.copy()}
        if ldef["use_bias"]:
            arrays["bias"] = b.weight(layer, "bias", (units,))
        b.add(ldef, arrays, layer.name)
        b.perm, b.flat_map, b.shape = None, None, (units,)
        b.activation(layer, _activation_name(cfg.get("activation")), last)
    elif cls == "Conv2D":
        try:
            k, s = _pair(cfg["kernel_size"], "kernel_size"), _pair(cfg.get("strides", 1), "strides")
            if _pair(cfg.get("dilation_rate", 1), "dilation_rate") != 1 or int(cfg.get("groups", 1)) != 1:
                raise ValueError("dilation or groups")
        except ValueError as e:
            b.fail(layer, f"{e} (supported: square kernels and strides, no dilation, one group)")
            return
        if len(shape) != 3 or cfg.get("padding", "valid") not in ("same", "valid"):
            b.fail(layer, f"input {shape}, padding {cfg.get('padding')!r} (expected (H, W, C) and same / valid)")
            return
        ldef = b.check(layer, {"type": "conv2d", "filters": _whole(cfg["filters"], "filters"), "kernel_size": k,
                               "strides": s, "padding": cfg.get("padding", "valid"),
                               "use_bias": _flag(cfg, "use_bias", True)})
        filters = ldef["filters"]
        arrays = {"weight": b.weight(layer, "kernel", (k, k, shape[2], filters)).transpose(3, 2, 0, 1).copy()}
        if ldef["use_bias"]:
            arrays["bias"] = b.weight(layer, "bias", (filters,))
        b.add(ldef, arrays, layer.name)
        h, w, _ = shape
        pad = ldef["padding"]
        b.shape = (keras_padding(h, k, s, pad)[2], keras_padding(w, k, s, pad)[2], filters)
        b.activation(layer, _activation_name(cfg.get("activation")), last)
    elif cls == "BatchNormalization":
        axis = cfg.get("axis", -1)
        axis = axis[0] if isinstance(axis, list) and len(axis) == 1 else axis
        if not isinstance(axis, int) or axis not in (-1, len(shape)):
            b.fail(layer, f"axis {cfg.get('axis')!r} (only the last axis, the channels)", shape_unknown=False)
            return
        if len(shape) == 2:
            b.fail(layer, f"normalising the last axis of a {shape} input (only features or (H, W, C) maps)", shape_unknown=False)
            return
        m = _number(cfg, "momentum", 0.99)
        if not 0 <= m <= 1:
            raise _Refused(f"momentum must be in [0, 1] (got {cfg.get('momentum')!r})")
        ldef = b.check(layer, {"type": "batchnorm", "eps": _number(cfg, "epsilon", 1e-3),
                               "momentum": (1.0 - m) if b.convention == "torch" else m,
                               "center": _flag(cfg, "center", True), "scale": _flag(cfg, "scale", True)})
        wanted = [v for v, on in (("gamma", ldef["scale"]), ("beta", ldef["center"]), ("moving_mean", True),
                                  ("moving_variance", True)) if on]
        arrays = {k: b.per_feature(b.weight(layer, v, (shape[-1],))) for k, v in
                  (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"),
                   ("running_var", "moving_variance")) if v in wanted}
        b.add(ldef, arrays, layer.name)
    elif cls == "Activation":
        b.activation(layer, _activation_name(cfg.get("activation")), last)
    elif cls == "Softmax":
        b.activation(layer, "softmax", last)
    elif cls == "ReLU":
        if cfg.get("max_value") is not None or cfg.get("threshold", 0) or cfg.get("negative_slope", 0):
            b.fail(layer, "ReLU with max_value / threshold / negative_slope (only the plain ReLU)", shape_unknown=False)
            return
        b.activation(layer, "relu", last)
    elif cls == "ELU":
        if _number(cfg, "alpha", 1.0) != 1.0:
            b.fail(layer, f"ELU alpha {cfg.get('alpha')} (only 1.0)", shape_unknown=False)
            return
        b.activation(layer, "elu", last)
    elif cls == "LeakyReLU":
        slope = cfg.get("negative_slope", cfg.get("alpha", 0.3))  # Keras 3 / Keras 2 name; both default 0.3
        b.activation(layer, "leaky_relu", last, _number(cfg, "negative_slope" if "negative_slope" in cfg else "alpha", slope))
    elif cls == "Dropout":
        b.add({"type": "dropout", "rate": _number(cfg, "rate", 0.0)})
    elif cls in ("MaxPooling2D", "AveragePooling2D"):
        if len(shape) != 3 or cfg.get("padding", "valid") != "valid":
            b.fail(layer, f"input {shape}, padding {cfg.get('padding')!r} (expected (H, W, C) and valid)")
            return
        try:
            p = _pair(cfg.get("pool_size", 2), "pool_size")
            s = _pair(cfg.get("strides") or p, "strides")
        except ValueError as e:
            b.fail(layer, str(e))
            return
        b.add({"type": "maxpool" if cls == "MaxPooling2D" else "avgpool", "pool_size": p, "strides": s})
        h, w, c = shape
        b.shape = (keras_padding(h, p, s, "valid")[2], keras_padding(w, p, s, "valid")[2], c)
    elif cls == "GlobalAveragePooling2D":
        if len(shape) != 3 or cfg.get("keepdims", False):
            b.fail(layer, f"input {shape}, keepdims {cfg.get('keepdims')} (expected (H, W, C), keepdims false)")
            return
        b.add({"type": "gap"})
        b.shape = (shape[2],)
    else:
        b.fail(layer, "layer type not supported")


def keras_to_spec(model: KerasModel, *, convention: str = "keras") -> tuple[dict, dict[str, torch.Tensor]]:
    """(a ``layers`` spec dict, the state dict of the model it builds) for a Keras model."""
    if convention not in ("keras", "torch"):
        raise ValueError(f"convention must be 'keras' or 'torch' (got {convention!r})")
    if model.input_shape is None:
        raise KerasFileError("the Keras model does not record its input shape (no InputLayer / build config)")
    if any(s is None or s < 1 for s in model.input_shape):
        raise KerasFileError(f"the Keras model's input shape {model.input_shape} has free dimensions; "
                             "only fixed-size inputs are supported")
    try:
        _SHAPE.validate_python(model.input_shape)
    except ValidationError:
        raise KerasFileError(f"the Keras model's input shape {tuple(model.input_shape)} is outside what bnlab "
                             f"builds: at most 3 dimensions of at most {MAX_SIDE:,} each") from None
    b = _Builder(model, convention)
    b.shape = tuple(model.input_shape)
    for i, layer in enumerate(model.layers):
        if b.shape_unknown:  # after a refused layer: go on only where the file says what comes in
            known = layer.build_input_shape
            if known is None or any(d is None for d in known):
                b.problems.append("(the layers after it are not checked: the file does not record their shapes)")
                break
            b.shape, b.perm, b.flat_map, b.shape_unknown = tuple(known), None, None, False
        b._current = layer
        try:
            _layer(b, model.layers, i)
        except _Refused as e:  # a setting or array the file gets wrong: the layers after it would only echo it
            b.fail(layer, str(e))
            break
        except KeyError as e:  # a weight or config entry the layer must have
            b.fail(layer, f"missing {e} in the file")
        except (ValueError, TypeError, IndexError, OverflowError) as e:
            b.fail(layer, f"cannot be read ({type(e).__name__}: {e})")
    if len(b.problems) == 1:  # one line
        raise KerasFileError(f"Keras model {model.name!r}: {b.problems[0]}")
    if b.problems:
        raise KerasFileError(f"{len(b.problems)} unsupported layer(s) in Keras model {model.name!r}:\n  "
                             + "\n  ".join(b.problems))
    if len(b.shape) != 1 or b.shape[0] < 2:
        raise KerasFileError(f"the model's output shape is {b.shape}: bnlab reads classifiers with >= 2 outputs")
    spec = {"kind": "layers", "input_shape": list(model.input_shape), "num_classes": b.shape[0],
            "input_layout": "channels_last" if len(model.input_shape) == 3 else "channels_first",
            "norm_options": {"convention": convention}, "layers": b.layers}
    try:
        parse_model_spec(spec)
    except ValidationError as e:  # e.g. more layers than a spec may have
        raise KerasFileError(f"Keras model {model.name!r} is outside what bnlab builds: "
                             f"{_validation_message(e)}") from None
    return spec, _state_dict(spec, b.torch_arrays)


def _state_dict(spec: dict, arrays: list[tuple[str, dict[str, np.ndarray]]]) -> dict[str, torch.Tensor]:
    """The built model's own parameter names, filled in layer order with the converted arrays."""
    from bnlab.models import build_model

    model = build_model(spec)
    owners = [(name, m) for name, m in model.named_children()
              if any(True for _ in m.parameters(recurse=False)) or getattr(m, "running_mean", None) is not None]
    if len(owners) != len(arrays):
        raise KerasFileError(f"internal: {len(owners)} weight layers built, {len(arrays)} read")  # pragma: no cover
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for (name, module), (source, found) in zip(owners, arrays):
        for key, value in found.items():
            target = state[f"{name}.{key}"]
            if tuple(value.shape) != tuple(target.shape):
                raise KerasFileError(f"Keras layer {source!r}: {key} has shape {tuple(value.shape)} in the file, "
                                     f"the layer's config needs {tuple(target.shape)}")
            state[f"{name}.{key}"] = torch.from_numpy(np.ascontiguousarray(value)).to(target.dtype)
    return state


def keras_counts(model: KerasModel) -> tuple[int, int, int]:
    """Keras's (total, trainable, non-trainable) parameter counts, from the file's arrays: BN moving
    statistics and the weights of layers saved with trainable=false are non-trainable."""
    total = trainable = 0
    for layer in model.layers:
        for key, a in layer.weights.items():
            total += a.size
            if layer.config.get("trainable", True) and key not in ("moving_mean", "moving_variance"):
                trainable += a.size
    return total, trainable, total - trainable
