"""What bnlab knows: datasets, model presets, experiment presets, model summaries."""

from __future__ import annotations

import re

import typer
from rich.markup import escape
from rich.table import Table

from bnlab.cli.app import _fail, app, console, describe_error, fail_if_out_of_memory, trust_factory_option


@app.command("datasets")
def datasets_cmd() -> None:
    """List the datasets bnlab knows, and where downloads are cached.

    Example: bnlab datasets
    """
    from bnlab.data import cache_dir, list_datasets

    table = Table(title=f"datasets (cache: {escape(str(cache_dir()))})", title_justify="left")
    for col in ("name", "offline", "default validation", "default scaling", "description"):
        table.add_column(col)
    for d in list_datasets():
        table.add_row(*(escape(str(c)) for c in (d.name, "yes" if d.embedded else "download", d.validation,
                                                  d.scaling, d.description)))
    console.print(table)


@app.command("models")
def models_cmd() -> None:
    """List the named model presets (the seed notebooks' networks).

    Example: bnlab models
    """
    from bnlab.models import list_model_presets

    table = Table(title="model presets", title_justify="left")
    table.add_column("name")
    table.add_column("description")
    for name, desc in list_model_presets().items():
        table.add_row(escape(name), escape(desc))
    console.print(table)


@app.command()
def summary(model: str = typer.Argument(..., help="A model preset, a .toml/.json spec file, a checkpoint or run "
                                                  "folder, or a Keras .h5/.keras file."),
            trust_factory: bool = trust_factory_option()) -> None:
    """Print a Keras-style summary: layers, output shapes, parameter counts.

    A BN layer over C channels counts 2C trainable (gamma, beta) and 2C non-trainable
    (moving mean and variance) parameters, as in Keras; a Keras file's counts are Keras's own.

    Example: bnlab summary fashion-mlp-bn-after   (or a checkpoint folder, or a Keras file: bnlab summary model.h5)
    """
    from pydantic import ValidationError

    from bnlab.deploy.summary import summary_of

    try:
        text = summary_of(model, trust_factory=trust_factory).to_text()
    except ValidationError as e:  # a spec file's fields, as bnlab train words them
        from bnlab.experiments.spec import format_errors

        _fail(f"{model}: not a valid model spec:\n{format_errors(e)}")
    except (ValueError, OSError, MemoryError, RecursionError) as e:
        _fail(describe_error(e))
    except RuntimeError as e:  # torch's allocator: a model larger than this machine's memory
        fail_if_out_of_memory(e, model)
    print(text)


def first_sentence(text: str) -> str:
    """The text's first sentence, its line breaks joined (a preset's description is wrapped TOML)."""
    flat = " ".join(text.split())
    end = re.search(r"(?<=[.?!])\s+(?=[A-Z])", flat)  # "e.g. x" does not end one
    return flat[:end.start()] if end else flat


def _variants_cell(names: list[str]) -> str:
    return ", ".join(names) if len(names) <= 6 else f"{len(names)}: " + ", ".join(names[:4]) + ", …"


@app.command("list")
def list_cmd() -> None:
    """List the experiment presets (bnlab run PRESET), then the model presets and datasets.

    Example: bnlab list
    """
    from bnlab.experiments import load_experiment, preset_names

    table = Table(title="experiment presets (bnlab run NAME [--quick])", title_justify="left")
    table.add_column("name", no_wrap=True)
    for col in ("dataset", "variants", "seeds", "description"):
        table.add_column(col)
    for name in preset_names():
        spec = load_experiment(name)
        data = spec.data.dataset + (f" (else {spec.data.fallback.dataset})" if spec.data.fallback else "")
        table.add_row(*(escape(c) for c in (name, data, _variants_cell(list(spec.variants)),
                                            str(len(spec.seed_list())), first_sentence(spec.description))))
    console.print(table)
    from importlib import resources
    console.print(f"each preset in full: {escape(str(resources.files('bnlab.experiments') / 'presets'))}/NAME.toml\n")
    models_cmd()
    datasets_cmd()
