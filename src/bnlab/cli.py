"""The ``bnlab`` command line: parse, call the library, print. No logic lives here."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from bnlab import __version__

app = typer.Typer(
    help="bnlab: a laboratory for batch normalization.\n\nExample: bnlab check",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)
console = Console()


def _version(value: bool) -> None:
    if value:
        console.print(f"bnlab {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """bnlab: a laboratory for batch normalization."""


@app.command()
def check(
    quick: bool = typer.Option(False, "--quick", help="Time a smaller tensor (32, 64, 16, 16)."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Verify bnlab's BN maths on this machine and time it against torch.

    Prints the reference gradient checks (float64), the agreement with torch.nn.BatchNorm
    (max relative error of y, dx, dgamma, dbeta, running statistics) and the keras rule,
    then the forward+backward time ratio against torch.nn.BatchNorm2d. Exits 1 if any
    correctness check fails; the time ratio is reported, not a pass/fail check.

    Example: bnlab check --quick
    """
    from bnlab.verify import correctness_checks, speed_check

    with console.status("running checks..."):
        rows = correctness_checks()
        speed = speed_check((32, 64, 16, 16) if quick else (128, 64, 32, 32))
    failed = [r for r in rows if not r.passed]
    from bnlab.train import native
    native_status = {"available": native.unavailable_reason() is None, "reason": native.unavailable_reason(),
                     "build_dir": str(native.build_dir())}
    if as_json:
        print(json.dumps({"passed": not failed, "checks": [asdict(r) for r in rows],
                          "speed": asdict(speed), "native_step": native_status}, indent=2))
    else:
        for table in check_tables(rows):
            console.print(table)
        console.print(
            f"speed: forward+backward on {speed.shape} float32: bnlab {speed.bnlab_s * 1e3:.1f} ms, "
            f"torch.nn.BatchNorm2d {speed.torch_s * 1e3:.1f} ms, ratio [bold]{speed.ratio:.2f}x[/] "
            f"(goal <= {speed.goal}x)"
        )
        console.print("native MLP step: " + (f"built, checked above ({native_status['build_dir']})"
                                             if native_status["available"] else
                                             f"[yellow]unavailable[/] ({native_status['reason']}); "
                                             "training uses the Python fused step"))
        if failed:
            console.print(f"[red]{len(failed)} of {len(rows)} checks failed:[/] "
                          + "; ".join(f"{r.group} {r.case} {r.quantity}" for r in failed))
        else:
            console.print(f"[green]all {len(rows)} checks passed[/]")
    if failed:
        raise typer.Exit(code=1)


def check_tables(rows) -> list[Table]:
    """One table per group: a row per case, a column per quantity (max relative error)."""
    tables = []
    for group in dict.fromkeys(r.group for r in rows):
        grows = [r for r in rows if r.group == group]
        quantities = list(dict.fromkeys(r.quantity for r in grows))
        table = Table(title=f"{group}: max relative error (tolerance {grows[0].tolerance:.0e})",
                      title_justify="left")
        table.add_column("case")
        for q in quantities:
            table.add_column(q, justify="right")
        table.add_column("result")
        for case in dict.fromkeys(r.case for r in grows):
            cells = {r.quantity: r for r in grows if r.case == case}
            ok = all(r.passed for r in cells.values())
            table.add_row(case, *[f"{cells[q].value:.1e}" if q in cells else "" for q in quantities],
                          "[green]ok[/]" if ok else "[red]FAIL[/]")
        tables.append(table)
    return tables


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[red]error:[/] {message}")
    raise typer.Exit(code=code)


@app.command("datasets")
def datasets_cmd() -> None:
    """List the datasets bnlab knows, and where downloads are cached.

    Example: bnlab datasets
    """
    from bnlab.data import cache_dir, list_datasets

    table = Table(title=f"datasets (cache: {cache_dir()})", title_justify="left")
    for col in ("name", "offline", "default validation", "default scaling", "description"):
        table.add_column(col)
    for d in list_datasets():
        table.add_row(d.name, "yes" if d.embedded else "download", str(d.validation), d.scaling, d.description)
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
        table.add_row(name, desc)
    console.print(table)


@app.command()
def summary(model: str = typer.Argument(..., help="A model preset name or a .toml/.json spec file.")) -> None:
    """Print a Keras-style summary: layers, output shapes, parameter counts.

    A BN layer over C channels counts 2C trainable (gamma, beta) and 2C non-trainable
    (moving mean and variance) parameters, as in Keras.

    Example: bnlab summary fashion-mlp-bn-after
    """
    from pydantic import ValidationError

    from bnlab.models import build_model, load_model_spec, summarize

    try:
        spec = load_model_spec(model)
        built = build_model(spec)
    except (ValueError, ValidationError) as e:
        _fail(str(e))
    print(summarize(built, tuple(spec.input_shape), name=model).to_text())


@app.command()
def train(
    model: str = typer.Argument(..., help="A model preset name or a .toml/.json spec file."),
    dataset: str = typer.Option(None, help="Dataset name (see bnlab datasets); default: the preset's."),
    data_dir: str = typer.Option(None, "--data-dir", help="Folder with dataset files placed by hand."),
    epochs: int = typer.Option(None, help="Epochs (default: the preset's recipe, else 10)."),
    batch_size: int = typer.Option(None, "--batch-size"),
    lr: float = typer.Option(None, help="Learning rate."),
    optimizer: str = typer.Option(None, help="sgd | rmsprop | adam."),
    momentum: float = typer.Option(None),
    nesterov: bool = typer.Option(None, "--nesterov/--no-nesterov"),
    seed: int = typer.Option(0),
    validation: float = typer.Option(None, help="Validation: an integer count (the first N) or a fraction."),
    target: float = typer.Option(None, "--target", help="Target validation accuracy for time-to-target."),
    patience: int = typer.Option(None, help="Early stopping patience in epochs."),
    max_steps: int = typer.Option(None, "--max-steps"),
    engine: str = typer.Option("auto", help="auto | native (C++ MLP step) | fused (Python MLP step) | autograd."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    out: Path = typer.Option(None, help="Folder for run.json, history.json, checkpoint/ (the best-validation "
                             "model) and checkpoint-final/ (the final model)."),
) -> None:
    """Train one model on one dataset and print the per-epoch metrics and the test result.

    Settings come from the model preset's recipe (the seed notebook's), overridden by options.

    Example: bnlab train fashion-mlp-bn-before --dataset mnist-5k --epochs 3 --out runs/one
    """
    from pydantic import ValidationError

    from bnlab.data import ChecksumError, CorruptFileError, DatasetUnavailable
    from bnlab.models import load_model_spec
    from bnlab.train.config import TrainConfig, recipe_for
    from bnlab.train.single import train_run

    given = {"dataset": dataset, "data_dir": data_dir, "epochs": epochs, "batch_size": batch_size, "lr": lr,
             "optimizer": optimizer, "momentum": momentum, "nesterov": nesterov, "seed": seed,
             "target_accuracy": target, "patience": patience, "max_steps": max_steps, "engine": engine,
             "device": device}
    if validation is not None:
        given["validation"] = int(validation) if float(validation).is_integer() and validation >= 1 else validation
    try:
        spec = load_model_spec(model)
        settings = recipe_for(model)
        if dataset is not None and dataset != settings.get("dataset"):
            settings.pop("validation", None)  # the recipe's split fits its own dataset only
        settings.update({k: v for k, v in given.items() if v is not None})
        config = TrainConfig(**settings)
        result = train_run(spec, config, out=out)
    except ValidationError as e:
        _fail(str(e))
    except (DatasetUnavailable, ChecksumError, CorruptFileError, ValueError) as e:
        _fail(str(e))
    for note in result.notes:
        console.print(f"note: {note}")
    h = result.history
    table = Table(title=f"{model} on {config.dataset} ({h.engine} engine)", title_justify="left")
    for col in ("epoch", "loss", "acc", "val_loss", "val_acc", "seconds"):
        table.add_column(col, justify="right")
    for e in h.epochs:
        table.add_row(str(e.epoch), f"{e.train_loss:.4f}", f"{e.train_accuracy:.4f}",
                      "-" if e.val_loss is None else f"{e.val_loss:.4f}",
                      "-" if e.val_accuracy is None else f"{e.val_accuracy:.4f}", f"{e.seconds:.2f}")
    console.print(table)

    def fmt(x):
        return "-" if x is None else f"{x:.4f}"

    last = h.epochs[-1].epoch if h.epochs else None
    console.print(f"stopped: {h.stopped}{' (' + h.message + ')' if h.message else ''}; test set: "
                  f"{result.test_examples:,} examples")
    console.print(f"final model (epoch {last}): test loss {fmt(result.test_loss)}, test accuracy "
                  f"{fmt(result.test_accuracy)}" + (f"; with precise BN statistics: validation accuracy "
                                                     f"{fmt(result.precise_val_accuracy)}, test accuracy "
                                                     f"{fmt(result.precise_test_accuracy)}"
                                                     if result.precise_test_accuracy is not None else ""))
    console.print(f"best-validation model (epoch {result.best_epoch}, by {config.monitor}): test loss "
                  f"{fmt(result.best_test_loss)}, test accuracy {fmt(result.best_test_accuracy)}")
    if h.target_accuracy is not None:
        console.print(f"target {h.target_accuracy}: " + (f"reached at epoch {h.epochs_to_target}, step "
                      f"{h.steps_to_target}, {h.seconds_to_target:.1f} s" if h.steps_to_target else "not reached"))
    if out is not None:
        what = {"best": "the best-validation model, used by predict / serve / export by default",
                "final": "the final model"}
        saved = [f"{result.checkpoints[k]}/ ({what[k]})" for k in ("best", "final") if k in result.checkpoints]
        console.print(f"results in {out}/: run.json, history.json" + "".join(", " + s for s in saved))
    if h.stopped == "diverged":
        raise typer.Exit(code=3)


@app.command("list")
def list_cmd() -> None:
    """List the experiment presets (bnlab run PRESET), then the model presets and datasets.

    Example: bnlab list
    """
    from bnlab.experiments import load_experiment, preset_names

    table = Table(title="experiment presets (bnlab run NAME [--quick])", title_justify="left")
    for col in ("name", "dataset", "variants", "seeds", "description"):
        table.add_column(col)
    for name in preset_names():
        spec = load_experiment(name)
        table.add_row(name, spec.data.dataset, ", ".join(spec.variants), str(len(spec.seed_list())),
                      spec.description.split("\n")[0])
    console.print(table)
    models_cmd()
    datasets_cmd()


def _stats_table(folder: Path) -> None:
    """The experiment's statistics in the terminal (bnlab run's closing table, bnlab compare)."""
    from rich.markup import escape

    from bnlab.experiments.read import load_results
    from bnlab.report.build import COMPACT_METRICS, texts

    spec, runs, _ = load_results(folder)
    t = texts(spec, runs, COMPACT_METRICS, compared=COMPACT_METRICS, short=True)
    if spec.smoke_test:
        console.print(f"[bold yellow]{escape(t.title)}[/]")
        for p in t.intro:
            console.print(escape(p))
    else:
        console.print(f"[bold]{escape(t.title)}[/]: {escape(t.budget)}")
    table = Table(title="mean ± 95% CI half-width over seeds (no ± with fewer than 3 runs); "
                        "times to target: Kaplan-Meier median [95% CI], unreached runs censored", title_justify="left")
    for h in t.header:
        table.add_column(escape(h), justify="left" if h == "variant" else "right")
    for r in t.rows:
        table.add_row(*(escape(c) for c in r))
    console.print(table)
    for s in t.precise_sentences:
        console.print(escape(s))
    console.print(escape(t.comparisons_note))
    for c in t.primary:
        console.print(("[bold]" if c.significant else "") + escape(c.sentence) + ("[/]" if c.significant else ""))
    for c in t.exploratory_comparisons:
        console.print(escape(c.sentence), style="dim")
    for rid, what in t.failures:
        console.print(f"{escape(rid)}: {escape(what)}", style="red" if what.startswith("failed") else "yellow")


@app.command()
def run(
    experiment: str = typer.Argument(..., help="An experiment preset (see bnlab list) or a TOML spec file."),
    seeds: int = typer.Option(None, help="Number of seeds per variant (overrides the spec)."),
    quick: bool = typer.Option(False, "--quick", help="The preset's quick scale (minutes; smoke tests, CI)."),
    out: Path = typer.Option(None, help="Experiment folder (default: runs/NAME or runs/NAME-quick)."),
    data_dir: str = typer.Option(None, "--data-dir", help="Folder with dataset files placed by hand."),
    workers: int = typer.Option(None, help="Worker processes (default: one per core)."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Run failed runs again."),
) -> None:
    """Run an experiment (variants x seeds) resumably into a folder, then print its statistics
    and write the HTML report.

    Interrupted? Run the same command again: finished runs are skipped.

    Example: bnlab run demo --quick
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from bnlab.data import ChecksumError, CorruptFileError, DatasetUnavailable
    from bnlab.experiments import SpecError, StoreError, load_experiment, run_experiment
    from bnlab.report import build_report

    try:
        spec = load_experiment(experiment)
    except SpecError as e:
        _fail(str(e))
    folder = out or Path("runs") / (spec.name + ("-quick" if quick else ""))
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=console, transient=False,
                   disable=not console.is_terminal)
    task = None

    def on_progress(p, message):
        nonlocal task
        eta = p.eta()
        status = (f"done {p.done} · running {p.running} · failed {p.failed}"
                  + (f" · eta {eta:.0f}s" if eta is not None else ""))
        if task is None:
            task = bar.add_task(spec.name, total=p.total, completed=p.skipped, status=status)
        bar.update(task, completed=p.skipped + p.done + p.failed, status=status)
        if not console.is_terminal or "failed" in message or "to do" in message or "nothing" in message:
            bar.console.print(f"[{p.skipped + p.done + p.failed}/{p.total}] {message} ({status})")

    try:
        with bar:
            progress = run_experiment(spec, folder, quick=quick, workers=workers, data_dir=data_dir, seeds=seeds,
                                      retry_failed=retry_failed, on_progress=on_progress)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted[/]: finished runs are saved in {folder}; run the same command to resume")
        raise typer.Exit(code=130)
    except (SpecError, StoreError, DatasetUnavailable, ChecksumError, CorruptFileError, ValueError) as e:
        _fail(str(e))
    _stats_table(folder)
    report = build_report(folder)
    console.print(f"report: {report.html} (and {report.markdown.name})"
                  + (" - a smoke test report: no verdicts" if report.smoke_test else ""))
    if progress.failed:
        console.print(f"[red]{progress.failed} run(s) failed[/]; their errors are in the report")
        raise typer.Exit(code=1)


@app.command()
def report(folder: Path = typer.Argument(..., help="An experiment folder made by bnlab run.")) -> None:
    """Write report.html (self-contained, opens offline) and report.md for an experiment folder.

    Example: bnlab report runs/demo
    """
    from bnlab.experiments import StoreError
    from bnlab.report import build_report

    try:
        r = build_report(folder)
    except StoreError as e:
        _fail(str(e))
    console.print(f"wrote {r.html} and {r.markdown} ({len(r.figures)} figures in {r.html.parent / 'figures'})"
                  + ("; a smoke test (--quick) report: no verdicts" if r.smoke_test else ""))


@app.command()
def compare(folder: Path = typer.Argument(..., help="An experiment folder made by bnlab run.")) -> None:
    """Print an experiment's statistics table and the comparisons between its variants.

    Example: bnlab compare runs/demo
    """
    from bnlab.experiments import StoreError

    try:
        _stats_table(folder)
    except StoreError as e:
        _fail(str(e))


def _checkpoint(path: Path):
    from bnlab.checkpoint import CheckpointError, load_checkpoint

    try:
        return load_checkpoint(path)
    except CheckpointError as e:
        _fail(str(e))


def _checkpoint_data(ck, dataset: str | None, data_dir: str | None):
    """The dataset a checkpoint was trained on (same split and scaling), or another one."""
    from bnlab.data import load_dataset

    train = ck.meta.get("train", {})
    name = dataset or ck.meta.get("dataset") or train.get("dataset")
    if not name:
        _fail("the checkpoint does not say which dataset it was trained on: pass --dataset")
    same = name == train.get("dataset")
    return load_dataset(name, data_dir=data_dir or train.get("data_dir"),
                        validation=train.get("validation") if same else None,
                        scaling=train.get("scaling") if same else None, seed=train.get("data_seed", 0),
                        **(train.get("dataset_options", {}) if same else {}))


@app.command()
def recalibrate(
    checkpoint: Path = typer.Argument(..., help="A checkpoint folder (model.safetensors + config.json), or a run "
                                      "folder (its best-validation model)."),
    out: Path = typer.Option(..., help="Folder for the recalibrated checkpoint."),
    dataset: str = typer.Option(None, help="Default: the dataset the checkpoint was trained on."),
    data_dir: str = typer.Option(None, "--data-dir"),
    batch_size: int = typer.Option(None, "--batch-size", help="Samples per forward pass (mode train: the batch whose "
                                   "statistics earlier BN layers normalize with). Default: the checkpoint's "
                                   "training batch size, else 32."),
    mode: str = typer.Option("both", help="train: earlier BN layers use batch statistics, as in training (fvcore's "
                             "PreciseBN) | inference: layer by layer, earlier layers with their new statistics | "
                             "both: compute and print both, write train."),
    seed: int = typer.Option(0, help="Seed of the shuffle into batches (mode train depends on it)."),
) -> None:
    """Replace BN's moving averages by precise population statistics over the training data (per channel, the
    mean and variance over all values each BN layer sees, with the weights fixed), print validation loss and
    accuracy with the moving averages and with each mode, and write the checkpoint of the chosen mode
    (--mode both writes mode train).

    Example: bnlab recalibrate runs/one/checkpoint --out runs/one/precise --mode both
    """
    from bnlab.checkpoint import save_checkpoint
    from bnlab.data import ChecksumError, CorruptFileError, DatasetUnavailable
    from bnlab.deploy import recalibrate as recal
    from bnlab.train import evaluate

    modes = {"train": ["train"], "inference": ["inference"], "both": ["train", "inference"]}
    if mode not in modes:
        _fail(f"--mode must be one of train, inference, both (got {mode!r})")
    written = modes[mode][0]
    ck = _checkpoint(checkpoint)
    console.print(f"model: {ck.describe()}")
    if batch_size is None:
        batch_size = int((ck.meta.get("train") or {}).get("batch_size") or 32)
    new = {}
    try:
        data = _checkpoint_data(ck, dataset, data_dir)
        for m in modes[mode]:
            new[m] = recal(ck.model, data.x_train, batch_size=batch_size, mode=m, seed=seed)
    except (DatasetUnavailable, ChecksumError, CorruptFileError, ValueError, FloatingPointError) as e:
        _fail(str(e))
    table = Table(title=f"validation on {data.name} ({len(data.y_val)} examples); statistics over "
                        f"{len(data.x_train)} training examples", title_justify="left")
    for col in ("BN statistics", "val loss", "val accuracy"):
        table.add_column(col)
    loss, acc = evaluate(ck.model, data.x_val, data.y_val)
    table.add_row("moving averages", f"{loss:.4f}", f"{acc:.4f}")
    for m, model in new.items():
        loss, acc = evaluate(model, data.x_val, data.y_val)
        label = f"precise, mode {m}" + (f" (batch {batch_size})" if m == "train" else "")
        table.add_row(label, f"{loss:.4f}", f"{acc:.4f}")
    # accuracies measured with the old statistics no longer describe these weights: drop them
    measured = {k for k in ck.meta if k.endswith(("_accuracy", "_loss"))}
    new_loss, new_acc = evaluate(new[written], data.x_val, data.y_val)
    save_checkpoint(out, new[written], preprocessing=ck.preprocessing,
                    meta={**{k: v for k, v in ck.meta.items() if k not in measured},
                          "val_accuracy": new_acc, "val_loss": new_loss,
                          "recalibrated": {"mode": written, "batch_size": batch_size, "seed": seed,
                                           "examples": len(data.x_train)}})
    console.print(table)
    console.print(f"wrote {out} (precise statistics, mode {written})")


@app.command("fold")
def fold_cmd(
    checkpoint: Path = typer.Argument(..., help="A checkpoint folder."),
    out: Path = typer.Option(..., help="Folder for the folded checkpoint."),
) -> None:
    """Fold every foldable BN into its neighbouring Linear/Conv and print the fold report
    (which BN went where, and why any stayed).

    Example: bnlab fold runs/one/checkpoint --out runs/one/folded
    """
    import torch

    from bnlab.checkpoint import save_checkpoint
    from bnlab.deploy import describe, fold
    from bnlab.models import build_model

    ck = _checkpoint(checkpoint)
    folded, rep = fold(ck.model)
    spec = ck.model.spec
    rebuilt = build_model(describe(folded, input_shape=spec.input_shape, num_classes=spec.num_classes))
    rebuilt.load_state_dict(folded.state_dict())
    rebuilt.eval()
    x = torch.randn(16, *spec.input_shape)
    with torch.no_grad():
        a, b = ck.model(x), rebuilt(x)
    err = float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))
    save_checkpoint(out, rebuilt, preprocessing=ck.preprocessing, meta={**ck.meta, "folded": rep.to_text()})
    console.print(rep.to_text())
    console.print(f"max relative output difference on random inputs: {err:.2e}; wrote {out}")


_MODEL_HELP = ("Which model of a run folder: best (the best-validation model, checkpoint/; the default, as Keras's "
               "save_best_only) or final (checkpoint-final/). With a checkpoint folder it must match that checkpoint.")


def _chosen_checkpoint(path: Path, which: str | None):
    """The checkpoint at ``path`` (a checkpoint folder, or a run folder and --model), or a clean exit."""
    from bnlab.checkpoint import CheckpointError, load_checkpoint

    try:
        return load_checkpoint(path, which=which)
    except CheckpointError as e:
        _fail(str(e))


@app.command("predict")
def predict_cmd(
    checkpoint: Path = typer.Argument(..., help="A checkpoint folder, or a run folder (then --model picks which)."),
    inputs: list[Path] = typer.Argument(..., help="PNG/JPEG images or .npy arrays (one sample or a batch)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    prescaled: bool = typer.Option(False, "--prescaled", help="Inputs are already scaled like the training data."),
    which: str = typer.Option(None, "--model", help=_MODEL_HELP),
) -> None:
    """Predict the class of images or arrays; single samples work (eval mode).

    Inputs are raw values as in the dataset files (pixels 0..255); the checkpoint's preprocessing
    (fitted on its training split) is applied unless --prescaled. Says which model it used (best or
    final, its epoch); with --json, each prediction's "model" and "epoch".

    Example: bnlab predict runs/one digit.png --model best --json
    """
    from bnlab.checkpoint import CheckpointError
    from bnlab.deploy import InputError
    from bnlab.deploy.predict import predict_files

    try:
        ck, results = predict_files(checkpoint, inputs, which=which, prescaled=prescaled)
    except (CheckpointError, InputError) as e:
        _fail(str(e))
    if as_json:
        print(json.dumps(results, indent=2))
        return
    console.print(f"model: {ck.describe()}")
    for r in results:
        top = sorted(range(len(r["probabilities"])), key=lambda k: -r["probabilities"][k])[:3]
        console.print(f"{r['input']}: class {r['class']} ({r['name']}), p = {r['probabilities'][r['class']]:.4f}; "
                      "top 3: " + ", ".join(f"{k}: {r['probabilities'][k]:.3f}" for k in top))


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="A checkpoint folder, or a run folder (then --model picks which)."),
    onnx: Path = typer.Option(..., "--onnx", help="Output .onnx file."),
    no_fold: bool = typer.Option(False, "--no-fold", help="Export without folding BN first."),
    which: str = typer.Option(None, "--model", help=_MODEL_HELP),
) -> None:
    """Export a checkpoint to ONNX (BN folded first), and check onnxruntime against PyTorch.

    Says which model it exported (best or final, its epoch) and records it in the ONNX file's
    metadata (bnlab.model, bnlab.epoch). Needs the optional extra: pip install 'bnlab\\[onnx]'.

    Example: bnlab export runs/one --model best --onnx model.onnx
    """
    import numpy as np
    import torch

    from bnlab.deploy import fold
    from bnlab.deploy.export import export_onnx, onnx_predict

    ck = _chosen_checkpoint(checkpoint, which)
    model = ck.model if no_fold else fold(ck.model)[0]
    shape = tuple(ck.model.spec.input_shape)
    try:
        export_onnx(model, shape, onnx, metadata={"bnlab.model": ck.kind, "bnlab.epoch": ck.meta.get("epoch"),
                                                  "bnlab.checkpoint": str(ck.path), "bnlab.folded": not no_fold})
    except ImportError as e:
        _fail(str(e))
    x = torch.randn(4, *shape)
    with torch.no_grad():
        ref = ck.model(x).numpy()
    got = onnx_predict(onnx, x.numpy())
    err = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))
    console.print(f"exported the {ck.describe()}")
    console.print(f"wrote {onnx}; onnxruntime vs PyTorch max relative difference {err:.2e}")


@app.command()
def serve(
    checkpoint: Path = typer.Argument(..., help="A checkpoint folder, or a run folder (then --model picks which)."),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000),
    max_body_bytes: int = typer.Option(4 * 1024 * 1024, "--max-body-bytes"),
    which: str = typer.Option(None, "--model", help=_MODEL_HELP),
) -> None:
    """Serve a checkpoint over REST: POST /predict, GET /health, GET /model, /docs.

    Says which model it serves (best or final, its epoch), at start and in every answer.
    Needs the optional extra: pip install 'bnlab\\[serve]'.

    Example: bnlab serve runs/one --model best --port 8000
    """
    try:
        import uvicorn

        from bnlab.deploy.serve import create_app
    except ImportError:
        _fail("serving needs the optional extra: pip install 'bnlab[serve]'")
    ck = _chosen_checkpoint(checkpoint, which)  # a clear error before the server starts
    console.print(f"serving the {ck.describe()}")
    uvicorn.run(create_app(checkpoint, which=which, max_body_bytes=max_body_bytes), host=host, port=port)

if __name__ == "__main__":
    app()
