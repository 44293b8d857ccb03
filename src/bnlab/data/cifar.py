"""The CIFAR-10 / CIFAR-100 "python version" tarballs, read without torchvision.

The batches inside are pickled dicts of NumPy arrays. They are loaded with a restricted
unpickler that only builds plain containers and NumPy arrays, so a tampered archive cannot run
code.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import zlib
from pathlib import Path

import numpy as np

from bnlab.data.idx import CorruptFileError

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def _load_batch(raw: bytes):
    try:
        return _SafeUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except pickle.UnpicklingError:
        raise
    except Exception as e:  # garbage bytes make the unpickler fail in many ways: all mean "corrupt"
        raise pickle.UnpicklingError(f"not a readable pickle ({type(e).__name__}: {e})") from e


LAYOUT = {
    10: {"dir": "cifar-10-batches-py", "train": [f"data_batch_{i}" for i in range(1, 6)],
         "test": ["test_batch"], "labels": "labels", "meta": ("batches.meta", "label_names")},
    100: {"dir": "cifar-100-python", "train": ["train"], "test": ["test"], "labels": "fine_labels",
          "meta": ("meta", "fine_label_names")},
}


def read_cifar_tarball(path: str | Path, num_classes: int):
    """Return (x_train, y_train, x_test, y_test, class_names); images uint8 (N, 3, 32, 32).
    Anything else in the archive (a missing batch, a batch of another shape, labels out of range,
    code in a pickle) is a CorruptFileError naming the member and what is wrong."""
    layout = LAYOUT[num_classes]
    path = Path(path)

    def member(tar, name: str) -> bytes:
        full = f"{layout['dir']}/{name}"
        try:
            f = tar.extractfile(full)
        except KeyError:
            f = None
        if f is None:
            raise CorruptFileError(f"{path}: not a CIFAR-{num_classes} python archive: it has no file {full}")
        return f.read()

    def batch(tar, name: str, keys: tuple[str, ...]) -> dict:
        content = _load_batch(member(tar, name))
        if not isinstance(content, dict) or any(k not in content for k in keys):
            raise CorruptFileError(f"{path}: {layout['dir']}/{name} is not a CIFAR batch (expected a dict with "
                                   f"{', '.join(keys)})")
        return content

    def split(tar, names):
        xs, ys = [], []
        for n in names:
            b = batch(tar, n, ("data", layout["labels"]))
            x, y = np.asarray(b["data"]), np.asarray(b[layout["labels"]])
            if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
                raise CorruptFileError(f"{path}: {layout['dir']}/{n} holds images of shape {x.shape} {x.dtype}, "
                                       "expected (N, 3072) uint8 (32x32 RGB)")
            if y.ndim != 1 or len(y) != len(x) or y.dtype.kind not in "iu":
                raise CorruptFileError(f"{path}: {layout['dir']}/{n} holds {len(x)} images but labels of shape "
                                       f"{y.shape} {y.dtype}")
            xs.append(x.reshape(-1, 3, 32, 32))
            ys.append(y.astype(np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    try:
        with tarfile.open(path, "r:gz") as tar:
            x_train, y_train = split(tar, layout["train"])
            x_test, y_test = split(tar, layout["test"])
            meta_file, meta_key = layout["meta"]
            names = [str(n) for n in batch(tar, meta_file, (meta_key,))[meta_key]]
    except CorruptFileError:
        raise
    except (tarfile.TarError, OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, zlib.error) as e:
        raise CorruptFileError(f"{path}: not a valid CIFAR-{num_classes} python archive ({type(e).__name__}: "
                               f"{e})") from e
    if len(names) != num_classes:
        raise CorruptFileError(f"{path}: {layout['dir']}/{meta_file} names {len(names)} classes, "
                               f"expected {num_classes}")
    for y, part in ((y_train, "training"), (y_test, "test")):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise CorruptFileError(f"{path}: {part} labels outside 0..{num_classes - 1} (min {y.min()}, max {y.max()})")
    return x_train, y_train, x_test, y_test, names
