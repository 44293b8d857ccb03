"""Checkpoints without pickle: a folder with ``model.safetensors`` and ``config.json``.

config.json holds the resolved model spec (to rebuild the model), the data preprocessing fitted
on the training split (to scale inputs at predict time), metadata (which model, its epoch, the
class names, the training settings), and two SHA-256 digests:

* ``weights_sha256``: of the weights file;
* ``config_sha256``: of everything else in config.json (format, spec, preprocessing, meta and
  ``weights_sha256``), taken over its canonical JSON (``bnlab.hashing.canonical_json``).

So a truncated or altered weights file, and a config changed after bnlab wrote it (a ``divide``
or a class name edited by hand, which would silently change predictions), are refused with the
reason instead of trusted. The digests detect corruption and edits, they are not a signature:
whoever can write the folder can recompute them, which is why the content is validated too.

Rules ``load_checkpoint`` applies, each failure a ``CheckpointError`` saying what is wrong:
config.json is a regular UTF-8 file of at most ``MAX_CONFIG_BYTES``, strict JSON (no NaN), an
object with exactly the keys of this format; both digests match; spec, preprocessing and meta
have the types below and agree with each other (class names: one per class; per-channel
statistics: one per input channel); the weights file holds exactly the tensors of the model the
spec builds, with their shapes and dtypes, every value finite, every running variance >= 0.
``save_checkpoint`` refuses to write what ``load_checkpoint`` would refuse.

Format versions: this bnlab writes and reads ``bnlab-checkpoint/2``. Checkpoints of format 1
(whose digest covered only the weights) are refused with a message naming the version: their
config cannot be verified, and reading them unverified is the gap format 2 closes.

A training run folder holds two checkpoints: ``checkpoint/`` is the best-validation model (as
Keras's ``save_best_only``; what predict / serve / export use by default) and
``checkpoint-final/`` the model at the end of training. Each one's meta says which it is
(``"kind"``: ``"best"`` or ``"final"``) and from which ``"epoch"``; ``load_checkpoint`` accepts a
run folder and a choice (``which="best" | "final"``) as well as a checkpoint folder.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterable
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, ValidationError, model_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.overrides import TorchFunctionMode

from bnlab.hashing import canonical_json, file_digest, json_digest
from bnlab.models.factory import is_trusted, trusting, untrusted_message

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT = "bnlab-checkpoint/2"
# earlier formats this bnlab recognises (and refuses), with why
OLD_FORMATS = {"bnlab-checkpoint/1": "its digest covers only the weights, so its spec, preprocessing and class "
                                     "names cannot be verified"}
CONFIG_KEYS = ("format", "spec", "preprocessing", "meta", "weights_sha256", "config_sha256")
MAX_CONFIG_BYTES = 1 << 20  # a real config.json is a few KB; more is not a bnlab checkpoint
# the two checkpoints of a run folder: which model -> sub-folder
RUN_CHECKPOINTS = {"best": "checkpoint", "final": "checkpoint-final"}
KIND_NAMES = {"best": "best-validation model", "final": "final model"}


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt, changed after it was written, or of another format."""


# ---------------------------------------------------------------- the typed parts of config.json

class _Strict(BaseModel):
    # known keys typed strictly (no "3" for 3); other keys allowed: meta is open to new facts
    model_config = ConfigDict(extra="allow", strict=True, frozen=True)


class Preprocessing(_Strict):
    """What predict applies to raw inputs: ``bnlab.data.dataset.fit_scaling``'s output (x / divide,
    then minus mean, then / std). An empty dict means inputs are used as they come. Every key is one
    predict acts on, so an unknown key is refused (it would be silently ignored)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    scaling: Literal["none", "unit", "center", "standardize"]
    divide: FiniteFloat = Field(gt=0)
    mean: FiniteFloat | list[FiniteFloat] | None = None
    std: list[Annotated[FiniteFloat, Field(gt=0)]] | None = None
    # the training split the scaling was fitted on (``bnlab.data.dataset.prepare``): a record, not acted on
    validation: Annotated[int, Field(ge=0)] | Annotated[FiniteFloat, Field(ge=0, lt=1)] | None = None
    seed: int | None = None


class TrainMeta(_Strict):
    """The training settings the deploy tools reuse (recalibrate reloads the same data split)."""

    dataset: str | None = None
    data_dir: str | None = None
    validation: int | FiniteFloat | None = None
    scaling: str | None = None
    dataset_options: dict = {}
    batch_size: Annotated[int, Field(ge=1)] | None = None
    data_seed: int | None = None


class Meta(_Strict):
    kind: Literal["best", "final"] | None = None
    epoch: Annotated[int, Field(ge=0)] | None = None
    steps: Annotated[int, Field(ge=0)] | None = None
    dataset: str | None = None
    classes: list[str] | None = None
    train: TrainMeta | None = None
    recalibrated: dict | None = None

    @model_validator(mode="after")
    def _measures_are_numbers(self):
        """Every ``*_accuracy`` / ``*_loss`` is a finite number or null (describe() prints them)."""
        for key, value in (self.model_extra or {}).items():
            if key.endswith(("_accuracy", "_loss")) and value is not None and (
                    isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
                raise ValueError(f"{key} must be a finite number or null (got {_short(value)})")
        return self


@dataclass
class Checkpoint:
    model: torch.nn.Module
    spec: dict
    preprocessing: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    path: Path | None = None  # the checkpoint folder it was read from

    @property
    def kind(self) -> str:
        """"best" (best-validation model), "final" (end of training) or "unknown" (the meta does not say)."""
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


# ---------------------------------------------------------------- writing

def save_checkpoint(directory: str | Path, model, *, preprocessing: dict | None = None,
                    meta: dict | None = None) -> Path:
    """Write weights and config atomically (temp files, then rename) and return the folder.

    Non-finite numbers in meta are written as null (JSON has no NaN); weights or a config that
    ``load_checkpoint`` would refuse are refused here, before anything is written."""
    from bnlab.models.spec import spec_to_dict

    directory = Path(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    problems = tensor_problems(state)
    if problems:
        raise CheckpointError(f"refusing to save {directory}: " + "; ".join(problems))
    where = f"refusing to save {directory}"
    config = _as_json({"format": FORMAT, "spec": spec_to_dict(model.spec), "preprocessing": preprocessing or {},
                       "meta": meta or {}}, where)
    _check_content(config, where)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file of that name, no permission
        raise CheckpointError(f"{directory}: cannot write a checkpoint folder there ({e.strerror or e})") from None
    tmp_w = directory / (WEIGHTS + ".tmp")
    save_file(state, str(tmp_w))
    config["weights_sha256"] = file_digest(tmp_w)
    os.replace(tmp_w, directory / WEIGHTS)
    _write_config(directory, config)
    return directory


def update_meta(directory: str | Path, **meta) -> None:
    """Add ``meta`` entries to a checkpoint's config.json (atomically; the weights are untouched).
    The config is verified first, so an altered config is never re-digested into a valid one."""
    directory = Path(directory)
    config = read_config(directory)
    where = f"refusing to update {directory / CONFIG}"
    body = {k: v for k, v in config.items() if k != "config_sha256"}
    body["meta"] = _as_json({**config["meta"], **meta}, where)
    _check_content(body, where)
    _write_config(directory, body)


def config_digest(config: dict) -> str:
    """The SHA-256 that ``config_sha256`` records: of the canonical JSON of everything else in config.json."""
    return json_digest({k: v for k, v in config.items() if k != "config_sha256"})


def _write_config(directory: Path, body: dict) -> None:
    config = {**body, "config_sha256": config_digest(body)}
    tmp = directory / (CONFIG + ".tmp")
    tmp.write_text(json.dumps(config, indent=2, allow_nan=False, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, directory / CONFIG)


def _as_json(value, where: str):
    """``value`` as plain JSON data: NumPy numbers and tuples converted, NaN and infinities as null."""
    text = json.dumps(value, default=lambda o: o.tolist() if hasattr(o, "tolist") else float(o))
    return _json_text(json.loads(text, parse_constant=lambda _: None), where)


def _json_text(value, where: str):
    """``value`` if it has a canonical JSON form (its digest can be taken): no lone surrogate
    (a "\\ud800" escape decodes to one, which no UTF-8 text can hold)."""
    try:
        canonical_json(value)
    except ValueError as e:  # UnicodeEncodeError
        raise CheckpointError(f"{where}: not valid JSON text ({e})") from None
    return value


# ---------------------------------------------------------------- reading

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
                kind = _parse_json(path / CONFIG).get("meta", {}).get("kind")
            except (CheckpointError, AttributeError):
                kind = None  # load_checkpoint reports what is wrong with the file
            if isinstance(kind, str) and kind in KIND_NAMES and kind != which:
                sibling = path.parent / RUN_CHECKPOINTS[which]
                hint = (f"pass the run folder {path.parent} to choose, or the checkpoint folder {sibling}"
                        if (sibling / CONFIG).is_file() else
                        "this folder holds only that model; leave out --model to use it")
                raise CheckpointError(f"{path} is the {KIND_NAMES[kind]}, not the {KIND_NAMES[which]}: " + hint)
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


def read_config(directory: str | Path) -> dict:
    """A checkpoint folder's config.json, verified (format, keys, digest, types); CheckpointError if not."""
    directory = Path(directory)
    cfg_path = directory / CONFIG
    config = _parse_json(cfg_path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object with the keys {', '.join(CONFIG_KEYS)} "
                              f"(got a JSON {_json_type(config)})")
    fmt = config.get("format")
    if fmt != FORMAT:
        if "format" not in config:
            raise CheckpointError(f"{cfg_path}: not a bnlab checkpoint config (it has no 'format' key; its keys: "
                                  f"{_short(sorted(config))}): a config.json of another tool?")
        if isinstance(fmt, str) and fmt in OLD_FORMATS:
            raise CheckpointError(f"{cfg_path}: written by an earlier bnlab in format {fmt!r}: {OLD_FORMATS[fmt]}; "
                                  f"this bnlab reads only {FORMAT!r}: train the model again (or use the bnlab "
                                  "that wrote it)")
        if isinstance(fmt, str) and fmt.startswith("bnlab-checkpoint/"):
            raise CheckpointError(f"{cfg_path}: written by a newer bnlab (format {fmt!r}); this bnlab reads "
                                  f"{FORMAT!r}: upgrade bnlab")
        raise CheckpointError(f"{cfg_path}: not a bnlab checkpoint (format {_short(fmt)}, expected {FORMAT!r})")
    missing = [k for k in CONFIG_KEYS if k not in config]
    unknown = sorted(set(config) - set(CONFIG_KEYS))
    if missing or unknown:
        raise CheckpointError(f"{cfg_path}: " + "; ".join(
            ([f"missing key(s) {', '.join(missing)}"] if missing else [])
            + ([f"unknown key(s) {_short(unknown)}"] if unknown else []))
            + f" (a {FORMAT} config has exactly {', '.join(CONFIG_KEYS)})")
    for key in ("weights_sha256", "config_sha256"):
        if not isinstance(config[key], str) or not re.fullmatch(r"[0-9a-f]{64}", config[key]):
            raise CheckpointError(f"{cfg_path}: {key} must be a SHA-256 of 64 lowercase hex digits "
                                  f"(got {_short(config[key])})")
    digest = config_digest(config)
    if digest != config["config_sha256"]:
        raise CheckpointError(f"{cfg_path}: changed after bnlab wrote it: the SHA-256 of its content (spec, "
                              f"preprocessing, meta, weights digest) is {digest[:12]}..., config_sha256 says "
                              f"{config['config_sha256'][:12]}...; an edited spec, preprocessing (e.g. divide) or "
                              "class name would silently change predictions, so it is not trusted")
    _check_content(config, str(cfg_path))
    return config


def load_checkpoint(directory: str | Path, *, device: str | torch.device = "cpu",
                    which: str | None = None, trust_factory: bool | Iterable[str] = False) -> Checkpoint:
    """Read a checkpoint folder, or the ``which`` ("best" by default, or "final") model of a run
    folder, after every check in the module docstring; CheckpointError says which one failed.

    A checkpoint whose spec names a factory (code) is refused before anything is imported unless the
    factory is registered in this process or ``trust_factory`` says to trust it (``bnlab.models.factory``)."""
    from bnlab.keras import is_keras_file  # a Keras .h5 / .keras file is taken wherever a checkpoint is
    if is_keras_file(directory):
        return _load_keras_file(Path(directory), device, which)
    with trusting(trust_factory):
        return _load_folder(resolve_checkpoint(directory, which), device)


def _load_folder(directory: Path, device) -> Checkpoint:
    from bnlab.models import build_model, parse_model_spec

    if not directory.is_dir():
        raise CheckpointError(f"{directory}: " + ("no such folder" if not directory.exists() else
                                                  "a file, expected a checkpoint folder")
                              + f" (expected a folder with {CONFIG} and {WEIGHTS}, or a run folder with "
                              f"{' or '.join(d + '/' for d in RUN_CHECKPOINTS.values())})")
    if not os.path.lexists(directory / CONFIG) and not os.path.lexists(directory / WEIGHTS):
        raise CheckpointError(f"{directory}: not a bnlab checkpoint (expected {CONFIG} and {WEIGHTS} in it, "
                              f"or a run folder with {' or '.join(d + '/' for d in RUN_CHECKPOINTS.values())})")
    config = read_config(directory)
    spec = parse_model_spec(config["spec"])  # validated by read_config
    if spec.kind == "factory" and not is_trusted(spec.factory):  # before any file is trusted further
        raise CheckpointError(f"{directory / CONFIG}: {untrusted_message(spec.factory)}")
    w_path = directory / WEIGHTS
    _regular_file(w_path, "the weights file")
    try:
        digest = file_digest(w_path)
    except OSError as e:
        raise CheckpointError(f"{w_path}: cannot be read ({e.strerror or e})") from e
    if digest != config["weights_sha256"]:
        raise CheckpointError(f"{w_path}: checksum mismatch (sha256 {digest[:12]}..., config says "
                              f"{config['weights_sha256'][:12]}...): the weights are corrupt or were changed")
    try:
        state = load_file(str(w_path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{w_path}: cannot be read as safetensors ({e})") from e
    problems = _state_mismatch(state, _expected_tensors(spec, str(directory / CONFIG))) or tensor_problems(state)
    if problems:
        raise CheckpointError(f"{w_path}: " + "; ".join(problems))
    model = build_model(spec)
    model.load_state_dict(state)  # names, shapes and dtypes checked above: cannot fail
    model.to(device).eval()
    return Checkpoint(model, config["spec"], config["preprocessing"], config["meta"], directory)


def _load_keras_file(path: Path, device, which: str | None) -> Checkpoint:
    from bnlab.keras import KerasFileError, load_keras

    if which not in (None, "final"):
        raise CheckpointError(f"{path}: a Keras file holds one model; --model {which} does not apply")
    try:
        ck = load_keras(path)
    except (KerasFileError, OSError) as e:
        raise CheckpointError(str(e)) from e
    ck.model.to(device)
    return ck


# ---------------------------------------------------------------- the checks

def _regular_file(path: Path, what: str) -> os.stat_result:
    """stat() of a regular file, or a CheckpointError saying what ``path`` is instead."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing ({what} of a checkpoint; a checkpoint folder holds {CONFIG} and "
                              f"{WEIGHTS})") from None
    except OSError as e:  # a symlink loop, a permission, a name too long
        raise CheckpointError(f"{path}: cannot be opened ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"{path}: a folder, expected {what} (a file)")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path}: not a regular file (a FIFO, socket or device), expected {what}")
    return st


def _parse_json(path: Path):
    """The JSON value in ``path``: a regular UTF-8 file of at most MAX_CONFIG_BYTES, strict JSON."""
    st = _regular_file(path, "the checkpoint's config")
    if st.st_size > MAX_CONFIG_BYTES:
        raise CheckpointError(f"{path}: {st.st_size} bytes, more than a checkpoint config can be "
                              f"({MAX_CONFIG_BYTES} bytes)")
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {raw[e.start:e.start + 1]!r} at offset {e.start}); "
                              "a checkpoint config is UTF-8 JSON") from None

    def no_constant(name):
        raise ValueError(f"{name} is not a JSON value")

    def finite(number: str) -> float:
        value = float(number)
        if not math.isfinite(value):  # 1e400 parses as infinity
            raise ValueError(f"{number} is beyond the range of a float")
        return value

    try:
        value = json.loads(text, parse_constant=no_constant, parse_float=finite)
    except RecursionError:
        raise CheckpointError(f"{path}: not a checkpoint config (JSON nested too deeply)") from None
    except ValueError as e:  # JSONDecodeError, NaN, an integer of more than 4300 digits
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    return _json_text(value, str(path))


def _check_content(config: dict, where: str) -> None:
    """The typed rules on spec, preprocessing and meta, and how they agree with each other."""
    from bnlab.models import parse_model_spec

    for key in ("spec", "preprocessing", "meta"):
        if not isinstance(config[key], dict):
            raise CheckpointError(f"{where}: {key} must be a JSON object (got a JSON {_json_type(config[key])})")
    try:
        spec = parse_model_spec(config["spec"])
    except (ValidationError, ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: invalid model spec: {_reasons(e, 'spec')}") from None
    pre = _typed(Preprocessing, config["preprocessing"], "preprocessing", where) if config["preprocessing"] else None
    meta = _typed(Meta, config["meta"], "meta", where)
    channels = spec.input_shape[0] if spec.input_shape else None
    if pre is not None:
        if pre.scaling == "center" and not isinstance(pre.mean, (int, float)):
            raise CheckpointError(f"{where}: preprocessing 'center' needs one number 'mean' (got {_short(pre.mean)})")
        if pre.scaling == "standardize":
            for name, values in (("mean", pre.mean), ("std", pre.std)):
                if not isinstance(values, list) or len(values) != channels:
                    raise CheckpointError(f"{where}: preprocessing 'standardize' needs {name} as a list of "
                                          f"{channels} numbers, one per input channel of the model (got "
                                          f"{_short(values)})")
    if meta.classes is not None and len(meta.classes) != spec.num_classes:
        raise CheckpointError(f"{where}: meta.classes names {len(meta.classes)} classes but the model has "
                              f"{spec.num_classes} outputs")


def _typed(model: type[BaseModel], value: dict, part: str, where: str):
    try:
        return model.model_validate(value)
    except ValidationError as e:
        raise CheckpointError(f"{where}: invalid {part}: {_reasons(e, part)}") from None


class _ParametersOnMeta(TorchFunctionMode):
    """Like ``with torch.device("meta")`` for the tensors a model allocates (its parameters and
    buffers get shapes but no memory), while ``torch.tensor``, which model building uses for
    shape arithmetic, stays real."""

    FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in self.FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        return func(*args, **kwargs)


def _expected_tensors(spec, where: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name -> (shape, dtype) of the state of the model ``spec`` builds, found without allocating
    it (a spec of 10^12 units is refused, not attempted)."""
    from bnlab.models import build_model

    try:
        with _ParametersOnMeta():
            model = build_model(spec)
    except (ValueError, TypeError, OverflowError, RuntimeError, MemoryError) as e:
        raise CheckpointError(f"{where}: the model spec cannot be built ({e})") from None
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def _state_mismatch(state: dict, expected: dict) -> list[str]:
    """How the tensors of a weights file differ from the model's (names, shapes, dtypes)."""
    problems = []
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    if missing:
        problems.append(f"missing tensor(s) {_short(missing)} of the model the spec builds")
    if extra:
        problems.append(f"tensor(s) {_short(extra)} that the model the spec builds does not have")
    for k, (shape, dtype) in expected.items():
        if k in state and tuple(state[k].shape) != shape:
            problems.append(f"tensor {k} has shape {tuple(state[k].shape)}, the model's is {shape}")
        elif k in state and state[k].dtype != dtype:
            problems.append(f"tensor {k} is {state[k].dtype}, the model's is {dtype}")
    return problems[:4] + ([f"and {len(problems) - 4} more"] if len(problems) > 4 else [])


def tensor_problems(state: dict) -> list[str]:
    """Non-finite values (weights or running statistics) and negative running variances."""
    problems = []
    for k, t in state.items():
        if t.is_floating_point():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                problems.append(f"tensor {k} has {bad} non-finite value(s) (NaN or infinity) of {t.numel()}")
            elif k.endswith("running_var") and bool((t < 0).any()):
                problems.append(f"tensor {k} has {int((t < 0).sum())} negative variance(s) (min {float(t.min()):.4g})")
    return problems[:4] + ([f"and {len(problems) - 4} more"] if len(problems) > 4 else [])


def _reasons(e: Exception, part: str) -> str:
    if not isinstance(e, ValidationError):
        return str(e)
    out = []
    for err in e.errors()[:3]:
        loc = ".".join([part, *(str(x) for x in err["loc"])])
        got = "" if err["type"] == "missing" else f" (got {_short(err.get('input'))})"
        out.append(f"{loc}: {err['msg']}{got}")
    return "; ".join(out) + (f"; and {e.error_count() - 3} more" if e.error_count() > 3 else "")


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")
