"""``bnlab import-keras``: a Keras .h5 / .keras file as a bnlab checkpoint."""

from __future__ import annotations

import re
from pathlib import Path

import typer

from bnlab.cli.app import _fail, app, check_out_folder, describe_error, fail_if_out_of_memory, say
from bnlab.keras.files import DEFAULT_LIMITS

_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def size_text(n: int) -> str:
    """bytes -> the shortest exact text parse_bytes reads back (``1GiB``, ``16MiB``, ``1000``)."""
    for unit in "tgmk":
        if n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit.upper()}iB"
    return str(n)


def parse_bytes(text: str, option: str) -> int:
    """``1073741824``, ``2G``, ``2GiB``, ``512MB``, ``64k`` -> bytes (binary units: 1G = 1024**3)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not m or float(m[1]) * _UNITS[m[2]] < 1:
        _fail(f"{option} expects a positive size such as 2000000000, 2G or 512MiB (got {text!r})")
    return int(float(m[1]) * _UNITS[m[2]])


@app.command("import-keras")
def import_keras_cmd(
    file: Path = typer.Argument(..., help="A Keras 2 .h5 (tf.keras), Keras 3 legacy .h5 or Keras 3 .keras file."),
    out: Path = typer.Option(..., help="Folder for the bnlab checkpoint."),
    convention: str = typer.Option("keras", help="BN convention of the imported layers: keras (Keras's eps and "
                                                 "momentum kept) or torch (momentum 1 - m, same eps)."),
    max_weight_bytes: str = typer.Option(
        size_text(DEFAULT_LIMITS.max_weight_bytes), help="Refuse a file whose arrays declare more bytes than this in all (shape x item size, checked "
                     "before reading; a .keras's model.weights.h5 may inflate to 4x it). Sizes: 2G, 512MiB, bytes."),
    max_config_bytes: str = typer.Option(
        size_text(DEFAULT_LIMITS.max_config_bytes), help="Refuse a model config (config.json, metadata.json, model_config) larger than this."),
    max_json_depth: int = typer.Option(DEFAULT_LIMITS.max_json_depth, min=1,
                                       help="Refuse a JSON config nested deeper than this."),
    max_compression_ratio: float = typer.Option(
        DEFAULT_LIMITS.max_compression_ratio, min=1.0,
        help="Refuse a zip member or an array over 1 MiB that inflates to more than this many times the bytes "
             "the file stores for it (a zip bomb, an array declared but never written)."),
) -> None:
    """Convert a Keras model file (no TensorFlow needed) into a bnlab checkpoint, exactly: same outputs
    on the same inputs, in the Keras layout ((N, H, W) or (N, H, W, C)), with no preprocessing added.
    Every command that takes a checkpoint also takes the Keras file directly (with the default limits;
    import it here with higher --max-... limits to use a file beyond them).

    The file is untrusted input: declared sizes are checked against the --max-... limits before anything
    is read or allocated, HDF5 links are never followed, and each refusal is one error line naming the
    limit.

    Example: bnlab import-keras model.h5 --out imported && bnlab predict imported x.npy
    """
    from bnlab.checkpoint import CheckpointError
    from bnlab.deploy.summary import summary_of
    from bnlab.keras import KerasFileError, KerasLimits, import_keras

    if convention not in ("keras", "torch"):
        _fail(f"--convention must be keras or torch (got {convention!r})")
    limits = KerasLimits(max_weight_bytes=parse_bytes(max_weight_bytes, "--max-weight-bytes"),
                         max_config_bytes=parse_bytes(max_config_bytes, "--max-config-bytes"),
                         max_json_depth=max_json_depth, max_compression_ratio=max_compression_ratio)
    check_out_folder(out, "--out", "the checkpoint")
    try:
        import_keras(file, out, convention=convention, limits=limits)
        s = summary_of(out)
    except (KerasFileError, CheckpointError, OSError, MemoryError) as e:
        _fail(describe_error(e))
    except RuntimeError as e:  # torch's allocator: a model larger than this machine's memory
        fail_if_out_of_memory(e, file)
    say(f"wrote {out}: {s.total:,} parameters ({s.trainable:,} trainable, {s.non_trainable:,} non-trainable)")
