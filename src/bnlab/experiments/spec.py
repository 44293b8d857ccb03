"""Experiment specs: a TOML file (or a shipped preset) -> a validated ExperimentSpec.

    name = "demo"
    seeds = 5                       # a count (0..n-1) or a list
    target_accuracy = 0.9           # for epochs / steps / seconds to target
    primary_metric = "final_val_accuracy"   # the one metric verdicts are drawn on (Holm over its pairs)
    [data]    dataset = "mnist-5k"  # + validation, scaling, data_dir, options
              fallback = { dataset = "mnist-5k", validation = 0.125 }  # when dataset's files are not here
    [model]   preset = "paper-mnist-mlp"   # and/or inline model-spec keys
    [train]   optimizer = "sgd" ...        # TrainConfig keys (not dataset/seed)
    [variants.no-bn]     model = { bn = "none" }
    [variants.bn-before] model = { bn = "before" }
    [quick]   seeds = 2, train = { epochs = 3 }   # the --quick scale

Validation errors name the key, the bad value and what is allowed.
"""

from __future__ import annotations

import copy
import re
import hashlib
import json
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from typing import Annotated

from pydantic import (BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError,
                      field_validator, model_validator)

from bnlab.experiments.results import COMPARABLE_FIELDS, DEFAULT_PRIMARY, FIELDS
from bnlab.models import load_model_spec, parse_model_spec
from bnlab.models.spec import spec_to_dict
from bnlab.textfile import TextFileError, read_text_file
from bnlab.train.config import TrainConfig, Validation, later_defaults


class SpecError(ValueError):
    """An experiment spec that does not validate; the message lists every problem."""


# an experiment's or a variant's name is a folder name (runs/<experiment>/, <folder>/runs/<variant>/): a
# safe slug, never a path: no separator, no '..', not absolute (check_name)
NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
NAME_RULE = ("1-64 ASCII letters, digits, '.', '_' or '-', starting with a letter or digit (it names a folder: no "
             "path separators, no '..', no absolute path)")
MAX_SEEDS = 1000  # runs per variant
MAX_VARIANTS = 256
MAX_SEED = 2**31 - 1


class DataFallback(BaseModel):
    """``[data] fallback``: an embedded dataset to run on when the primary dataset's files are not on this
    machine (``choose_data``); its own split and scaling, the primary's ``data_dir``."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    dataset: str
    validation: Validation = None
    scaling: TrainConfig.model_fields["scaling"].annotation = None
    options: dict = {}

    @field_validator("dataset")
    @classmethod
    def _embedded(cls, v):
        from bnlab.data import dataset_info

        if not dataset_info(v).embedded:  # unknown: a ValueError listing the known ones
            embedded = sorted(d.name for d in _datasets() if d.embedded)
            raise ValueError(f"a fallback must be available offline: one of the embedded datasets {embedded} "
                             f"(got {v!r}, which is downloaded)")
        return v

    @model_validator(mode="after")
    def _options(self):
        from bnlab.data import check_dataset_options

        check_dataset_options(self.dataset, self.options)
        return self


def check_name(name, what: str) -> str:
    """``name`` if it can be an experiment's or a variant's name (NAME: a folder name, never a path), else a
    ValueError saying the rule. The one check of both: ``runs/<experiment name>`` is ``bnlab run``'s default
    folder and ``runs/<variant>/seed-<n>`` each run's."""
    if not isinstance(name, str) or not re.fullmatch(NAME, name):
        shown = repr(name) if len(repr(name)) <= 80 else repr(name)[:77] + "..."
        raise ValueError(f"{what} name {shown} is not allowed: expected {NAME_RULE}")
    return name


def _datasets():
    from bnlab.data import list_datasets

    return list_datasets()


class DataSection(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    dataset: str = "mnist-5k"
    data_dir: str | None = None
    validation: Validation = None  # as TrainConfig: a count (an int) or a fraction (a float in (0, 1))
    scaling: TrainConfig.model_fields["scaling"].annotation = None
    options: dict = {}
    fallback: DataFallback | None = None  # used when ``dataset``'s files are not here (choose_data)

    @field_validator("dataset")
    @classmethod
    def _known(cls, v):
        from bnlab.data import dataset_info

        dataset_info(v)  # unknown: a ValueError listing the known ones
        return v

    @model_validator(mode="after")
    def _options(self):
        from bnlab.data import check_dataset_options, dataset_info

        check_dataset_options(self.dataset, self.options)
        if self.fallback is not None and dataset_info(self.dataset).embedded:
            raise ValueError(f"fallback: dataset {self.dataset!r} is embedded, always available, so a fallback "
                             "would never be used; remove it")
        return self


# how to put MNIST-like files on this machine (bnlab has no separate download command: loading downloads)
DOWNLOAD_HINT = "python -c \"from bnlab.data import load_dataset; load_dataset('{name}')\""


@dataclass(frozen=True)
class DataChoice:
    """Which data an experiment with a ``[data] fallback`` runs on, decided once when it is planned and
    stored with it (meta ``data_choice``): a resumed experiment keeps the stored choice."""
    dataset: str  # the dataset the runs use
    primary: str  # the spec's [data] dataset
    fallback: bool  # True: the primary's files were not here
    reason: str

    def note(self) -> str:
        """The one line ``bnlab run`` prints."""
        if not self.fallback:
            return f"data: {self.dataset} ({self.reason})"
        return (f"data: {self.dataset} (embedded), the fallback for {self.primary}, because {self.reason}; to run "
                f"on {self.primary}, download it ({DOWNLOAD_HINT.format(name=self.primary)}, or put its files in a "
                f"folder and pass --data-dir) and use a new --out folder")

    def to_json(self) -> str:
        return json.dumps({"dataset": self.dataset, "primary": self.primary, "fallback": self.fallback,
                           "reason": self.reason})

    @classmethod
    def from_json(cls, text: str) -> "DataChoice":
        d = json.loads(text)
        return cls(d["dataset"], d["primary"], bool(d["fallback"]), d["reason"])


def choose_data(spec: "ExperimentSpec", stored: DataChoice | None = None,
                where: str = "the experiment folder") -> tuple["ExperimentSpec", DataChoice | None]:
    """(the spec with the data its runs use, the choice); a spec without ``[data] fallback`` comes back
    as it is, with None. The primary dataset is used when ``bnlab.data.available_offline`` finds its
    files (nothing is downloaded), else the fallback. ``stored``: the choice a folder was started with,
    which is kept, so a resumed experiment never mixes data (MNIST downloaded meanwhile: the folder
    goes on with its fallback; a folder started on the primary whose files are gone: a SpecError)."""
    from bnlab.data import available_offline

    data = spec.data
    if data.fallback is None:
        return spec, None
    here = available_offline(data.dataset, data.data_dir)
    if stored is not None:
        if stored.dataset not in (data.dataset, data.fallback.dataset):
            raise SpecError(f"{where} was run on {stored.dataset!r}, which is neither {data.dataset!r} nor its "
                            f"fallback {data.fallback.dataset!r}; use another --out folder")
        if not stored.fallback and not here:
            raise SpecError(f"{where} was started on {data.dataset!r}, whose files are no longer found (in "
                            f"{data.data_dir or 'the cache'}); put them back (or pass --data-dir) to continue it, "
                            f"or use another --out folder to run on the fallback {data.fallback.dataset!r}")
        kept = f"kept from {where}, started on it: {stored.reason}"
        if stored.fallback and here:
            kept += f" ({data.dataset} is here now, but a folder never switches data)"
        choice = DataChoice(stored.dataset, data.dataset, stored.fallback, kept)
    elif here:
        choice = DataChoice(data.dataset, data.dataset, False, f"its files are on this machine"
                            + (f" (in {data.data_dir} or the cache)" if data.data_dir else " (in the cache)"))
    else:
        from bnlab.data import cache_dir

        looked = ([data.data_dir] if data.data_dir else []) + [str(cache_dir() / data.dataset)]
        choice = DataChoice(data.fallback.dataset, data.dataset, True,
                            f"{data.dataset} is not downloaded (its files are not in {' or '.join(looked)})")
    if not choice.fallback:
        return spec.model_copy(update={"data": data.model_copy(update={"fallback": None})}), choice
    fb = data.fallback
    return spec.model_copy(update={"data": DataSection(dataset=fb.dataset, data_dir=data.data_dir,
                                                       validation=fb.validation, scaling=fb.scaling,
                                                       options=fb.options)}), choice


class Variant(BaseModel):
    model_config = ConfigDict(extra="forbid")
    description: str = ""
    group: str = ""  # variants of one method at different settings (plotted as one line)
    model: dict = {}
    train: dict = {}


Seed = Annotated[StrictInt, Field(ge=0, le=MAX_SEED)]
# a count (seeds 0..n-1) or a list of distinct seeds
Seeds = Annotated[StrictInt, Field(ge=1, le=MAX_SEEDS)] | Annotated[list[Seed], Field(min_length=1,
                                                                                    max_length=MAX_SEEDS)]


def _check_seeds(v):
    rule = f"seeds must be a count 1..{MAX_SEEDS} or a list of 1..{MAX_SEEDS} distinct integers 0..{MAX_SEED}"
    if isinstance(v, int) and not isinstance(v, bool):
        if not 1 <= v <= MAX_SEEDS:
            raise ValueError(rule)
    elif isinstance(v, list):
        if not 1 <= len(v) <= MAX_SEEDS or len(set(map(repr, v))) != len(v) or not all(
                isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_SEED for x in v):
            raise ValueError(rule)
    else:
        raise ValueError(rule)
    return v


class QuickSection(BaseModel):
    model_config = ConfigDict(extra="forbid")
    seeds: Seeds | None = None
    probes: dict = {}
    data: dict = {}
    model: dict = {}
    train: dict = {}

    @field_validator("seeds", mode="before")
    @classmethod
    def _seeds(cls, v):
        return v if v is None else _check_seeds(v)


class ExperimentSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    name: str  # check_name: the default folder is runs/<name>
    description: str = ""
    seeds: Seeds = 3  # a count (seeds 0..n-1) or a list of distinct seeds
    target_accuracy: StrictFloat | None = Field(None, gt=0, le=1)
    data: DataSection = DataSection()
    model: dict = {}
    train: dict = {}
    variants: dict[str, Variant] = Field(min_length=1, max_length=MAX_VARIANTS)  # names: check_name
    quick: QuickSection = QuickSection()
    probes: dict = {}  # a bnlab.probes.ProbeConfig for every run; empty: no probes
    # the metric the experiment is about: verdicts are drawn on it alone (Holm's correction over
    # its pairs of variants); every other metric is reported as exploratory
    primary_metric: str = DEFAULT_PRIMARY
    # a grouped study's reference method (a variant group): every other method's trend with the batch size is
    # tested against it (the method x log2(images per device) interaction, bnlab.experiments.stats.interaction)
    reference_group: str = ""
    # set by apply_quick: a --quick run checks that the experiment runs; its report draws no verdicts
    smoke_test: StrictBool = False

    @field_validator("primary_metric")
    @classmethod
    def _primary(cls, v):
        if v not in COMPARABLE_FIELDS:
            what = "not a result field" if v not in FIELDS else f"an {FIELDS[v].kind} field, never compared"
            raise ValueError(f"must be a result field compared between variants: one of "
                             f"{', '.join(COMPARABLE_FIELDS)}; {v!r} is {what}")
        return v

    @field_validator("name", mode="before")
    @classmethod
    def _name(cls, v):
        return check_name(v, "experiment")

    @field_validator("seeds", mode="before")
    @classmethod
    def _seeds(cls, v):
        return _check_seeds(v)

    @field_validator("variants", mode="before")
    @classmethod
    def _variant_names(cls, v):
        for name in v if isinstance(v, dict) else ():
            check_name(name, "variant")
        return v

    @field_validator("train")
    @classmethod
    def _train_keys(cls, v):
        bad = {"dataset", "data_dir", "validation", "scaling", "dataset_options", "seed"} & set(v)
        if bad:
            raise ValueError(f"{sorted(bad)} belong in [data] or seeds, not [train]")
        return v

    @model_validator(mode="after")
    def _reference_is_a_group(self):
        groups = {v.group for v in self.variants.values() if v.group}
        if self.reference_group and self.reference_group not in groups:
            raise ValueError(f"reference_group must be one of the variants' groups ({', '.join(sorted(groups)) or 'none'}"
                             f"); got {self.reference_group!r}")
        return self

    @model_validator(mode="after")
    def _primary_needs_target(self):
        if FIELDS[self.primary_metric].kind == "time_to_target" and self.target_accuracy is None:
            raise ValueError(f"primary_metric {self.primary_metric!r} needs target_accuracy")
        return self

    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)


@dataclass(frozen=True)
class RunPlan:
    run_id: str  # "<variant>/seed-<n>"
    variant: str
    seed: int
    model: dict  # resolved model spec
    train: dict  # resolved TrainConfig

    @property
    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps({"model": self.model, "train": self.train}, sort_keys=True)
                              .encode()).hexdigest()[:16]


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _short(value, limit: int = 80) -> str:
    """repr of a bad value, cut to ``limit`` characters (a 10,000-item list is not echoed back)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def format_errors(e: ValidationError, where: str = "") -> str:
    """One line per problem: the dotted key, pydantic's message, the value that arrived."""
    lines = []
    for err in e.errors():
        # drop the tags a union puts in the path: the model kind a discriminated union puts first
        # ("mlp.activation"; a layers spec's own field "layers" stays: "layers.0.units") and a plain union's
        # member ("seeds.constrained-int", "momentum.literal['default']")
        path = list(err["loc"])
        if path and path[0] in ("mlp", "cnn", "layers", "factory"):
            path = path[1:]
        loc = ".".join(str(p) for p in path
                       if not re.fullmatch(r"[a-z-]+\[.*\]|constrained-\w+|function-\w+", str(p))) or "(top level)"
        got = f" (got {_short(err['input'])})" if "input" in err and not isinstance(err["input"], dict) else ""
        if got and isinstance(err["input"], str) and repr(err["input"])[:40] in err["msg"]:  # named already
            got = ""
        lines.append(f"  {where}{loc}: {err['msg'].removeprefix('Value error, ')}{got}")
    return "\n".join(dict.fromkeys(lines))


def apply_quick(spec: ExperimentSpec) -> ExperimentSpec:
    """The spec at its --quick scale (minutes, for smoke tests and CI), marked as a smoke test: its
    store and report say so, state the budget really run, and draw no verdicts."""
    q = spec.quick
    data = _merge(spec.data.model_dump(), q.data)
    return spec.model_copy(update={
        "smoke_test": True,
        "seeds": q.seeds if q.seeds is not None else spec.seeds,
        "data": DataSection(**data), "model": _merge(spec.model, q.model), "train": _merge(spec.train, q.train),
        "probes": _merge(spec.probes, q.probes) if spec.probes else {}})


def expand(spec: ExperimentSpec) -> list[RunPlan]:
    """variants x seeds -> validated run plans (every problem reported at once)."""
    problems = []
    plans = []
    base_model = dict(spec.model)
    preset = base_model.pop("preset", None)
    for vname, variant in spec.variants.items():
        try:
            mdict = _merge(base_model, variant.model)
            mspec = load_model_spec(preset, mdict) if preset else parse_model_spec(mdict)
        except ValidationError as e:
            problems.append(format_errors(e, f"variants.{vname}.model."))
            continue
        except ValueError as e:
            problems.append(f"  model.preset: {e}")
            continue
        tdict = _merge(spec.train, variant.train)
        if spec.target_accuracy is not None:
            tdict.setdefault("target_accuracy", spec.target_accuracy)
        if spec.probes:
            tdict.setdefault("probes", spec.probes)
        for seed in spec.seed_list():
            try:
                cfg = TrainConfig(dataset=spec.data.dataset, data_dir=spec.data.data_dir,
                                  validation=spec.data.validation, scaling=spec.data.scaling,
                                  dataset_options=spec.data.options, seed=seed, **tdict)
            except ValidationError as e:
                problems.append(format_errors(e, f"variants.{vname}.train."))
                break
            plans.append(RunPlan(f"{vname}/seed-{seed}", vname, seed, spec_to_dict(mspec),
                                 cfg.model_dump(exclude=later_defaults(cfg))))
    if problems:
        raise SpecError(f"experiment {spec.name!r} is not valid:\n" + "\n".join(dict.fromkeys(problems)))
    return plans


def parse_experiment(data: dict, where: str = "spec") -> ExperimentSpec:
    try:
        spec = ExperimentSpec(**data)
    except ValidationError as e:
        raise SpecError(f"{where} is not a valid experiment spec:\n{format_errors(e, '')}") from None
    expand(spec)  # validates every variant's model and training settings now
    if not spec.smoke_test and spec.quick != QuickSection():  # and its --quick scale's: a typo there fails now
        try:
            expand(apply_quick(spec))
        except SpecError as e:
            raise SpecError(f"{where}: its [quick] section does not give a valid spec (--quick would fail):\n{e}") from None
        except (ValidationError, ValueError) as e:
            raise SpecError(f"{where}: its [quick] section does not give a valid spec (--quick would fail): {e}") from None
    return spec


def preset_names() -> list[str]:
    folder = resources.files("bnlab.experiments") / "presets"
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


def read_spec_text(path: Path) -> str:
    """The text of a spec file (``bnlab.textfile.read_text_file``'s rules), or a SpecError."""
    if not path.exists():
        raise SpecError(f"{str(path)!r} is neither an experiment preset ({', '.join(preset_names())}) "
                        "nor a TOML file")
    try:
        return read_text_file(path)
    except TextFileError as e:
        raise SpecError(str(e)) from None


def load_experiment(name_or_path: str | Path) -> ExperimentSpec:
    """A shipped preset name or a path to a TOML spec."""
    name = str(name_or_path)
    if name in preset_names():
        text = (resources.files("bnlab.experiments") / "presets" / f"{name}.toml").read_text()
        where = f"preset {name}"
    else:
        path = Path(name)
        text, where = read_spec_text(path), str(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"{where}: not valid TOML: {e}") from None
    return parse_experiment(data, where)
