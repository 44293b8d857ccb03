"""Read a Keras model file with h5py alone (no TensorFlow, no Keras): its layer list and weights.

Three formats (see docs/interop.md):
* Keras 2 ``.h5`` (tf.keras): root attrs ``model_config`` (JSON) and ``keras_version``; group
  ``model_weights`` with attr ``layer_names``; each layer's group lists its arrays in attr
  ``weight_names`` (``dense/kernel:0``, ``batch_normalization/gamma:0`` ...).
* Keras 3 legacy ``.h5``: the same layout, names without ``:0`` and nested under the model's name.
* Keras 3 ``.keras``: a zip of ``config.json``, ``metadata.json`` and ``model.weights.h5``, whose
  arrays sit at ``layers/<snake_case class>[_N]/vars/<i>`` in each layer's variable order.

Weight names are always resolved through the file's own attributes, never by building paths.

A Keras file is untrusted input, read within ``KerasLimits`` and checked before anything is allocated:
a zip member's declared size and compression ratio before it is inflated, a JSON text's size and
nesting depth before it is parsed (``json`` recurses), an HDF5 dataset's declared shape, dtype,
chunks, filters and stored bytes before it is read, and every HDF5 link before it is followed: only
hard links are (soft and external links, which Keras never writes, are refused, so a link loop or a
file outside is never reached). ``model.weights.h5`` is never inflated into memory: a stored member
(what Keras writes) is read in place, a compressed one through a temporary file.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
import tempfile
import zipfile
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

MiB, GiB = 1024**2, 1024**3
RATIO_FLOOR = 1 * MiB  # a zip member or an array inflating to less than this is never refused for its ratio
MAX_NAMES = 65536  # entries of a name list (layer_names, weight_names) an HDF5 attribute may hold


@dataclass(frozen=True)
class KerasLimits:
    """What a Keras file may declare before bnlab reads it. Each limit is checked against the sizes the
    file declares, before the memory is taken, so a refused file costs next to nothing; the defaults are
    generous for real models (ResNet50's weights are ~100 MB, VGG16's ~530 MB).

    Raise one with ``bnlab import-keras --max-weight-bytes N`` (``--max-config-bytes``,
    ``--max-json-depth``, ``--max-compression-ratio``) and use the checkpoint it writes, or from Python:
    ``load_keras(path, limits=KerasLimits(max_weight_bytes=N))``."""

    max_weight_bytes: int = 1 * GiB  # all arrays read, by declared shape x itemsize; model.weights.h5 may be 4x
    max_config_bytes: int = 16 * MiB  # config.json, metadata.json, the model_config and name-list attributes
    max_json_depth: int = 100  # nesting of a JSON config (Keras's nest about 10 deep)
    max_compression_ratio: float = 100.0  # inflated / stored bytes of a zip member or an array over 1 MiB
    # The one size not known before reading: a variable-length text attribute of a .h5 (model_config,
    # layer_names, weight_names) keeps its text in HDF5's global heap, whose size HDF5 does not report. It
    # is read once, as bytes through h5py's low-level API (no decoded str copies), and refused over
    # max_config_bytes before it is decoded or parsed. The read itself happens inside HDF5, which takes
    # about 5x the text while reading it (a 200 MiB model_config would peak ~1.1 GB), so a .h5 is first checked
    # for bytes beyond its arrays' data (``_H5Reader.check_overhead``: at most 2 x max_config_bytes + 16 MiB),
    # which bounds every text attribute before any is read. Keras writes configs of a few hundred KB.

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"KerasLimits.{f.name} must be a positive number (got {value!r})")
        if self.max_compression_ratio < 1:
            raise ValueError(f"KerasLimits.max_compression_ratio must be >= 1 (got {self.max_compression_ratio!r})")

    @property
    def max_weights_file_bytes(self) -> int:
        """The inflated size of a .keras archive's model.weights.h5: the weights plus an optimizer's state,
        which Keras saves beside them (Adam keeps two arrays per weight), plus its bookkeeping."""
        return 4 * self.max_weight_bytes + self.max_config_bytes


DEFAULT_LIMITS = KerasLimits()


def raise_hint(name: str) -> str:
    """How to raise the limit ``name`` (a KerasLimits field), for an error message."""
    return (f"raise it with bnlab import-keras --{name.replace('_', '-')} N, or from Python: "
            f"load_keras(path, limits=KerasLimits({name}=N))")


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


# ---------------------------------------------------------------- JSON within limits

def json_depth(data: bytes, limit: int | None = None, *, block: int = 1 << 18) -> int:
    """The deepest nesting of ``[`` / ``{`` outside strings in a JSON text, without recursion (json.loads
    recurses once per level: 100,000 levels crash it), stopping as soon as it passes ``limit``. Linear and
    in bounded memory: numpy over ``block`` bytes at a time, carrying whether a string is open, the parity
    of a run of backslashes and the depth from one block to the next. Exact for valid JSON (where
    backslashes only escape inside strings); for an invalid text some number, and json.loads refuses it."""
    depth = deepest = 0
    in_string = 0  # 1 while a string is open at the block's start
    run = 0  # parity of the backslash run ending at the previous block's last byte
    for offset in range(0, len(data), block):
        a = np.frombuffer(data, dtype=np.uint8, count=min(block, len(data) - offset), offset=offset)
        slashes = np.flatnonzero(a == 0x5C)
        ends = lengths = np.zeros(0, dtype=np.int64)
        if slashes.size:  # runs of consecutive backslashes: where each ends, how long it is
            first = np.r_[True, np.diff(slashes) != 1]
            ends = np.r_[slashes[np.flatnonzero(first)[1:] - 1], slashes[-1]]
            lengths = ends - slashes[first] + 1
            if slashes[0] == 0:
                lengths[0] += run
        quotes = np.flatnonzero(a == 0x22)
        if quotes.size:  # a quote right after an odd run of backslashes is escaped
            escaped = (quotes == 0) & (run == 1)
            if ends.size:
                i = np.minimum(np.searchsorted(ends, quotes - 1), ends.size - 1)
                escaped |= (ends[i] == quotes - 1) & (lengths[i] % 2 == 1)
            quotes = quotes[~escaped]
        opens = (a == 0x5B) | (a == 0x7B)
        brackets = np.flatnonzero(opens | (a == 0x5D) | (a == 0x7D))
        if brackets.size:  # outside a string: an even number of (unescaped) quotes before it
            outside = brackets[(np.searchsorted(quotes, brackets) + in_string) % 2 == 0]
            if outside.size:
                levels = np.cumsum(np.where(opens[outside], 1, -1).astype(np.int64)) + depth
                deepest, depth = max(deepest, int(levels.max())), int(levels[-1])
                if limit is not None and deepest > limit:
                    return deepest
        in_string = (in_string + quotes.size) % 2
        run = int(lengths[-1] % 2) if ends.size and ends[-1] == a.size - 1 else 0
    return deepest


def parse_json(data: bytes | str, what: str, limits: KerasLimits = DEFAULT_LIMITS):
    """A JSON config parsed within ``limits``: its size, then its nesting depth, checked first."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    if len(data) > limits.max_config_bytes:
        raise KerasFileError(f"{what} is {len(data):,} bytes, more than the {limits.max_config_bytes:,} a Keras "
                             f"config may have ({raise_hint('max_config_bytes')})")
    depth = json_depth(data, limits.max_json_depth)  # stops once past the limit
    if depth > limits.max_json_depth:
        raise KerasFileError(f"{what} nests deeper than {limits.max_json_depth} levels, the most a Keras config "
                             f"may ({raise_hint('max_json_depth')})")
    try:  # as UTF-8 text, as Keras writes it: json.loads(bytes) would also take UTF-16, which the scan does not
        value = json.loads(data.decode("utf-8"))
    except RecursionError:  # pragma: no cover - the depth check comes first
        raise KerasFileError(f"{what} is nested too deeply to parse") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4,300 digits
        raise KerasFileError(f"{what} is not JSON ({e})") from None
    return value


# ---------------------------------------------------------------- HDF5 within limits

class _H5Reader:
    """Reads one HDF5 file's groups, attributes and arrays, checking each before it is touched and
    counting the bytes of the arrays read against ``limits.max_weight_bytes``."""

    def __init__(self, h5py, where: str, limits: KerasLimits):
        self.h5py, self.where, self.limits = h5py, where, limits
        self.used = 0  # bytes of the arrays read so far

    def fail(self, message: str):
        raise KerasFileError(f"{self.where}: {message}")

    def child(self, group, name: str, path: str):
        """The object a hard link ``name`` of ``group`` names, or None; any other link is refused unfollowed."""
        h5py = self.h5py
        if not name or name in (".", "..") or "/" in name:
            self.fail(f"the HDF5 name {path!r} is not a plain name")
        links = group.id.links
        key = name.encode("utf-8", "surrogatepass")
        if not links.exists(key):  # looks at this one link only: nothing is followed
            return None
        kind = links.get_info(key).type
        if kind == h5py.h5l.TYPE_SOFT:
            self.fail(f"{path!r} is an HDF5 soft link (to {_text(links.get_val(key))!r}); bnlab follows no links in "
                      "a Keras file (Keras writes none; a link can loop or point anywhere)")
        if kind == h5py.h5l.TYPE_EXTERNAL:
            target = links.get_val(key)
            self.fail(f"{path!r} is an HDF5 external link (to {_text(target[0])!r}, {_text(target[1])!r}); "
                      "bnlab reads nothing outside the file it was given")
        if kind != h5py.h5l.TYPE_HARD:
            self.fail(f"{path!r} is an HDF5 link of an unknown kind ({kind}); bnlab follows only plain links")
        return group[name]

    def walk(self, group, path: str, base: str = ""):
        """The object at the '/'-separated ``path`` under ``group``, hard link by hard link, or None."""
        obj, done = group, base
        for part in [p for p in path.split("/") if p]:
            if not isinstance(obj, self.h5py.Group):
                self.fail(f"{done!r} is an array, expected a group holding {path!r}")
            done = f"{done}/{part}" if done else part
            obj = self.child(obj, part, done)
            if obj is None:
                return None
        return obj

    def check_overhead(self, f, file_bytes: int) -> None:
        """Refuse a file whose bytes beyond its arrays' stored data exceed what its configuration and names may
        take (twice ``max_config_bytes``, plus 16 MiB of HDF5's own metadata). A text attribute's size is not
        known before it is read (see ``KerasLimits``), but it cannot exceed these bytes, so this bounds it
        before anything is read: a 200 MB model_config is refused here, not after HDF5 has read it."""
        arrays = 0

        def add(_name, obj):  # hard links only: HDF5's visit follows no soft or external link
            nonlocal arrays
            if isinstance(obj, self.h5py.Dataset):
                arrays += obj.id.get_storage_size()

        f.visititems(add)
        allowed = 2 * self.limits.max_config_bytes + 16 * MiB
        if file_bytes - arrays > allowed:
            self.fail(f"{file_bytes - arrays:,} of its {file_bytes:,} bytes are not array data, more than a Keras "
                      f"file's configuration and names may take ({allowed:,} bytes: twice "
                      f"KerasLimits.max_config_bytes plus 16 MiB; raise it with --max-config-bytes or "
                      "limits=KerasLimits(max_config_bytes=...))")

    def attr(self, obj, name: str, path: str):
        """An attribute's value after its declared shape and dtype are checked, or None where absent."""
        h5py = self.h5py
        if name not in obj.attrs:
            return None
        aid = h5py.h5a.open(obj.id, name.encode())
        shape, dtype = aid.shape, aid.dtype
        count = math.prod(shape) if shape else 1
        where = f"attribute {name!r} of {path or '/'}"
        if count == 0:  # tf.keras writes a layer without weights as an empty float64 list
            return np.array([], dtype="S1")
        string = h5py.check_string_dtype(dtype)
        if string is None and dtype.kind != "S":
            self.fail(f"{where} has dtype {dtype}, expected text")
        if len(shape) > 1 or count > MAX_NAMES:
            self.fail(f"{where} holds {count:,} entries of shape {shape}, expected one text or a list of names "
                      f"(at most {MAX_NAMES:,})")
        if string is not None and string.length is None:
            declared = count  # variable-length: the text itself is checked once read
        else:
            declared = count * dtype.itemsize
        if declared > self.limits.max_config_bytes:
            self.fail(f"{where} declares {declared:,} bytes, more than the {self.limits.max_config_bytes:,} a Keras "
                      f"config may have ({raise_hint('max_config_bytes')})")
        if string is None or string.length is not None:  # fixed-length: its size was checked above
            return obj.attrs[name]
        # variable-length text: HDF5 gives no size before reading (the attribute's storage is the 16-byte
        # references, the text sits in the global heap), so it is read once, as bytes, through the
        # low-level API (no decoded str copies), and checked before decoding (see KerasLimits)
        buf = np.empty(shape, dtype=dtype)
        aid.read(buf)
        items = buf.ravel().tolist()
        size = sum(len(v) for v in items if isinstance(v, (str, bytes)))
        if size > self.limits.max_config_bytes:
            del buf, items
            self.fail(f"{where} holds {size:,} bytes of text, more than the {self.limits.max_config_bytes:,} a "
                      f"Keras config may have ({raise_hint('max_config_bytes')})")
        text = [v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else v for v in items]
        if not shape:
            return text[0]
        out = np.empty(len(text), dtype=object)
        out[:] = text
        return out

    def array(self, obj, path: str) -> np.ndarray:
        """A dataset's values, after its declared shape, dtype, layout, filters and stored bytes are checked
        against the limits (an unwritten (20000, 20000) float32 array is refused, not filled with 1.6 GB of
        zeros)."""
        h5py, limits = self.h5py, self.limits
        if not isinstance(obj, h5py.Dataset):
            self.fail(f"{path!r} is not an array (an HDF5 {type(obj).__name__})")
        dtype, shape = obj.dtype, obj.shape
        if dtype.kind not in "fiub" or dtype.itemsize > 8:
            self.fail(f"{path!r} has dtype {dtype}, expected numbers (float, int or bool)")
        if shape is None:
            self.fail(f"{path!r} is an empty HDF5 dataset (no shape), expected an array")
        if obj.is_virtual or obj.external:
            how = "a virtual dataset" if obj.is_virtual else f"external storage {obj.external}"
            self.fail(f"{path!r} keeps its values in other files ({how}); bnlab reads nothing outside the file it "
                      "was given")
        nbytes = math.prod(shape) * dtype.itemsize
        if self.used + nbytes > limits.max_weight_bytes:
            before = f" (with the {self.used:,} bytes of the arrays before it)" if self.used else ""
            self.fail(f"{path!r} declares a {shape} {dtype} array of {nbytes:,} bytes{before}, more than the "
                      f"{limits.max_weight_bytes:,} a Keras file's arrays may have ({raise_hint('max_weight_bytes')})")
        plist = obj.id.get_create_plist()
        if plist.get_nfilters():
            names = [_text(plist.get_filter(i)[3]) for i in range(plist.get_nfilters())]
            self.fail(f"{path!r} is stored through HDF5 filters ({', '.join(names)}); Keras writes plain arrays and "
                      "bnlab reads only those (h5repack -f NONE writes them plain)")
        if obj.chunks is not None:
            chunk = math.prod(obj.chunks) * dtype.itemsize
            if chunk > max(nbytes, RATIO_FLOOR):
                self.fail(f"{path!r} declares chunks {obj.chunks} of {chunk:,} bytes, larger than the array itself "
                          f"({shape}, {nbytes:,} bytes)")
        stored = obj.id.get_storage_size()
        if nbytes > RATIO_FLOOR and nbytes > limits.max_compression_ratio * stored:
            self.fail(f"{path!r} declares a {shape} {dtype} array, {nbytes:,} bytes, but the file stores {stored:,} "
                      f"bytes of it (an unwritten array; more than {limits.max_compression_ratio:g}x: "
                      f"{raise_hint('max_compression_ratio')})")
        self.used += nbytes
        return np.asarray(obj[()])


# ---------------------------------------------------------------- the model config

def _layers_of(config: dict, where: str) -> tuple[str, list[dict]]:
    if not isinstance(config, dict):
        raise KerasFileError(f"{where}: the model config is a JSON {type(config).__name__}, expected an object")
    cls = config.get("class_name")
    body = config.get("config", {})
    if cls not in ("Sequential", "Functional", "Model") or not isinstance(body, dict):
        raise KerasFileError(f"{where}: expected a Sequential or Functional model (got class {cls!r})")
    layers = body.get("layers")
    if not isinstance(layers, list) or not all(isinstance(layer, dict) for layer in layers):
        raise KerasFileError(f"{where}: the model config has no layer list")
    if cls != "Sequential":
        _check_linear(layers, where)
    return str(body.get("name", "model")), layers


def _inbound_names(layer: dict) -> list[str]:
    """The names of the layers feeding a Functional layer (Keras 2 and Keras 3 node formats). Recursive
    over the config, whose depth parse_json bounded."""
    names = []

    def walk(obj):
        if isinstance(obj, dict):
            cfg = obj.get("config")
            hist = cfg.get("keras_history") if obj.get("class_name") == "__keras_tensor__" and isinstance(cfg, dict) \
                else None
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


def _config(layer: dict) -> dict:
    cfg = layer.get("config", {})
    return cfg if isinstance(cfg, dict) else {}


def _check_linear(layers: list[dict], where: str) -> None:
    """A Functional model is read only when it is a chain: each layer fed by exactly the one before."""
    for prev, layer in zip(layers, layers[1:]):
        inbound = _inbound_names(layer)
        prev_name = prev.get("name") or _config(prev).get("name")
        if inbound != [prev_name]:
            name = layer.get("name") or _config(layer).get("name")
            raise KerasFileError(f"{where}: only linear Functional graphs are supported; layer {name!r} is fed by "
                                 f"{inbound or 'nothing'} instead of the previous layer {prev_name!r}")


def _dims(shape, where: str) -> tuple | None:
    if not isinstance(shape, list) or len(shape) < 2:
        return None
    dims = tuple(shape[1:])
    if not all(d is None or (isinstance(d, int) and not isinstance(d, bool)) for d in dims):
        raise KerasFileError(f"{where}: the input shape {shape} is not a list of whole numbers")
    return dims


def _input_shape(layers: list[dict], where: str) -> tuple | None:
    for layer in layers:
        cfg = _config(layer)
        shape = cfg.get("batch_shape") or cfg.get("batch_input_shape")
        if shape:
            return _dims(shape, where)
        build = layer.get("build_config")
        if isinstance(build, dict) and build.get("input_shape"):
            return _dims(build["input_shape"], where)
    return None


def _build_shape(layer: dict) -> tuple | None:
    build = layer.get("build_config")
    shape = build.get("input_shape") if isinstance(build, dict) else None
    return tuple(shape[1:]) if isinstance(shape, list) and len(shape) > 1 else None


def _make_layers(raw: list[dict]) -> list[KerasLayer]:
    return [KerasLayer(str(layer.get("class_name", "?")), str(_config(layer).get("name") or layer.get("name", "?")),
                       _config(layer), build_input_shape=_build_shape(layer)) for layer in raw]


# ---------------------------------------------------------------- the formats

def _read_h5(path: Path, limits: KerasLimits) -> KerasModel:
    h5py = _import_h5py()
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise KerasFileError(f"{path}: not an HDF5 file ({e})") from None
    with f:
        r = _H5Reader(h5py, str(path), limits)
        r.check_overhead(f, path.stat().st_size)  # before any text attribute is read
        model_config = r.attr(f, "model_config", "/")
        if model_config is None:
            raise KerasFileError(f"{path}: an HDF5 file without a 'model_config' attribute: a weights-only file "
                                 "(model.save_weights) or not a Keras model; save the whole model with model.save")
        config = parse_json(_text(model_config), f"{path}: its model_config", limits)
        version = r.attr(f, "keras_version", "/")
        version = "unknown" if version is None else _text(version)
        name, raw = _layers_of(config, str(path))
        layers = _make_layers(raw)
        mw = r.child(f, "model_weights", "model_weights")
        if mw is None:
            raise KerasFileError(f"{path}: no 'model_weights' group: the file holds no weights")
        if not isinstance(mw, h5py.Group):
            raise KerasFileError(f"{path}: 'model_weights' is an array, expected a group")
        by_name = {layer.name: layer for layer in layers}
        layer_names = r.attr(mw, "layer_names", "model_weights")
        for lname in ([] if layer_names is None else np.atleast_1d(layer_names).tolist()):
            lname = _text(lname)
            group = r.child(mw, lname, f"model_weights/{lname}")
            if not isinstance(group, h5py.Group):
                raise KerasFileError(f"{path}: layer_names lists {lname!r}, which is not a group of model_weights")
            arrays = {}
            weight_names = r.attr(group, "weight_names", f"model_weights/{lname}")
            for wname in ([] if weight_names is None else np.atleast_1d(weight_names).tolist()):
                wpath = f"model_weights/{lname}/{_text(wname)}"
                dataset = r.walk(group, _text(wname), f"model_weights/{lname}")
                if dataset is None:
                    raise KerasFileError(f"{path}: layer {lname!r} lists the weight {_text(wname)!r}, which the file "
                                         "does not hold (a damaged or hand-edited file)")
                arrays[_weight_key(wname)] = r.array(dataset, wpath)
            if arrays and lname not in by_name:
                raise KerasFileError(f"{path}: weights for layer {lname!r}, which the model config does not have")
            if arrays:
                by_name[lname].weights = arrays
        fmt = "keras2-h5" if version.startswith("2") else "keras3-h5"
    return KerasModel(fmt, version, name, layers, _input_shape(raw, str(path)))


# a Keras 3 layer's variables in file order (vars/0, vars/1, ...), the disabled ones left out
def _variable_names(layer: KerasLayer) -> list[str]:
    cfg, cls = layer.config, layer.class_name
    if cls == "BatchNormalization":
        return [n for n, on in (("gamma", cfg.get("scale", True)), ("beta", cfg.get("center", True)),
                                ("moving_mean", True), ("moving_variance", True)) if on]
    if cls in ("Dense", "Conv2D"):
        return ["kernel", "bias"] if cfg.get("use_bias", True) else ["kernel"]
    return []


def _member(z: zipfile.ZipFile, name: str, limit: int, limit_name: str, where: str, limits: KerasLimits,
            archive_size: int) -> zipfile.ZipInfo:
    """A zip member's entry after its declared (inflated) size and compression ratio are checked."""
    info = z.getinfo(name)
    if info.flag_bits & 0x1:
        raise KerasFileError(f"{where}: {name} is encrypted")
    if info.compress_size > archive_size:  # what the ratio below divides by must be bytes the file has
        raise KerasFileError(f"{where}: {name} claims {info.compress_size:,} stored bytes in a {archive_size:,}-byte "
                             "archive (a damaged or crafted zip)")
    if info.file_size > limit:
        raise KerasFileError(f"{where}: {name} inflates to {info.file_size:,} bytes, more than the {limit:,} "
                             f"allowed ({raise_hint(limit_name)})")
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size > RATIO_FLOOR and ratio > limits.max_compression_ratio:
        raise KerasFileError(f"{where}: {name} inflates from {info.compress_size:,} to {info.file_size:,} bytes "
                             f"({ratio:,.0f}x), more than the {limits.max_compression_ratio:g}x a Keras file's "
                             f"members compress (a zip bomb?; {raise_hint('max_compression_ratio')})")
    return info


def _read_member(z: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, where: str) -> bytes:
    with z.open(info) as fh:
        data = fh.read(limit + 1)  # never more than the checked size, whatever the stream holds
    if len(data) > limit:  # pragma: no cover - zipfile stops at the declared size
        raise KerasFileError(f"{where}: {info.filename} holds more than the {limit:,} bytes it may")
    return data


class _Window:
    """A read-only file object over ``size`` bytes of ``fh`` from ``start``: a stored (uncompressed)
    zip member, which h5py then reads in place, never copied."""

    def __init__(self, fh, start: int, size: int):
        self.fh, self.start, self.size, self.pos = fh, start, size, 0

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = max(0, offset if whence == 0 else self.pos + offset if whence == 1 else self.size + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self.size - self.pos))
        if not n:
            return 0
        self.fh.seek(self.start + self.pos)
        got = self.fh.readinto(memoryview(buffer)[:n])
        self.pos += got
        return got

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n is None or n < 0 else n
        buffer = bytearray(max(0, min(n, self.size - self.pos)))
        return bytes(buffer[:self.readinto(buffer)])

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def flush(self) -> None:
        pass


def _weights_file(z: zipfile.ZipFile, info: zipfile.ZipInfo, raw, where: str):
    """model.weights.h5 as a file object h5py can open, never held in memory: a stored member in place,
    a compressed one inflated into a temporary file (its size checked by ``_member``)."""
    if info.compress_type == zipfile.ZIP_STORED:
        raw.seek(info.header_offset)
        header = raw.read(30)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise KerasFileError(f"{where}: the zip entry of {info.filename} is damaged")
        start = info.header_offset + 30 + sum(struct.unpack("<HH", header[26:30]))
        if info.compress_size != info.file_size or start + info.file_size > raw.seek(0, 2):
            raise KerasFileError(f"{where}: {info.filename} runs past the end of the archive (a truncated file)")
        return _Window(raw, start, info.file_size)
    tmp = tempfile.TemporaryFile()
    with z.open(info) as src:
        shutil.copyfileobj(src, tmp, 1 * MiB)  # zipfile stops at the declared (checked) size
    tmp.seek(0)
    return tmp


def _read_keras_zip(path: Path, limits: KerasLimits) -> KerasModel:
    h5py = _import_h5py()
    where = str(path)
    with open(path, "rb") as raw:
        size = raw.seek(0, 2)
        try:
            z = zipfile.ZipFile(raw)
        except zipfile.BadZipFile as e:
            raise KerasFileError(f"{path}: not a .keras archive (a zip file) ({e})") from None
        with z:
            names = set(z.namelist())
            missing = {"config.json", "model.weights.h5"} - names
            if missing:
                raise KerasFileError(f"{path}: a .keras archive needs config.json and model.weights.h5 "
                                     f"(missing {sorted(missing)})")
            texts = {}
            for member in ("config.json", "metadata.json"):
                if member in names:
                    info = _member(z, member, limits.max_config_bytes, "max_config_bytes", where, limits, size)
                    texts[member] = parse_json(_read_member(z, info, limits.max_config_bytes, where),
                                               f"{path}: {member}", limits)
            config, meta = texts["config.json"], texts.get("metadata.json", {})
            name, raw_layers = _layers_of(config, where)
            layers = _make_layers(raw_layers)
            info = _member(z, "model.weights.h5", limits.max_weights_file_bytes, "max_weight_bytes", where, limits,
                           size)
            fileobj = _weights_file(z, info, raw, where)
            try:
                try:
                    f = h5py.File(fileobj, "r")
                except OSError as e:
                    raise KerasFileError(f"{path}: model.weights.h5 is not an HDF5 file ({e})") from None
                with f:
                    _read_vars(_H5Reader(h5py, f"{path}: model.weights.h5", limits), f, layers)
            finally:
                if fileobj is not raw and hasattr(fileobj, "close"):
                    fileobj.close()
    version = meta.get("keras_version", "unknown") if isinstance(meta, dict) else "unknown"
    return KerasModel("keras3-zip", str(version), name, layers, _input_shape(raw_layers, where))


def _read_vars(r: _H5Reader, f, layers: list[KerasLayer]) -> None:
    counts: dict[str, int] = {}
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
        group = r.walk(f, f"{key}/vars")
        if group is None:
            r.fail(f"no weights at {key}/vars for layer {layer.name!r}")
        if not isinstance(group, r.h5py.Group):
            r.fail(f"{key}/vars is an array, expected the group of layer {layer.name!r}'s variables")
        if len(group) != len(wanted):
            r.fail(f"layer {layer.name!r} has {len(group)} arrays at {key}/vars, expected {len(wanted)} "
                   f"({', '.join(wanted)})")
        arrays = {}
        for i, w in enumerate(wanted):
            dataset = r.child(group, str(i), f"{key}/vars/{i}")
            if dataset is None:
                r.fail(f"no array {key}/vars/{i} ({w}) for layer {layer.name!r}")
            arrays[w] = r.array(dataset, f"{key}/vars/{i}")
        layer.weights = arrays


def _not_a_file(path: Path) -> str:
    """What a path that is not a regular file is, for a message (a folder, a FIFO, a device ...)."""
    import stat

    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "a broken symbolic link" if path.is_symlink() else "no such file"
    except OSError as e:
        return f"cannot be examined ({e.strerror or e})"
    link = " (through a symbolic link)" if path.is_symlink() else ""
    for test, what in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return f"is {what}{link}, not a regular file"
    return f"not a regular file{link}"


def read_keras_file(path: str | Path, *, limits: KerasLimits | None = None) -> KerasModel:
    """The layer list and weights of a Keras ``.h5`` or ``.keras`` file, read within ``limits``
    (``KerasLimits()`` by default); KerasFileError says what the file holds and which limit it passes."""
    path = Path(path)
    limits = DEFAULT_LIMITS if limits is None else limits
    if not path.is_file():
        raise KerasFileError(f"{path}: {_not_a_file(path)} (expected a Keras .h5 or .keras file)")
    with open(path, "rb") as fh:
        head = fh.read(8)
    try:
        if head.startswith(b"PK"):
            return _read_keras_zip(path, limits)
        if head.startswith(b"\x89HDF\r\n\x1a\n"):
            return _read_h5(path, limits)
    except KerasFileError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError, zipfile.BadZipFile) as e:  # h5py / zip: damaged
        raise KerasFileError(f"{path}: cannot be read as a Keras file ({type(e).__name__}: {e})") from None
    raise KerasFileError(f"{path}: neither a .keras archive (zip) nor an HDF5 .h5 file (first bytes {head!r})")
