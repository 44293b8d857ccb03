"""Build a ``factory`` model spec: find the user's function, call it seeded, convert its norms.

A factory spec names code (``package.module:function`` or ``path/file.py:function``), and a spec or a
checkpoint is data anyone can write: a digest proves a file unchanged, not who wrote it. So bnlab never
imports a factory it was not told to trust. A factory is run only when

* it is registered in the running process (``register_factory``: the user's own code chose it), or
* the call that loads it opts in: ``trust_factory=True`` (every factory the call meets) or a collection
  of factory names, from the command line ``--trust-factory`` (as ``trust_remote_code`` in transformers).

Otherwise ``UntrustedFactory`` names the factory and both ways to trust it, before anything is imported.
The opt-in holds for the call that gave it (a context variable set by ``trusting``), including the work it
does in worker processes, which receive the names trusted for it.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import torch
from torch import nn

from bnlab.models.spec import FACTORY_PATTERN

# the factories the running process registered: spec name -> function
_REGISTERED: dict[str, Callable[..., nn.Module]] = {}
# what the current call trusts: True (every factory it meets) or the names it trusts
_TRUSTED: ContextVar[bool | frozenset[str]] = ContextVar("bnlab_trusted_factories", default=frozenset())


class UntrustedFactory(ValueError):
    """A spec or checkpoint names a factory (code) that this call was not told to trust."""


def register_factory(name: str, fn: Callable[..., nn.Module] | None = None):
    """Make ``name`` (as a spec writes it, e.g. ``"mynets:resnet"``) mean ``fn`` in this process, so specs and
    checkpoints naming it load without ``trust_factory``; usable as a decorator (``@register_factory("x:f")``).
    Worker processes of ``run_experiment`` start fresh: there bnlab imports ``name`` itself, so a factory
    used in an experiment should be registered under its importable name."""
    if not isinstance(name, str) or not re.fullmatch(FACTORY_PATTERN, name):
        raise ValueError(f"register_factory: expected a name like 'package.module:function' or "
                         f"'path/file.py:function' (got {name!r})")

    def register(f):
        if not callable(f):
            raise TypeError(f"register_factory({name!r}): expected a function returning an nn.Module "
                            f"(got {type(f).__name__})")
        _REGISTERED[name] = f
        return f

    return register if fn is None else register(fn)


def _as_trust(trust: bool | Iterable[str] | None) -> bool | frozenset[str]:
    if trust is None or trust is False:
        return frozenset()
    if trust is True:
        return True
    if isinstance(trust, str):  # one name, not its letters
        return frozenset([trust])
    names = list(trust) if isinstance(trust, (list, tuple, set, frozenset)) else None
    if names is None or not all(isinstance(n, str) for n in names):
        raise TypeError(f"trust_factory: expected True, False or factory names like 'package.module:function' "
                        f"(got {trust!r})")
    return frozenset(names)


@contextmanager
def trusting(trust: bool | Iterable[str] | None) -> Iterator[None]:
    """Within the block, also trust ``trust`` (True: every factory; or factory names) on top of what the
    enclosing call trusts already."""
    now, more = _TRUSTED.get(), _as_trust(trust)
    token = _TRUSTED.set(True if now is True or more is True else now | more)
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def is_trusted(name: str) -> bool:
    """Whether a spec naming factory ``name`` may be built here and now."""
    trusted = _TRUSTED.get()
    return name in _REGISTERED or trusted is True or name in trusted


def untrusted_message(name: str) -> str:
    return (f"the model is built by the factory {name!r}, which is code: loading it would import and run it. "
            "bnlab runs a spec's or checkpoint's factory only when told to: if you trust where this came from, "
            "pass --trust-factory (Python: trust_factory=True), or register the function in your own code "
            f"with bnlab.register_factory({name!r}, fn)")


def require_trusted(names: Iterable[str], where: str = "") -> None:
    """UntrustedFactory naming every factory of ``names`` that is not trusted here (nothing is imported)."""
    refused = sorted({n for n in names if not is_trusted(n)})
    if refused:
        prefix = f"{where}: " if where else ""
        if len(refused) == 1:
            raise UntrustedFactory(prefix + untrusted_message(refused[0]))
        raise UntrustedFactory(prefix + f"the models are built by the factories {', '.join(map(repr, refused))}, "
                               "which are code: " + untrusted_message(refused[0]).split("code: ", 1)[1])


def factory_names(specs: Iterable) -> list[str]:
    """The factories that model specs (spec objects or dicts) name."""
    names = []
    for spec in specs:
        kind, name = ((spec.get("kind"), spec.get("factory")) if isinstance(spec, dict)
                      else (getattr(spec, "kind", None), getattr(spec, "factory", None)))
        if isinstance(name, str) and kind in (None, "factory"):
            names.append(name)
    return names


def require_trusted_specs(specs: Iterable, where: str = "") -> None:
    """``require_trusted`` for the factories model specs name: refused before anything is read or built."""
    require_trusted(factory_names(specs), where)


def trusted_names(names: Iterable[str]) -> list[str]:
    """The names of ``names`` trusted here (for worker processes, which start with nothing trusted)."""
    return sorted({n for n in names if is_trusted(n)})


def load_factory(name: str):
    """The function ``package.module:function`` or ``path/file.py:function`` names: the registered one, or,
    where this call trusts it, imported (a ValueError saying what was not found otherwise); an untrusted
    name is refused before anything is imported."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    require_trusted([name])
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

        model = convert(model, spec.norm, options=spec.norm_options, input_shape=spec.input_shape)
    model.spec = spec  # checkpoints and runs read the spec back, as from a SpecModel
    return model
