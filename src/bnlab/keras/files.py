"""Read a Keras model file with h5py alone (no TensorFlow, no Keras): its layer list and weights.

Three formats (see docs/keras.md):
* Keras 2 ``.h5`` (tf.keras): root attrs ``model_config`` (JSON) and ``keras_version``; group
  ``model_weights`` with attr ``layer_names``; each layer's group lists its arrays in attr
  ``weight_names`` (``dense/kernel:0``, ``batch_normalization/gamma:0`` ...).
* Keras 3 legacy ``.h5``: the same layout, names without ``:0`` and nested under the model's name.
* Keras 3 ``.keras``: a zip of ``config.json``, ``metadata.json`` and ``model.weights.h5``, whose
  arrays sit at ``layers/<snake_case class>[_N]/vars/<i>`` in each layer's variable order.

Weight names are always resolved through the file's own attributes, never by building paths.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MAX_FILE_BYTES = 2 * 1024**3  # a Keras file larger than this is refused before reading


class KerasFileError(ValueError):
    """A file that is not a readable Keras model (with what was expected and what was found)."""


@dataclass
class KerasLayer:
    class_name: str
    name: str
    config: dict
    weights: dict[str, np.ndarray] = field(default_factory=dict)  # kernel, bias, gamma, beta, moving_mean, ...
    build_input_shape: tuple | None = None  # one sample's input shape, where the file records it (Keras 3)


@dataclass
class KerasModel:
    format: str  # "keras2-h5" | "keras3-h5" | "keras3-zip"
    keras_version: str
    name: str
    layers: list[KerasLayer]  # in order, InputLayer first when the file has one
    input_shape: tuple[int, ...] | None  # one sample's shape, as the Keras model takes it


def _import_h5py():
    try:
        import h5py
    except ImportError:  # pragma: no cover - h5py is in the keras extra
        raise KerasFileError("reading Keras files needs h5py: pip install 'bnlab[keras]'") from None
    return h5py


def snake_case(name: str) -> str:
    """Keras's own rule for the default layer path of a class (``BatchNormalization`` ->
    ``batch_normalization``, ``Conv2D`` -> ``conv2d``, ``LeakyReLU`` -> ``leaky_re_lu``)."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _weight_key(name: str) -> str:
    """``sequential/dense/kernel:0`` -> ``kernel``."""
    return _text(name).rsplit("/", 1)[-1].split(":")[0]


def _layers_of(config: dict, where: str) -> tuple[str, list[dict]]:
    cls = config.get("class_name")
    body = config.get("config", {})
    if cls not in ("Sequential", "Functional", "Model"):
        raise KerasFileError(f"{where}: expected a Sequential or Functional model (got class {cls!r})")
    layers = body.get("layers")
    if not isinstance(layers, list):
        raise KerasFileError(f"{where}: the model config has no layer list")
    if cls != "Sequential":
        _check_linear(layers, where)
    return body.get("name", "model"), layers


def _inbound_names(layer: dict) -> list[str]:
    """The names of the layers feeding a Functional layer (Keras 2 and Keras 3 node formats)."""
    names = []

    def walk(obj):
        if isinstance(obj, dict):
            hist = obj.get("config", {}).get("keras_history") if obj.get("class_name") == "__keras_tensor__" else None
            if hist:
                names.append(hist[0])
            else:
                for v in obj.values():
                    walk(v)
        elif isinstance(obj, list):
            if len(obj) >= 3 and isinstance(obj[0], str) and isinstance(obj[1], int) and isinstance(obj[2], int):
                names.append(obj[0])  # Keras 2: [layer_name, node_index, tensor_index, kwargs]
            else:
                for v in obj:
                    walk(v)

    walk(layer.get("inbound_nodes", []))
    return names


def _check_linear(layers: list[dict], where: str) -> None:
    """A Functional model is read only when it is a chain: each layer fed by exactly the one before."""
    for prev, layer in zip(layers, layers[1:]):
        inbound = _inbound_names(layer)
        prev_name = prev.get("name") or prev.get("config", {}).get("name")
        if inbound != [prev_name]:
            name = layer.get("name") or layer.get("config", {}).get("name")
            raise KerasFileError(f"{where}: only linear Functional graphs are supported; layer {name!r} is fed by "
                                 f"{inbound or 'nothing'} instead of the previous layer {prev_name!r}")


def _input_shape(layers: list[dict]) -> tuple[int, ...] | None:
    for layer in layers:
        cfg = layer.get("config", {})
        shape = cfg.get("batch_shape") or cfg.get("batch_input_shape")
        if shape:
            return tuple(int(s) for s in shape[1:])
        build = layer.get("build_config", {}).get("input_shape")
        if build:
            return tuple(int(s) for s in build[1:])
    return None


def _build_shape(layer: dict) -> tuple | None:
    shape = (layer.get("build_config") or {}).get("input_shape")
    return tuple(shape[1:]) if isinstance(shape, list) and len(shape) > 1 else None


def _make_layers(raw: list[dict]) -> list[KerasLayer]:
    return [KerasLayer(layer.get("class_name", "?"), layer.get("config", {}).get("name") or layer.get("name", "?"),
                       layer.get("config", {}), build_input_shape=_build_shape(layer)) for layer in raw]


def _read_h5(path: Path) -> KerasModel:
    h5py = _import_h5py()
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise KerasFileError(f"{path}: not an HDF5 file ({e})") from None
    with f:
        if "model_config" not in f.attrs:
            raise KerasFileError(f"{path}: an HDF5 file without a 'model_config' attribute: a weights-only file "
                                 "(model.save_weights) or not a Keras model; save the whole model with model.save")
        try:
            config = json.loads(_text(f.attrs["model_config"]))
        except json.JSONDecodeError as e:
            raise KerasFileError(f"{path}: its model_config is not JSON ({e})") from None
        version = _text(f.attrs.get("keras_version", "unknown"))
        name, raw = _layers_of(config, str(path))
        layers = _make_layers(raw)
        if "model_weights" not in f:
            raise KerasFileError(f"{path}: no 'model_weights' group: the file holds no weights")
        mw = f["model_weights"]
        by_name = {layer.name: layer for layer in layers}
        for lname in mw.attrs.get("layer_names", []):
            lname = _text(lname)
            group = mw[lname]
            arrays = {}
            for wname in group.attrs.get("weight_names", []):
                if _text(wname) not in group:
                    raise KerasFileError(f"{path}: layer {lname!r} lists the weight {_text(wname)!r}, which the file "
                                         "does not hold (a damaged or hand-edited file)")
                arrays[_weight_key(wname)] = np.asarray(group[_text(wname)][()])
            if arrays and lname not in by_name:
                raise KerasFileError(f"{path}: weights for layer {lname!r}, which the model config does not have")
            if arrays:
                by_name[lname].weights = arrays
        fmt = "keras2-h5" if version.startswith("2") else "keras3-h5"
    return KerasModel(fmt, version, name, layers, _input_shape(raw))


# a Keras 3 layer's variables in file order (vars/0, vars/1, ...), the disabled ones left out
def _variable_names(layer: KerasLayer) -> list[str]:
    cfg, cls = layer.config, layer.class_name
    if cls == "BatchNormalization":
        return [n for n, on in (("gamma", cfg.get("scale", True)), ("beta", cfg.get("center", True)),
                                ("moving_mean", True), ("moving_variance", True)) if on]
    if cls in ("Dense", "Conv2D"):
        return ["kernel", "bias"] if cfg.get("use_bias", True) else ["kernel"]
    return []


def _read_keras_zip(path: Path) -> KerasModel:
    h5py = _import_h5py()
    try:
        z = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise KerasFileError(f"{path}: not a .keras archive (a zip file) ({e})") from None
    with z:
        names = set(z.namelist())
        missing = {"config.json", "model.weights.h5"} - names
        if missing:
            raise KerasFileError(f"{path}: a .keras archive needs config.json and model.weights.h5 "
                                 f"(missing {sorted(missing)})")
        try:
            config = json.loads(z.read("config.json"))
            meta = json.loads(z.read("metadata.json")) if "metadata.json" in names else {}
        except json.JSONDecodeError as e:
            raise KerasFileError(f"{path}: config.json is not JSON ({e})") from None
        weights = z.read("model.weights.h5")
    name, raw = _layers_of(config, str(path))
    layers = _make_layers(raw)
    counts: dict[str, int] = {}
    with h5py.File(io.BytesIO(weights), "r") as f:
        for layer in layers:
            if layer.class_name == "InputLayer":
                continue
            base = snake_case(layer.class_name)
            n = counts.get(base, 0)
            counts[base] = n + 1
            key = f"layers/{base}" + (f"_{n}" if n else "")
            wanted = _variable_names(layer)
            if not wanted:
                continue
            if f"{key}/vars" not in f:
                raise KerasFileError(f"{path}: no weights at {key}/vars for layer {layer.name!r}")
            group = f[f"{key}/vars"]
            if len(group) != len(wanted):
                raise KerasFileError(f"{path}: layer {layer.name!r} has {len(group)} arrays at {key}/vars, "
                                     f"expected {len(wanted)} ({', '.join(wanted)})")
            layer.weights = {w: np.asarray(group[str(i)][()]) for i, w in enumerate(wanted)}
    return KerasModel("keras3-zip", str(meta.get("keras_version", "unknown")), name, layers, _input_shape(raw))


def read_keras_file(path: str | Path) -> KerasModel:
    """The layer list and weights of a Keras ``.h5`` or ``.keras`` file."""
    path = Path(path)
    if not path.is_file():
        raise KerasFileError(f"{path}: no such file (expected a Keras .h5 or .keras file)")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise KerasFileError(f"{path}: {size:,} bytes, more than the {MAX_FILE_BYTES:,} a Keras file may have here")
    with open(path, "rb") as fh:
        head = fh.read(8)
    try:
        if head.startswith(b"PK"):
            return _read_keras_zip(path)
        if head.startswith(b"\x89HDF\r\n\x1a\n"):
            return _read_h5(path)
    except KerasFileError:
        raise
    except (OSError, KeyError, ValueError, TypeError, zipfile.BadZipFile) as e:  # h5py / zip on a damaged file
        raise KerasFileError(f"{path}: cannot be read as a Keras file ({type(e).__name__}: {e})") from None
    raise KerasFileError(f"{path}: neither a .keras archive (zip) nor an HDF5 .h5 file (first bytes {head!r})")
