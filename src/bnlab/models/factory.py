"""Build a ``factory`` model spec: import the user's function, call it seeded, convert its norms.

Loading such a model (a checkpoint, an experiment's runs) imports and runs the named code: only load
checkpoints and specs you trust, as with any pickle or ``torch.load``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from pathlib import Path

import torch
from torch import nn


def load_factory(name: str):
    """The function ``package.module:function`` or ``path/file.py:function`` names (a ValueError
    saying what was not found otherwise)."""
    where, _, func = name.rpartition(":")
    try:
        if where.endswith(".py"):
            path = Path(where).expanduser().resolve()
            if not path.is_file():
                raise ValueError(f"model factory {name!r}: no file {path}")
            module_spec = importlib.util.spec_from_file_location(f"bnlab_factory_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's module may raise anything while importing
        raise ValueError(f"model factory {name!r}: cannot import {where!r} ({type(e).__name__}: {e})") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise ValueError(f"model factory {name!r}: {where!r} has no function {func!r}")
    return fn


def build_factory_model(spec, *, seed: int | None = None) -> nn.Module:
    fn = load_factory(spec.factory)
    kwargs = dict(spec.kwargs)
    try:
        takes_classes = "num_classes" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        takes_classes = False
    if takes_classes:
        kwargs.setdefault("num_classes", spec.num_classes)
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        try:
            model = fn(**kwargs)
        except Exception as e:  # noqa: BLE001 - report the user's error with where it came from
            raise ValueError(f"model factory {spec.factory!r} failed with kwargs {kwargs}: "
                             f"{type(e).__name__}: {e}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model factory {spec.factory!r} returned {type(model).__name__}, expected a torch nn.Module")
    if spec.norm != "keep":
        from bnlab.conversion import convert

        model = convert(model, spec.norm, options=spec.norm_options)
    model.spec = spec  # checkpoints and runs read the spec back, as from a SpecModel
    return model
