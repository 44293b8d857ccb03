"""Keras model files without TensorFlow: read ``.h5`` (Keras 2 and Keras 3 legacy) and ``.keras``
(Keras 3) with h5py, convert them exactly to bnlab models (``convert``), and hand them to every tool
that takes a checkpoint (``load_keras``; ``bnlab.checkpoint.load_checkpoint`` accepts these files)."""

from __future__ import annotations

from pathlib import Path

from bnlab.keras.convert import keras_counts, keras_to_spec
from bnlab.keras.files import DEFAULT_LIMITS, KerasFileError, KerasLimits, KerasModel, read_keras_file

KERAS_SUFFIXES = (".h5", ".hdf5", ".keras")


def is_keras_file(path: str | Path) -> bool:
    path = Path(path)
    return path.suffix.lower() in KERAS_SUFFIXES and path.is_file()


def load_keras(path: str | Path, *, convention: str = "keras", limits: KerasLimits | None = None):
    """A Keras file as a bnlab ``Checkpoint`` (model in eval mode, no preprocessing: inputs go in as the
    Keras model took them); meta records the source and Keras's parameter counts. The file is read within
    ``limits`` (``KerasLimits()``: 1 GiB of arrays, 16 MiB of config, JSON 100 deep, 100x compression);
    every refusal is a KerasFileError naming the file, what it declares and the limit."""
    from bnlab.checkpoint import Checkpoint, tensor_problems
    from bnlab.models import build_model

    km = read_keras_file(path, limits=limits)
    try:
        spec, state = keras_to_spec(km, convention=convention)
        problems = tensor_problems(state)  # the checks a bnlab checkpoint gets: finite, variances >= 0
        if problems:
            raise KerasFileError("; ".join(problems))
        model = build_model(spec)
        model.load_state_dict(state)
    except KerasFileError as e:
        raise KerasFileError(f"{path}: {e}") from None
    except (MemoryError, RecursionError, RuntimeError) as e:  # a legitimate model larger than this machine
        if isinstance(e, RuntimeError) and "allocate" not in str(e):  # torch's allocator says "can't allocate"
            raise
        raise KerasFileError(f"{path}: the model does not fit in memory ({type(e).__name__}: {e})") from None
    total, trainable, frozen = keras_counts(km)
    meta = {"kind": "final", "source": {"file": str(path), "format": km.format, "keras_version": km.keras_version,
                                        "model_name": km.name},
            "keras_params": {"total": total, "trainable": trainable, "non_trainable": frozen}}
    return Checkpoint(model.eval(), spec, {}, meta, Path(path))


__all__ = ["DEFAULT_LIMITS", "KERAS_SUFFIXES", "KerasFileError", "KerasLimits", "KerasModel", "is_keras_file",
           "keras_counts", "keras_to_spec", "import_keras", "load_keras", "read_keras_file"]


def import_keras(path: str | Path, out: str | Path, *, convention: str = "keras",
                 limits: KerasLimits | None = None) -> Path:
    """Convert a Keras file into a bnlab checkpoint folder ``out`` (``bnlab import-keras``), reading it
    within ``limits`` (see ``load_keras``)."""
    from bnlab.checkpoint import save_checkpoint

    ck = load_keras(path, convention=convention, limits=limits)
    return save_checkpoint(out, ck.model, preprocessing={}, meta=ck.meta)
