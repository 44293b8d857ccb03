"""``bnlab import-keras``: a Keras .h5 / .keras file as a bnlab checkpoint."""

from __future__ import annotations

from pathlib import Path

import typer

from bnlab.cli.app import _fail, app, check_out_folder, say


@app.command("import-keras")
def import_keras_cmd(
    file: Path = typer.Argument(..., help="A Keras 2 .h5 (tf.keras), Keras 3 legacy .h5 or Keras 3 .keras file."),
    out: Path = typer.Option(..., help="Folder for the bnlab checkpoint."),
    convention: str = typer.Option("keras", help="BN convention of the imported layers: keras (Keras's eps and "
                                                 "momentum kept) or torch (momentum 1 - m, same eps)."),
) -> None:
    """Convert a Keras model file (no TensorFlow needed) into a bnlab checkpoint, exactly: same outputs
    on the same inputs, in the Keras layout ((N, H, W) or (N, H, W, C)), with no preprocessing added.
    Every command that takes a checkpoint also takes the Keras file directly.

    Example: bnlab import-keras model.h5 --out imported && bnlab predict imported x.npy
    """
    from bnlab.checkpoint import CheckpointError
    from bnlab.deploy.summary import summary_of
    from bnlab.keras import KerasFileError, import_keras

    if convention not in ("keras", "torch"):
        _fail(f"--convention must be keras or torch (got {convention!r})")
    check_out_folder(out, "--out", "the checkpoint")
    try:
        import_keras(file, out, convention=convention)
        s = summary_of(out)
    except (KerasFileError, CheckpointError, OSError) as e:
        _fail(str(e))
    say(f"wrote {out}: {s.total:,} parameters ({s.trainable:,} trainable, {s.non_trainable:,} non-trainable)")
