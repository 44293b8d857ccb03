"""``bnlab summary`` of anything that names a model: a preset, a spec file, a checkpoint folder (or a
run folder), or a Keras .h5 / .keras file."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from bnlab.models import Summary, build_model, load_model_spec, summarize


def _is_checkpoint(path: Path) -> bool:
    from bnlab.checkpoint import CONFIG, RUN_CHECKPOINTS
    from bnlab.keras import is_keras_file

    return is_keras_file(path) or (path / CONFIG).is_file() or any(
        (path / sub / CONFIG).is_file() for sub in RUN_CHECKPOINTS.values())


def summary_of(target: str | Path, *, trust_factory: bool = False) -> Summary:
    """The Keras-style summary of ``target``; a checkpoint is read with every integrity check. For a Keras
    file (or a checkpoint imported from one) the totals are Keras's: the sizes of the file's arrays, split
    as Keras splits them. A model built by a factory (code) needs ``trust_factory`` (``bnlab.models.factory``)."""
    path = Path(target)
    if not _is_checkpoint(path):
        spec = load_model_spec(str(target))
        return summarize(build_model(spec, trust_factory=trust_factory), tuple(spec.input_shape), name=str(target))
    from bnlab.checkpoint import load_checkpoint
    from bnlab.models import parse_model_spec

    ck = load_checkpoint(path, trust_factory=trust_factory)
    spec = parse_model_spec(ck.spec)
    s = summarize(ck.model, tuple(spec.input_shape), name=ck.meta.get("source", {}).get("model_name") or path.name)
    keras = ck.meta.get("keras_params")
    if keras:  # Keras's own split (a layer saved with trainable=false counts as non-trainable there)
        s = replace(s, total=keras["total"], trainable=keras["trainable"], non_trainable=keras["non_trainable"])
    return s
