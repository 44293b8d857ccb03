"""Checkpoints without pickle: a folder with ``model.safetensors`` and ``config.json``.

config.json holds the resolved model spec (to rebuild the model), the data preprocessing fitted
on the training split (to scale inputs at predict time), free-form metadata, and the SHA-256 of
the weights file, so a truncated or altered checkpoint is detected instead of trusted.

A training run folder holds two checkpoints: ``checkpoint/`` is the best-validation model (as
Keras's ``save_best_only``; what predict / serve / export use by default) and
``checkpoint-final/`` the model at the end of training. Each one's meta says which it is
(``"kind"``: ``"best"`` or ``"final"``) and from which ``"epoch"``; ``load_checkpoint`` accepts a
run folder and a choice (``which="best" | "final"``) as well as a checkpoint folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bnlab.hashing import file_digest

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = "bnlab-checkpoint/1"
# the two checkpoints of a run folder: which model -> sub-folder
RUN_CHECKPOINTS = {"best": "checkpoint", "final": "checkpoint-final"}
KIND_NAMES = {"best": "best-validation model", "final": "final model"}


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or of another format."""


@dataclass
class Checkpoint:
    model: torch.nn.Module
    spec: dict
    preprocessing: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    path: Path | None = None  # the checkpoint folder it was read from

    @property
    def kind(self) -> str:
        """"best" (best-validation model), "final" (end of training) or "unknown" (older checkpoints)."""
        return self.meta.get("kind") or "unknown"

    def describe(self) -> str:
        """Which model this is, for a reader: 'best-validation model (epoch 3, ...) from runs/a/checkpoint'."""
        m = self.meta
        facts = [f"epoch {m['epoch']}"] if m.get("epoch") is not None else []
        if m.get("recalibrated"):  # the accuracies in meta were measured before: leave them out
            facts.append("BN statistics recalibrated")
        else:
            facts += [f"{k.replace('_', ' ')} {m[k]:.4f}" for k in ("val_accuracy", "test_accuracy")
                      if isinstance(m.get(k), (int, float))]
        what = KIND_NAMES.get(self.kind, "model of unknown kind (the checkpoint does not say best or final)")
        return what + (f" ({', '.join(facts)})" if facts else "") + (f" from {self.path}" if self.path else "")


def save_checkpoint(directory: str | Path, model, *, preprocessing: dict | None = None,
                    meta: dict | None = None) -> Path:
    """Write weights and config atomically (temp files, then rename) and return the folder."""
    from bnlab.models.spec import spec_to_dict

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp_w = directory / (WEIGHTS + ".tmp")
    save_file(state, str(tmp_w))
    config = {"format": FORMAT, "spec": spec_to_dict(model.spec), "preprocessing": preprocessing or {},
              "meta": meta or {}, "weights_sha256": file_digest(tmp_w)}
    tmp_c = directory / (CONFIG + ".tmp")
    tmp_c.write_text(json.dumps(config, indent=2, default=float))
    os.replace(tmp_w, directory / WEIGHTS)
    os.replace(tmp_c, directory / CONFIG)
    return directory


def update_meta(directory: str | Path, **meta) -> None:
    """Add ``meta`` entries to a checkpoint's config.json (atomically; the weights are untouched)."""
    cfg_path = Path(directory) / CONFIG
    config = json.loads(cfg_path.read_text())
    config["meta"] = {**config.get("meta", {}), **meta}
    tmp = cfg_path.with_name(CONFIG + ".tmp")
    tmp.write_text(json.dumps(config, indent=2, default=float))
    os.replace(tmp, cfg_path)


def resolve_checkpoint(path: str | Path, which: str | None = None) -> Path:
    """The checkpoint folder meant by ``path``: a checkpoint folder itself, or a run folder with
    ``checkpoint/`` (best) and ``checkpoint-final/`` (final), of which ``which`` picks one
    (default "best"). ``which`` given with a checkpoint folder must match its kind."""
    path = Path(path)
    if which is not None and which not in RUN_CHECKPOINTS:
        raise CheckpointError(f"unknown model choice {which!r}: expected one of {sorted(RUN_CHECKPOINTS)}")
    if (path / CONFIG).is_file():
        if which is not None:
            try:
                kind = json.loads((path / CONFIG).read_text()).get("meta", {}).get("kind")
            except json.JSONDecodeError:
                kind = None  # load_checkpoint reports the corrupt file
            if kind is not None and kind != which:
                sibling = path.parent / RUN_CHECKPOINTS[which]
                hint = (f"pass the run folder {path.parent} to choose, or the checkpoint folder {sibling}"
                        if (sibling / CONFIG).is_file() else
                        "this folder holds only that model; leave out --model to use it")
                raise CheckpointError(f"{path} is the {KIND_NAMES.get(kind, kind)}, not the {KIND_NAMES[which]}: "
                                      + hint)
        return path
    subs = {k: path / sub for k, sub in RUN_CHECKPOINTS.items()}
    if any((p / CONFIG).is_file() for p in subs.values()):
        chosen = subs[which or "best"]
        if not (chosen / CONFIG).is_file():
            other = [k for k, p in subs.items() if (p / CONFIG).is_file()]
            raise CheckpointError(f"{path}: this run has no {KIND_NAMES[which or 'best']} (no {chosen.name}/; it "
                                  "diverged or was interrupted before saving one); it has the "
                                  + " and ".join(KIND_NAMES[k] for k in other) + f": use --model {other[0]}")
        return chosen
    return path  # load_checkpoint says what is missing


def load_checkpoint(directory: str | Path, *, device: str | torch.device = "cpu",
                    which: str | None = None) -> Checkpoint:
    """Read a checkpoint folder, or the ``which`` ("best" by default, or "final") model of a run folder."""
    from bnlab.models import build_model, parse_model_spec

    directory = resolve_checkpoint(directory, which)
    cfg_path, w_path = directory / CONFIG, directory / WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise CheckpointError(f"{directory}: not a bnlab checkpoint (expected {CONFIG} and {WEIGHTS} in it, "
                              f"or a run folder with {' or '.join(d + '/' for d in RUN_CHECKPOINTS.values())})")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path}: corrupt JSON ({e})") from e
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_path}: unknown format {config.get('format')!r} (expected {FORMAT!r})")
    digest = file_digest(w_path)
    if digest != config.get("weights_sha256"):
        raise CheckpointError(f"{w_path}: checksum mismatch (sha256 {digest[:12]}..., config says "
                              f"{str(config.get('weights_sha256'))[:12]}...): the weights are corrupt or were changed")
    try:
        state = load_file(str(w_path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{w_path}: cannot be read as safetensors ({e})") from e
    model = build_model(parse_model_spec(config["spec"])).to(device)
    model.load_state_dict(state)
    model.eval()
    return Checkpoint(model, config["spec"], config.get("preprocessing", {}), config.get("meta", {}), directory)
