"""Hostile Keras files (issue 27): each one crafted here with h5py and zipfile, each refused before the
memory it asks for is taken, in one ``error:`` line (exit 2) that names what the file declares, the limit
and how to raise it. The attack numbers these replace: a 1 MB .keras whose weights inflate to 1 GiB
peaked at 2.2 GB; a config.json padded to 576 MiB of spaces was accepted at 1.3 GB; a 96 KB file
declaring an unwritten (20000, 20000) array reached 1.9 GB; a soft-link loop, a 100,000-deep config,
epsilon -1 and 10**12 units gave tracebacks."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from bnlab.cli import app
from bnlab.keras import KerasFileError, KerasLimits, load_keras
from bnlab.keras.files import json_depth
from keras_files import (tiny_keras2_config, tiny_keras3_config, write_keras2_h5, write_keras3_weights,
                         write_keras_zip)

pytestmark = pytest.mark.hostile  # issue 27's hostile-input suite: pytest -m hostile

runner = CliRunner()
MiB = 1024**2
TESTS = Path(__file__).parent


def _zeros(total: int, chunk: int = 4 * MiB):
    block = bytes(chunk)
    for _ in range(total // chunk):
        yield block


def _unwritten(path: str):
    """An edit replacing the array at ``path`` by a (20000, 20000) float32 one that is never written (the
    file stores nothing for it: reading it would make 1.6 GB of fill values)."""
    def edit(f):
        del f[path]
        f.create_dataset(path, shape=(20000, 20000), dtype="f4")
    return edit


def _loop(a: str, b: str):
    def edit(f):
        del f[a]
        f[a] = h5py.SoftLink("/" + b)
        f[b] = h5py.SoftLink("/" + a)
    return edit


def _deep_config(cfg: dict, depth: int = 100_000) -> bytes:
    cfg = dict(cfg, extra=None)
    return json.dumps(cfg).replace("null", "[" * depth + "]" * depth).encode()


# ---- the hostile files: name -> (writer(folder) -> path, what the one error line must say)

def _bomb(d: Path, inflated: int = 64 * MiB) -> Path:
    """Weights that inflate ~1000x (a valid HDF5 file followed by zeros)."""
    write_keras3_weights(d / "w.h5")
    h5 = (d / "w.h5").read_bytes()
    write_keras_zip(d / "bomb.keras", compression=zipfile.ZIP_DEFLATED,
                    members={"model.weights.h5": (c for c in [h5, *_zeros(inflated)])})
    return d / "bomb.keras"


def _padded(d: Path, spaces: int = 64 * MiB) -> Path:
    cfg = json.dumps(tiny_keras3_config()).encode()
    write_keras_zip(d / "padded.keras", compression=zipfile.ZIP_DEFLATED,
                    members={"config.json": (c for c in [cfg[:-1], *(b" " * MiB for _ in range(spaces // MiB)),
                                                         cfg[-1:]])})
    return d / "padded.keras"


def _weights_zip(d: Path, name: str, edit) -> Path:
    write_keras3_weights(d / f"{name}.weights.h5", edit=edit)
    write_keras_zip(d / f"{name}.keras", weights_file=d / f"{name}.weights.h5")
    return d / f"{name}.keras"


def _external_link(d: Path) -> Path:
    write_keras3_weights(d / "outside.h5")

    def edit(f):
        del f["layers/dense"]
        f["layers/dense"] = h5py.ExternalLink(str(d / "outside.h5"), "/layers/dense")
    return _weights_zip(d, "extlink", edit)


def _external_storage(d: Path) -> Path:
    np.zeros((4, 3), "f4").tofile(d / "raw.bin")

    def edit(f):
        del f["model_weights/dense/dense/kernel:0"]
        f.create_dataset("model_weights/dense/dense/kernel:0", shape=(4, 3), dtype="f4",
                         external=[(str(d / "raw.bin"), 0, 48)])
    write_keras2_h5(d / "extstore.h5", edit=edit)
    return d / "extstore.h5"


def _gzip(d: Path) -> Path:
    def edit(f):
        data = f["layers/dense/vars/0"][()]
        del f["layers/dense/vars/0"]
        f.create_dataset("layers/dense/vars/0", data=data, compression="gzip")
    return _weights_zip(d, "gzip", edit)


def _big_chunks(d: Path) -> Path:
    def edit(f):
        del f["layers/dense/vars/1"]
        f.create_dataset("layers/dense/vars/1", shape=(3,), maxshape=(None,), chunks=(2**20,), dtype="f4")
    return _weights_zip(d, "chunks", edit)


def _h5(name: str, **kwargs):
    def make(d: Path) -> Path:
        write_keras2_h5(d / f"{name}.h5", **kwargs)
        return d / f"{name}.h5"
    return make


def _zip(name: str, **kwargs):
    def make(d: Path) -> Path:
        write_keras_zip(d / f"{name}.keras", **kwargs)
        return d / f"{name}.keras"
    return make


HOSTILE = {
    "zip-bomb-weights": (_bomb, ["model.weights.h5 inflates from", "more than the 100x", "--max-compression-ratio"]),
    "config-padded-with-spaces": (_padded, ["config.json inflates to 67,", "more than the 16,777,216 allowed",
                                            "--max-config-bytes"]),
    "unwritten-20000x20000-keras": (
        lambda d: _weights_zip(d, "unwritten", _unwritten("layers/dense/vars/0")),
        ["'layers/dense/vars/0' declares a (20000, 20000) float32 array of 1,600,000,000 bytes",
         "more than the 1,073,741,824", "--max-weight-bytes"]),
    "unwritten-20000x20000-h5": (
        _h5("unwritten", edit=_unwritten("model_weights/dense/dense/kernel:0")),
        ["'model_weights/dense/dense/kernel:0' declares a (20000, 20000) float32 array", "--max-weight-bytes"]),
    "soft-link-loop-keras": (lambda d: _weights_zip(d, "loop", _loop("layers/dense", "layers/loop")),
                             ["'layers/dense' is an HDF5 soft link", "follows no links"]),
    "soft-link-loop-h5": (_h5("loop", edit=_loop("model_weights/dense", "model_weights/loop")),
                          ["'model_weights/dense' is an HDF5 soft link", "follows no links"]),
    "external-link": (_external_link, ["'layers/dense' is an HDF5 external link", "outside.h5",
                                       "reads nothing outside the file"]),
    "external-storage": (_external_storage, ["external storage", "raw.bin", "reads nothing outside the file"]),
    "gzip-array": (_gzip, ["'layers/dense/vars/0' is stored through HDF5 filters (deflate)", "h5repack"]),
    "chunks-larger-than-array": (_big_chunks, ["declares chunks (1048576,)", "larger than the array"]),
    "config-100000-deep-keras": (_zip("deep", config_bytes=_deep_config(tiny_keras3_config())),
                                 ["config.json nests deeper than 100 levels", "--max-json-depth"]),
    "config-100000-deep-h5": (_h5("deep", model_config=_deep_config(tiny_keras2_config()).decode()),
                              ["model_config nests deeper than 100 levels", "--max-json-depth"]),
    "bn-epsilon-minus-1-keras": (_zip("eps", config=tiny_keras3_config(epsilon=-1)),
                                 ["layer 'batch_normalization' (BatchNormalization): epsilon must be > 0 (got -1)"]),
    "bn-epsilon-minus-1-h5": (_h5("eps", config=tiny_keras2_config(epsilon=-1)),
                              ["layer 'batch_normalization' (BatchNormalization): epsilon must be > 0 (got -1)"]),
    "dense-units-10**12": (_zip("units", config=tiny_keras3_config(units=10**12)),
                           ["layer 'dense' (Dense): units must be <= 65,536 (got 1000000000000)"]),
    "kernel-of-the-wrong-shape": (_zip("shape", config=tiny_keras3_config(features=5)),
                                  ["layer 'dense' (Dense): kernel has shape (4, 3) in the file", "need (5, 3)"]),
}


def _one_error_line(res, parts: list[str]) -> str:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and not isinstance(res.exception, (KeyError, RuntimeError, ValueError))
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


@pytest.mark.parametrize("case", list(HOSTILE))
def test_import_keras_refuses_in_one_error_line(case, tmp_path):
    make, parts = HOSTILE[case]
    path = make(tmp_path)
    res = runner.invoke(app, ["import-keras", str(path), "--out", str(tmp_path / "out")])
    line = _one_error_line(res, parts)
    assert str(path) in line  # the file is named
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["unwritten-20000x20000-h5", "soft-link-loop-keras", "bn-epsilon-minus-1-keras",
                                  "dense-units-10**12", "config-100000-deep-keras"])
@pytest.mark.parametrize("command", ["summary", "predict", "fold"])
def test_every_command_taking_a_checkpoint_refuses_in_one_error_line(case, command, tmp_path):
    make, parts = HOSTILE[case]
    path = make(tmp_path)
    np.save(tmp_path / "x.npy", np.zeros((2, 4), "f4"))
    args = {"summary": ["summary", str(path)], "predict": ["predict", str(path), str(tmp_path / "x.npy")],
            "fold": ["fold", str(path), "--out", str(tmp_path / "folded")]}[command]
    _one_error_line(runner.invoke(app, args), parts)


def test_limits_are_raised_from_the_command_line_and_from_python(tmp_path):
    path = _zip("ok")(tmp_path)
    res = runner.invoke(app, ["import-keras", str(path), "--out", str(tmp_path / "a"), "--max-weight-bytes", "100"])
    _one_error_line(res, ["more than the 100 a Keras file's arrays may have", "--max-weight-bytes N",
                          "KerasLimits(max_weight_bytes=N)"])
    with pytest.raises(KerasFileError, match="more than the 100 "):
        load_keras(path, limits=KerasLimits(max_weight_bytes=100))
    res = runner.invoke(app, ["import-keras", str(path), "--out", str(tmp_path / "b"), "--max-weight-bytes", "2GiB",
                              "--max-config-bytes", "1M", "--max-json-depth", "20"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["import-keras", str(path), "--out", str(tmp_path / "c"), "--max-json-depth", "3"])
    _one_error_line(res, ["nests deeper than 3 levels"])
    res = runner.invoke(app, ["import-keras", str(path), "--out", str(tmp_path / "d"), "--max-weight-bytes", "lots"])
    _one_error_line(res, ["--max-weight-bytes expects a positive size"])
    # an unwritten array under a raised weight limit is still refused: the file stores none of it
    big = HOSTILE["unwritten-20000x20000-keras"][0](tmp_path)
    res = runner.invoke(app, ["import-keras", str(big), "--out", str(tmp_path / "e"), "--max-weight-bytes", "4G"])
    _one_error_line(res, ["1,600,000,000 bytes, but the file stores 0 bytes of it", "--max-compression-ratio"])
    with pytest.raises(ValueError, match="max_weight_bytes must be a positive number"):
        KerasLimits(max_weight_bytes=0)
    assert "--max-weight-bytes" in runner.invoke(app, ["import-keras", "--help"]).output


def test_a_compressed_archive_within_the_limits_reads_as_the_stored_one(tmp_path):
    """Keras stores model.weights.h5 uncompressed (read in place); a re-zipped, deflated archive is read
    through a temporary file and gives the same model."""
    import torch

    stored, deflated = _zip("stored")(tmp_path), _zip("deflated", compression=zipfile.ZIP_DEFLATED)(tmp_path)
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(3, 4)).astype("f4"))
    a, b = load_keras(stored).model, load_keras(deflated).model
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("text", [
    json.dumps({"k\\": ["\\\"", {"\"[": [["\\"]]}], "z": "}\\\\"}),
    '{"a": "[[[\\"]]]", "b": [[1, {"c": []}]], "d\\\\": "x\\\\", "e": "\\\\\\"[{"}',
    '[[[[]]], "]]]]", [{"k": "{\\\\"}], {}]', '"just a [string]"', "7", "[]", '{"a": [[[[[[[["deep"]]]]]]]]}',
])
def test_json_depth_counts_brackets_outside_strings_exactly(text):
    def depth(v):
        if isinstance(v, list):
            return 1 + max((depth(x) for x in v), default=0)
        if isinstance(v, dict):
            return 1 + max((depth(x) for x in v.values()), default=0)
        return 0

    for block in (1, 2, 3, 7, 1 << 18):  # the carries from one block to the next: open strings, backslash runs
        assert json_depth(text.encode(), block=block) == depth(json.loads(text)), block
    assert json_depth(b"[" * 100_000, 100) > 100
    assert json_depth(b"[" * 100_000, 100, block=7) <= 107  # stops at the block that passes the limit


# ---- memory: a refused file costs next to nothing

_PEAK = """
import json, resource, sys
from bnlab.keras import KerasFileError, load_keras
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux reports KiB)
load_keras(sys.argv[1])  # a legitimate tiny file first: every lazy import done, the baseline measured after
out = {"baseline": peak()}
for path in sys.argv[2:]:
    try:
        load_keras(path)
        out[path] = [peak(), "accepted"]
    except KerasFileError as e:
        out[path] = [peak(), str(e)]
print(json.dumps(out))
"""


def _peaks(files: list[Path], ok: Path) -> dict:
    res = subprocess.run([sys.executable, "-c", _PEAK, str(ok), *map(str, files)], capture_output=True, text=True,
                         timeout=300, cwd=TESTS)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout)


MEMORY_CASES = ["zip-bomb-weights", "config-padded-with-spaces", "unwritten-20000x20000-keras",
                "unwritten-20000x20000-h5", "config-100000-deep-keras"]


def test_refused_files_stay_within_twice_their_legitimate_content(tmp_path):
    """Peak RSS of one process opening every memory attack (64 MiB bomb, 64 MiB of spaces, the unwritten
    1.6 GB array, the deep config) stays within the baseline + 2x the files' legitimate content (~14 KB
    each) + 32 MiB of allocator noise; before the limits the bomb alone added >64 MiB and the array 1.6 GB.
    The high-water mark only rises, so checking the last one against the baseline checks them all."""
    files = []
    for case in MEMORY_CASES:
        folder = tmp_path / case
        folder.mkdir()
        files.append(HOSTILE[case][0](folder))
    peaks = _peaks(files, _zip("ok")(tmp_path))
    for path in map(str, files):
        assert peaks[path][1] != "accepted", path
        assert peaks[path][0] - peaks["baseline"] < 2 * 14_000 + 32 * MiB, (path, peaks)


@pytest.mark.slow
def test_the_attack_sizes_of_issue_27_are_refused_cheaply(tmp_path):
    """The attacker's own sizes: weights inflating to 1 GiB (was 2.2 GB peak), a config padded to 576 MiB
    (accepted at 1.3 GB), the unwritten (20000, 20000) array (1.9 GB): each in its own process, within the
    baseline + 64 MiB."""
    made = {"bomb": _bomb(tmp_path, 1024 * MiB), "padded": _padded(tmp_path, 576 * MiB),
            "unwritten": HOSTILE["unwritten-20000x20000-h5"][0](tmp_path)}
    ok = _zip("ok")(tmp_path)
    for name, path in made.items():
        peaks = _peaks([path], ok)
        assert peaks[str(path)][1] != "accepted"
        assert peaks[str(path)][0] - peaks["baseline"] < 64 * MiB, (name, peaks)


# ---- issue: a tiny file declaring a huge input; configs of the wrong JSON type; paths that are not files

def _big_input_keras(d: Path, side: int = 4096, filters: int = 8) -> Path:
    """A ~18 KB .keras: Input (side, side, 1) -> Conv2D(filters, 1x1) -> GlobalAveragePooling2D -> Dense(2).
    A real forward of batch 2 at its declared input makes a 2 x side^2 x filters float32 map (1 GiB here)."""
    def layer(cls, name, config, shape):
        return {"module": "keras.layers", "class_name": cls, "config": {"name": name, "dtype": "float32", **config},
                "build_config": {"input_shape": [None, *shape]}}

    cfg = {"module": "keras", "class_name": "Sequential", "config": {"name": "big", "layers": [
        {"module": "keras.layers", "class_name": "InputLayer",
         "config": {"batch_shape": [None, side, side, 1], "dtype": "float32", "name": "input_layer"}},
        layer("Conv2D", "conv2d", {"filters": filters, "kernel_size": [1, 1], "strides": [1, 1], "padding": "valid",
                                   "activation": "relu", "use_bias": True}, [side, side, 1]),
        layer("GlobalAveragePooling2D", "global_average_pooling2d", {}, [side, side, filters]),
        layer("Dense", "dense", {"units": 2, "activation": "softmax", "use_bias": True}, [filters])]}}
    weights = {"conv2d": [np.ones((1, 1, 1, filters), "f4"), np.zeros(filters, "f4")],
               "dense": [np.ones((filters, 2), "f4"), np.zeros(2, "f4")]}
    write_keras3_weights(d / "big.weights.h5", weights=weights)
    write_keras_zip(d / "big.keras", config=cfg, weights_file=d / "big.weights.h5")
    return d / "big.keras"


_SUMMARY_PEAK = """
import json, resource, sys
from bnlab.deploy.summary import summary_of
from bnlab.keras import import_keras
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
summary_of(sys.argv[1])  # a legitimate tiny file first: every lazy import done
out = {"baseline": peak()}
s = summary_of(sys.argv[2])
out["keras"] = [peak(), [list(r.output_shape) for r in s.rows], s.total]
import_keras(sys.argv[2], sys.argv[3])
s = summary_of(sys.argv[3])
out["import"] = [peak(), s.total]
s = summary_of(sys.argv[4])
out["spec"] = [peak(), [list(r.output_shape) for r in s.rows][-2:]]
print(json.dumps(out))
"""


def test_summary_and_import_of_a_huge_declared_input_allocate_no_activations(tmp_path):
    """A 18 KB file declaring a (4096, 4096, 1) input took 1.4 GB in summary / import-keras (a forward of
    zeros at that shape); a spec file with a (1, 2048, 2048) input and 64 filters 2 GiB. The summary now
    runs on the meta device: within the baseline + 64 MiB, and the same shapes and counts."""
    big = _big_input_keras(tmp_path)
    spec = tmp_path / "big_spec.json"
    spec.write_text(json.dumps({"kind": "cnn", "blocks": [64], "input_shape": [1, 2048, 2048],
                                "final_block": None, "head": "gap"}))
    res = subprocess.run([sys.executable, "-c", _SUMMARY_PEAK, str(_zip("ok")(tmp_path)), str(big),
                          str(tmp_path / "imported"), str(spec)], capture_output=True, text=True, timeout=300,
                         cwd=TESTS)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout)
    assert [1, 4096, 4096] in out["keras"][1] and out["keras"][1][-2:] == [[8], [2]]
    assert out["keras"][2] == 8 * 2 + 8 * 2 + 2
    assert out["import"][1] == out["keras"][2]
    assert len(out["spec"][1][-1]) == 1  # the head's (classes,)
    for key in ("keras", "import", "spec"):
        assert out[key][0] - out["baseline"] < 64 * MiB, (key, out)


def test_a_model_that_cannot_run_on_meta_gets_a_bounded_real_forward(monkeypatch):
    """Only where the meta forward fails (code reading a value) does summarize run a real one, and only
    within MAX_SUMMARY_ACTIVATION_BYTES of estimated activations (1 GiB; lowered here to keep the test small)."""
    import torch
    from torch import nn

    summary_module = importlib.import_module("bnlab.models.summary")
    from bnlab.models.summary import summarize

    monkeypatch.setattr(summary_module, "MAX_SUMMARY_ACTIVATION_BYTES", 1_000_000, raising=False)

    class Reads(nn.Module):  # reads a value: cannot run on the meta device
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 64, 1)
            self.head = nn.Linear(64, 2)

        def forward(self, x):
            y = self.conv(x).mean((2, 3))
            return self.head(y) * float(y.abs().sum() >= 0)

    with pytest.raises(ValueError, match=r"\(1, 64, 64\) would allocate activations of about 2,097,152 bytes, more "
                                         r"than the 1,000,000 \(bnlab.models.summary.MAX_SUMMARY_ACTIVATION_BYTES\)"):
        summarize(Reads(), (1, 64, 64))
    s = summarize(Reads(), (1, 8, 8))
    assert [r.output_shape for r in s.rows] == [(64, 8, 8), (2,)] and s.total == 128 + 130
    assert isinstance(next(Reads().parameters()), torch.nn.Parameter)


def _typed(**changes):
    """The tiny .keras with config fields replaced: layer name -> {field: value}."""
    cfg = tiny_keras3_config()
    for layer in cfg["config"]["layers"]:
        layer["config"].update(changes.get(layer["config"]["name"], {}))
    return _zip("typed", config=cfg)


def _bool_kernel(d: Path) -> Path:
    def edit(f):
        del f["layers/dense/vars/0"]
        f.create_dataset("layers/dense/vars/0", data=np.ones((4, 3), bool))
    return _weights_zip(d, "boolkernel", edit)


TYPED = {
    "units-3.0": (_typed(dense={"units": 3.0}), "layer 'dense' (Dense): units must be an integer (got 3.0)"),
    "units-true": (_typed(dense={"units": True}), "layer 'dense' (Dense): units must be an integer (got True)"),
    "epsilon-true": (_typed(batch_normalization={"epsilon": True}),
                     "layer 'batch_normalization' (BatchNormalization): epsilon must be a number (got True)"),
    "momentum-string": (_typed(batch_normalization={"momentum": "0.9"}),
                        "layer 'batch_normalization' (BatchNormalization): momentum must be a number (got '0.9')"),
    "center-string": (_typed(batch_normalization={"center": "false"}),
                      "layer 'batch_normalization' (BatchNormalization): center must be true or false (got 'false')"),
    "use-bias-1": (_typed(dense_1={"use_bias": 1}), "layer 'dense_1' (Dense): use_bias must be true or false (got 1)"),
    "bool-kernel": (_bool_kernel, "layer 'dense' (Dense): kernel must be a floating-point array (got dtype bool"),
}


@pytest.mark.parametrize("case", list(TYPED))
def test_keras_config_fields_must_have_their_json_type(case, tmp_path):
    make, part = TYPED[case]
    path = make(tmp_path)
    _one_error_line(runner.invoke(app, ["import-keras", str(path), "--out", str(tmp_path / "out")]), [part])
    assert not (tmp_path / "out").exists()


def test_import_keras_says_what_a_path_that_is_not_a_file_is(tmp_path):
    import os

    (tmp_path / "folder.keras").mkdir()
    os.mkfifo(tmp_path / "pipe.h5")
    (tmp_path / "zero.keras").symlink_to("/dev/zero")
    for name, what in [("folder.keras", "is a folder, not a regular file"),
                       ("pipe.h5", "is a FIFO (named pipe), not a regular file"),
                       ("zero.keras", "is a character device (through a symbolic link), not a regular file"),
                       ("missing.h5", "no such file")]:
        res = runner.invoke(app, ["import-keras", str(tmp_path / name), "--out", str(tmp_path / "out")])
        line = _one_error_line(res, [f"{tmp_path / name}: {what}"])
        assert ("no such file" in line) == (name == "missing.h5"), line


def test_a_huge_text_attribute_is_refused_before_hdf5_reads_it(tmp_path):
    """A .h5 whose model_config is a 64 MiB variable-length string: HDF5 cannot size it before reading it, and
    reading it took ~5x the text. The bytes of the file beyond its arrays bound every text attribute, so the
    file is refused before any is read (twice max_config_bytes + 16 MiB = 48 MiB by default)."""
    import h5py

    path = tmp_path / "huge-attr.h5"
    with h5py.File(path, "w", libver="latest") as f:  # dense attribute storage: no 64 KB attribute limit
        f.attrs["model_config"] = "{" + " " * (64 * MiB) + "}"
        f.attrs["keras_version"] = "2.15.0"
    peaks = _peaks([path], _zip("ok")(tmp_path))
    assert "are not array data, more than a Keras file's configuration and names may take" in peaks[str(path)][1]
    assert peaks[str(path)][0] - peaks["baseline"] < 16 * MiB, peaks
