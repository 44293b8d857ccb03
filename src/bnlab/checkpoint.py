"""Checkpoints without pickle: a folder with ``model.safetensors`` and ``config.json``.

config.json holds the resolved model spec (to rebuild the model), the data preprocessing fitted
on the training split (to scale inputs at predict time), free-form metadata, and the SHA-256 of
the weights file, so a truncated or altered checkpoint is detected instead of trusted.
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


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or of another format."""


@dataclass
class Checkpoint:
    model: torch.nn.Module
    spec: dict
    preprocessing: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


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


def load_checkpoint(directory: str | Path, *, device: str | torch.device = "cpu") -> Checkpoint:
    from bnlab.models import build_model, parse_model_spec

    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG, directory / WEIGHTS
    if not cfg_path.is_file() or not w_path.is_file():
        raise CheckpointError(f"{directory}: not a bnlab checkpoint (expected {CONFIG} and {WEIGHTS} in it)")
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
    return Checkpoint(model, config["spec"], config.get("preprocessing", {}), config.get("meta", {}))
