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


def _load_batch(raw: bytes) -> dict:
    return _SafeUnpickler(io.BytesIO(raw), encoding="latin1").load()


LAYOUT = {
    10: {"dir": "cifar-10-batches-py", "train": [f"data_batch_{i}" for i in range(1, 6)],
         "test": ["test_batch"], "labels": "labels", "meta": ("batches.meta", "label_names")},
    100: {"dir": "cifar-100-python", "train": ["train"], "test": ["test"], "labels": "fine_labels",
          "meta": ("meta", "fine_label_names")},
}


def read_cifar_tarball(path: str | Path, num_classes: int):
    """Return (x_train, y_train, x_test, y_test, class_names); images uint8 (N, 3, 32, 32)."""
    layout = LAYOUT[num_classes]
    path = Path(path)
    try:
        with tarfile.open(path, "r:gz") as tar:
            def member(name: str) -> bytes:
                f = tar.extractfile(f"{layout['dir']}/{name}")
                if f is None:
                    raise KeyError(name)
                return f.read()

            def split(names):
                xs, ys = [], []
                for n in names:
                    batch = _load_batch(member(n))
                    xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                    ys.append(np.asarray(batch[layout["labels"]], dtype=np.int64))
                return np.concatenate(xs), np.concatenate(ys)

            x_train, y_train = split(layout["train"])
            x_test, y_test = split(layout["test"])
            meta_file, meta_key = layout["meta"]
            names = [str(n) for n in _load_batch(member(meta_file))[meta_key]]
    except (tarfile.TarError, OSError, EOFError, KeyError, pickle.UnpicklingError, ValueError, zlib.error) as e:
        raise CorruptFileError(f"{path}: not a valid CIFAR-{num_classes} python archive ({e})") from e
    for y in (y_train, y_test):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise CorruptFileError(f"{path}: labels outside 0..{num_classes - 1}")
    return x_train, y_train, x_test, y_test, names
