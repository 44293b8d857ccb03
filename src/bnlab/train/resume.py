"""The resumable state of a training run, written at the end of every epoch.

A run folder's ``resume/`` holds everything ``fit`` needs to go on as if it had never stopped:
the model's ``state_dict`` (weights, BN running statistics, ``num_batches_tracked``), the
optimizer's state, the state of every random generator the training draws from (the data order,
the noise stream of dropout masks and augmentation, torch's global RNG that ``nn.Dropout`` in the
autograd path uses, and the CUDA one on a GPU; nothing draws from numpy's or Python's global
generators), the History so far and the probes' records, the best-model tracking (best score, its
epoch, epochs since), the steps done, the training seconds so far (so time budgets go on) and the
settings the run was started with.

Layout and atomicity: ``tensors-<digest>.safetensors`` (the tensors) and ``state.json`` (the rest,
with the SHA-256 of the tensor file and of its own body). Each is written to a temporary file and
renamed into place, the tensor file first and ``state.json`` last, and older tensor files are
removed only after that: whenever a process is killed, ``state.json`` names a complete tensor file,
so the folder holds either the previous complete state or the new one. A state whose digests do
not match (truncated, edited) or whose settings differ from the run's is never resumed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from bnlab.train.history import History

STATE_DIR = "resume"  # the sub-folder of a run folder holding its resumable state
STATE_JSON = "state.json"
_OWN_FILE = re.compile(r"tensors-[0-9a-f]{16}\.safetensors(\.\d+\.tmp)?")
FORMAT = "bnlab-train-state/1"
RUN_JSON = "run.json"  # the run folder's resolved settings ({"model": ..., "train": ...}), see bnlab.train.single


class RunInterrupted(KeyboardInterrupt):
    """Training was interrupted (Ctrl-C, or a KeyboardInterrupt raised by a signal handler).

    ``epoch``: the last epoch whose state is saved (0: none); rerunning the same run on the same
    folder continues after it. An interrupted run never has a result."""

    def __init__(self, epoch: int, message: str = ""):
        super().__init__(message or (f"interrupted; the state after epoch {epoch} is saved" if epoch
                                     else "interrupted before the first epoch ended; nothing is saved"))
        self.epoch = epoch

    def __reduce__(self):  # rebuilt from its own arguments when it crosses a process boundary
        return type(self), (self.epoch, str(self))


class SettingsChanged(ValueError):
    """A run folder holds a run of other settings; ``differences``: each differing setting, as
    'train.lr 0.1 -> 0.01' (saved -> now)."""

    def __init__(self, folder: Path, differences: list[str]):
        self.folder, self.differences = Path(folder), differences
        super().__init__(f"{folder} holds a run of other settings ({'; '.join(differences)})")

    def __reduce__(self):
        return type(self), (self.folder, self.differences)


@dataclass
class TrainState:
    """Where ``fit`` stands after a completed epoch."""

    epoch: int  # the last completed epoch
    steps: int  # optimizer steps done
    elapsed: float  # training seconds so far (time budgets go on from here)
    finished: bool  # training is over (all epochs, early stopping or a budget): only evaluation is left
    history: History
    best_value: float  # the best monitored score so far (-inf: none)
    best_epoch: int | None
    since_best: int  # epochs without improvement (patience)
    engine: str
    model: dict[str, torch.Tensor]  # state_dict
    optimizer: dict | None = None  # the optimizer's state_dict()["state"] (None: the step applies SGD itself)
    rng: dict[str, torch.Tensor] = field(default_factory=dict)  # generator name -> get_state()
    probes: dict | None = None  # Probes.state()


def canonical(settings: dict) -> dict:
    """``settings`` as JSON gives it back (tuples become lists), so equal settings compare equal."""
    return json.loads(json.dumps(settings, sort_keys=True))


def _text(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def fingerprint(settings: dict) -> str:
    """SHA-256 of the canonical JSON of the settings a state belongs to."""
    return hashlib.sha256(_text(canonical(settings)).encode()).hexdigest()


def _flat(d, prefix: str = "") -> dict[str, object]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out if out or not prefix else {prefix: {}}
    return {prefix: d}


def setting_differences(saved: dict, now: dict) -> list[str]:
    """Each setting that differs, as 'train.lr 0.1 -> 0.01' (saved -> now); 'unset' where absent."""
    a, b = _flat(canonical(saved)), _flat(canonical(now))
    show = lambda d, k: json.dumps(d[k]) if k in d else "unset"  # noqa: E731
    # an empty table on one side and settings inside it on the other is said once, by those settings
    nested = {k for k in a.keys() | b.keys() if {} in (a.get(k), b.get(k))
              and any(j.startswith(k + ".") for j in a.keys() | b.keys())}
    return [f"{k} {show(a, k)} -> {show(b, k)}" for k in sorted((a.keys() | b.keys()) - nested)
            if a.get(k, ...) != b.get(k, ...)]


# ---------------------------------------------------------------- tensors inside nested structures


def _split(obj, prefix: str, tensors: dict[str, torch.Tensor]):
    """obj with every tensor replaced by {"tensor": key} (the tensor goes into ``tensors``); dicts as
    lists of [key, value] pairs, so the optimizer state's integer keys stay integers."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {"tensor": prefix}
    if isinstance(obj, dict):
        return {"pairs": [[k, _split(v, f"{prefix}/{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"list": [_split(v, f"{prefix}/{i}", tensors) for i, v in enumerate(obj)]}
    return {"value": obj}


def _join(obj, tensors: dict[str, torch.Tensor]):
    if "tensor" in obj:
        return tensors[obj["tensor"]]
    if "pairs" in obj:
        return {k: _join(v, tensors) for k, v in obj["pairs"]}
    if "list" in obj:
        return [_join(v, tensors) for v in obj["list"]]
    return obj["value"]


# ---------------------------------------------------------------- writing


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (fsynced, so the rename never
    lands before the data)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_state(state_dir: str | Path, state: TrainState, settings: dict) -> None:
    """Write ``state`` (of a run with ``settings``) to ``state_dir`` atomically, replacing the one there."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in state.model.items()}
    tensors.update({f"rng/{k}": v for k, v in state.rng.items()})
    history = state.history.to_dict()
    # the step losses as float64 (exact for Python floats): ~10x cheaper than as JSON text
    tensors["history/step_loss"] = torch.tensor(history.pop("step_loss"), dtype=torch.float64)
    optimizer = None if state.optimizer is None else _split(state.optimizer, "optimizer", tensors)
    blob = save_tensors(tensors)
    digest = hashlib.sha256(blob).hexdigest()
    name = f"tensors-{digest[:16]}.safetensors"  # by content: rewriting equal bytes is harmless
    write_atomic(state_dir / name, blob)
    body = {
        "epoch": state.epoch, "steps": state.steps, "elapsed": state.elapsed, "finished": state.finished,
        "history": history, "best_value": state.best_value, "best_epoch": state.best_epoch,
        "since_best": state.since_best, "engine": state.engine, "optimizer": optimizer,
        "model_keys": list(state.model), "rng_keys": list(state.rng), "probes": state.probes,
        "tensors": name, "tensors_sha256": digest,
        "settings": canonical(settings), "fingerprint": fingerprint(settings),
    }
    text = _text(body)  # the body's text is written as it was digested: one serialisation
    doc = f'{{"format":{json.dumps(FORMAT)},"sha256":"{hashlib.sha256(text.encode()).hexdigest()}","body":{text}}}'
    write_atomic(state_dir / STATE_JSON, doc.encode())
    _fsync_dir(state_dir)
    for old in state_dir.iterdir():  # only now: state.json names the new tensor file
        if old.name != name and (_OWN_FILE.fullmatch(old.name) or old.name.startswith(f"{STATE_JSON}.")):
            old.unlink(missing_ok=True)  # earlier tensor files, temporary files left by a kill


# ---------------------------------------------------------------- reading


def _read_body(state_dir: Path, settings: dict | None) -> tuple[dict | None, str | None]:
    """The body of ``state_dir/state.json``, checked against its digest and fingerprint and, when
    ``settings`` are given, against them; or (None, why not)."""
    path = state_dir / STATE_JSON
    if not path.is_file():
        return None, None
    try:
        doc = json.loads(path.read_text())
        body = doc["body"]
        if doc.get("format") != FORMAT:
            return None, f"{path}: unknown format {doc.get('format')!r} (expected {FORMAT!r})"
        if hashlib.sha256(_text(body).encode()).hexdigest() != doc.get("sha256"):
            return None, f"{path}: checksum mismatch (the file is corrupt or was edited)"
        if fingerprint(body["settings"]) != body["fingerprint"]:
            return None, f"{path}: its settings do not match their fingerprint"
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        return None, f"{path}: unreadable ({type(e).__name__}: {e})"
    if settings is not None and body["fingerprint"] != fingerprint(settings):
        diffs = setting_differences(body["settings"], settings)
        return None, f"{state_dir} holds the state of a run of other settings ({'; '.join(diffs)})"
    return body, None


def _tensor_blob(state_dir: Path, body: dict) -> tuple[bytes | None, str | None]:
    path = state_dir / str(body.get("tensors"))
    try:
        blob = path.read_bytes()
    except OSError as e:
        return None, f"{path}: unreadable ({e})"
    if hashlib.sha256(blob).hexdigest() != body.get("tensors_sha256"):
        return None, f"{path}: checksum mismatch (truncated or changed)"
    return blob, None


def read_state(state_dir: str | Path, settings: dict | None = None) -> tuple[TrainState | None, str | None]:
    """The verified state in ``state_dir`` and None, or None and why there is none to resume (None
    when the folder simply holds no state). ``settings``: the run's settings; a state of other
    settings is not returned. Nothing that fails a digest is ever returned."""
    state_dir = Path(state_dir)
    body, why = _read_body(state_dir, settings)
    if body is None:
        return None, why
    blob, why = _tensor_blob(state_dir, body)
    if blob is None:
        return None, why
    try:
        tensors = load_tensors(blob)
        history = History.from_dict({**body["history"], "step_loss": tensors["history/step_loss"].tolist()})
        state = TrainState(
            epoch=int(body["epoch"]), steps=int(body["steps"]), elapsed=float(body["elapsed"]),
            finished=bool(body["finished"]), history=history,
            best_value=float(body["best_value"]), best_epoch=body["best_epoch"], since_best=int(body["since_best"]),
            engine=str(body["engine"]), model={k: tensors[f"model/{k}"] for k in body["model_keys"]},
            optimizer=None if body["optimizer"] is None else _join(body["optimizer"], tensors),
            rng={k: tensors[f"rng/{k}"] for k in body["rng_keys"]}, probes=body["probes"])
    except (SafetensorError, KeyError, TypeError, ValueError, AttributeError) as e:
        return None, f"{state_dir}: the state cannot be read ({type(e).__name__}: {e})"
    if state.epoch < 1 or len(state.history.epochs) != state.epoch or math.isnan(state.best_value):
        return None, f"{state_dir}: the state is inconsistent (epoch {state.epoch}, {len(state.history.epochs)} recorded)"
    return state, None


def _run_settings(run_dir: Path) -> dict | None:
    try:
        saved = json.loads((run_dir / RUN_JSON).read_text())
        return {"model": saved["model"], "train": saved["train"]}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None


def saved_progress(run_dir: str | Path) -> tuple[int, bool] | None:
    """(the last completed epoch, whether training is over and only the evaluation is left) of the valid
    saved state in ``run_dir/resume`` of the settings in ``run_dir/run.json``; None when there is none
    (no state, unreadable, failing its digests, or of other settings)."""
    run_dir = Path(run_dir)
    settings = _run_settings(run_dir)
    if settings is None:
        return None
    body, _ = _read_body(run_dir / STATE_DIR, settings)
    if body is None or _tensor_blob(run_dir / STATE_DIR, body)[0] is None:
        return None
    return int(body["epoch"]), bool(body["finished"])


def resume_point(run_dir: str | Path) -> int | None:
    """The last completed epoch of the valid saved state in ``run_dir`` (``saved_progress``); None: none."""
    progress = saved_progress(run_dir)
    return None if progress is None else progress[0]


def discard_state(run_dir: str | Path) -> None:
    """Remove ``run_dir/resume`` (after the run's result is recorded, or to start over)."""
    shutil.rmtree(Path(run_dir) / STATE_DIR, ignore_errors=True)


# ---------------------------------------------------------------- random generators


def rng_states(generators: dict[str, torch.Generator], device: torch.device) -> dict[str, torch.Tensor]:
    """The state of each named generator, torch's global CPU RNG ("torch") and, on a GPU, the
    device's CUDA RNG ("cuda")."""
    states = {name: g.get_state() for name, g in generators.items()}
    states["torch"] = torch.get_rng_state()
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict[str, torch.Tensor], generators: dict[str, torch.Generator],
                   device: torch.device) -> None:
    """Put back what ``rng_states`` took (the generator objects stay the same: the steps hold them)."""
    for name, g in generators.items():
        g.set_state(states[name])
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)
