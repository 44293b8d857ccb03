"""bnlab train: one model on one dataset."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from bnlab.cli.app import (_fail, app, check_out_folder, console, describe_error, out_of_memory, say,
                           trust_factory_option, warn)


@app.command()
def train(
    model: str = typer.Argument(..., help="A model preset name or a .toml/.json spec file."),
    dataset: str = typer.Option(None, help="Dataset name (see bnlab datasets); default: the preset's."),
    data_dir: str = typer.Option(None, "--data-dir", help="Folder with dataset files placed by hand."),
    epochs: int = typer.Option(None, help="Epochs (default: the preset's recipe, else 10)."),
    batch_size: int = typer.Option(None, "--batch-size"),
    lr: float = typer.Option(None, help="Learning rate."),
    lr_schedule: str = typer.Option(None, "--lr-schedule", help="constant (default) | cosine (to 0 over the run's "
                                    "updates) | step (x0.1 at half the updates, x0.01 at three quarters)."),
    optimizer: str = typer.Option(None, help="sgd | rmsprop | adam."),
    momentum: float = typer.Option(None),
    nesterov: bool = typer.Option(None, "--nesterov/--no-nesterov"),
    seed: int = typer.Option(0),
    validation: str = typer.Option(None, help="Validation: a count of images (an integer: the first N) or a "
                                   "fraction (a number strictly between 0 and 1); 1.0 is refused as ambiguous."),
    target: float = typer.Option(None, "--target", help="Target validation accuracy for time-to-target."),
    patience: int = typer.Option(None, help="Early stopping patience in epochs."),
    max_steps: int = typer.Option(None, "--max-steps"),
    engine: str = typer.Option("auto", help="auto | native (C++ MLP step) | fused (Python MLP step) | autograd."),
    device: str = typer.Option("auto", help="auto | cpu | cuda."),
    precision: str = typer.Option("fp32", help="fp32 (exact, default) | bf16-mixed (bfloat16 matrix products "
                                  "and convolutions; statistics, weights and optimizer state float32) | "
                                  "fp16-mixed (CUDA only, loss scaling)."),
    devices: int = typer.Option(None, "--devices", help="Data-parallel training over N processes "
                                "(DistributedDataParallel: gloo on CPU, nccl on CUDA; the batch is split among them; "
                                "norm 'syncbatch' normalises with the global batch's statistics)."),
    out: Path = typer.Option(None, help="Folder for run.json, history.json, checkpoint/ (the best-validation "
                             "model) and checkpoint-final/ (the final model); an interrupted run continues "
                             "from its last completed epoch when the same command is run again."),
    restart: bool = typer.Option(False, "--restart", help="Start from zero even if --out holds a run (of other "
                                 "settings, or an interrupted one), discarding it."),
    tensorboard: Path = typer.Option(None, "--tensorboard", help="Write TensorBoard logs here (scalars per step "
                                     "and epoch, BN running-statistics histograms; view: tensorboard --logdir DIR)."),
    trust_factory: bool = trust_factory_option(),
) -> None:
    """Train one model on one dataset and print the per-epoch metrics and the test result.

    Settings come from the model preset's recipe (the seed notebook's), overridden by options.

    Example: bnlab train fashion-mlp-bn-before --dataset mnist-5k --epochs 3 --out runs/one --tensorboard runs/tb

    Interrupted (Ctrl-C, kill), the same command continues from the last completed epoch with the
    results an uninterrupted run gives; a folder holding a run of other settings is refused.
    """
    from pydantic import ValidationError

    from bnlab.data import ChecksumError, CorruptFileError, DatasetUnavailable
    from bnlab.models import load_model_spec
    from bnlab.train.config import TrainConfig, budget_note, recipe_for
    from bnlab.signals import StopSignals, exit_code
    from bnlab.train.resume import RunInterrupted, SettingsChanged, discard_state
    from bnlab.train.single import train_run

    given = {"dataset": dataset, "data_dir": data_dir, "epochs": epochs, "batch_size": batch_size, "lr": lr,
             "optimizer": optimizer, "lr_schedule": lr_schedule, "momentum": momentum, "nesterov": nesterov, "seed": seed,
             "target_accuracy": target, "patience": patience, "max_steps": max_steps, "engine": engine,
             "device": device, "precision": precision, "devices": devices}
    if validation is not None:
        given["validation"] = _number(validation)  # "1" a count, "0.2" (and "1.0", refused) a fraction
    check_out_folder(out, "--out", "the run")
    check_out_folder(tensorboard, "--tensorboard", "the TensorBoard logs")
    stop = StopSignals()
    try:
        try:
            spec = load_model_spec(model)
        except ValidationError as e:  # the spec file's keys, not the command's options
            from bnlab.experiments.spec import format_errors
            raise ValueError(f"{model}: not a valid model spec:\n{format_errors(e)}") from None
        settings = recipe_for(model)
        if dataset is not None and dataset != settings.get("dataset"):
            settings.pop("validation", None)  # the recipe's split fits its own dataset only
        settings.update({k: v for k, v in given.items() if v is not None})
        config = TrainConfig(**settings)
        with stop:  # SIGTERM (kill, timeout, docker) stops the run as Ctrl-C does
            result = train_run(spec, config, out=out, restart=restart, tensorboard=tensorboard,
                               trust_factory=trust_factory)
    except RunInterrupted as e:
        say(_how_to_resume(out, e.epoch))
        raise typer.Exit(code=exit_code(stop.received))
    except KeyboardInterrupt:  # before training started: nothing was written
        console.print("interrupted before training started; nothing was written", style="yellow")
        raise typer.Exit(code=exit_code(stop.received)) from None
    except SettingsChanged as e:
        _fail(f"{e}: choose another --out, or add --restart to discard that run and start from zero")
    except ValidationError as e:
        _fail("the training settings are not valid:\n" + _option_errors(e))
    except (DatasetUnavailable, ChecksumError, CorruptFileError, ValueError, OSError, MemoryError,
            RecursionError) as e:
        _fail(describe_error(e))
    except RuntimeError as e:  # torch's allocator: a model larger than this machine's memory
        from bnlab.train.distributed import RankFailed
        if isinstance(e, RankFailed):
            _fail(f"data-parallel training failed: {e}")
        if not out_of_memory(e):
            raise
        _fail(describe_error(e))
    if out is not None:  # history.json now records the run: its resumable state has done its job
        discard_state(out)
    for note in result.notes:
        say(f"note: {note}")
    h = result.history
    if h.stopped == "completed" and h.epochs:  # both budgets set: say which one bound
        first = h.epochs[0]
        per_epoch = first.steps // first.epoch if first.epoch else 0  # a resumed run's epoch 1 counts from 0 too
        note = budget_note(config.epochs, config.max_steps, per_epoch)
        if note:
            warn(note)
    table = Table(title=escape(f"{model} on {config.dataset} ({h.engine} engine, {h.precision}"
                               f"{f', {h.devices} processes' if h.devices > 1 else ''})"), title_justify="left")
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
    say(f"stopped: {h.stopped}{' (' + h.message + ')' if h.message else ''}; test set: "
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
        say(f"results in {out}/: run.json, history.json" + "".join(", " + s for s in saved))
    if h.stopped == "diverged":
        raise typer.Exit(code=3)


def _number(text: str) -> int | float | str:
    """An option's text as the int or float it spells (else as it is: TrainConfig says what it expected)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _how_to_resume(out: Path | None, epoch: int) -> str:
    from bnlab.train.resume import STATE_DIR, saved_progress

    if out is None:
        return "interrupted: nothing was saved (a run resumes only with --out); nothing was recorded"
    if epoch == 0:
        return (f"interrupted before the first epoch ended: nothing to resume and no result recorded in {out}; "
                "run the same command again to start over")
    if (saved_progress(out) or (0, False))[1]:
        return (f"interrupted during the evaluation after training: no result recorded; the trained state (epoch "
                f"{epoch}) is saved in {out / STATE_DIR}; run the same command again to redo only the evaluation "
                "(or add --restart to start from zero)")
    return (f"interrupted: no result recorded; the state after epoch {epoch} is saved in {out / STATE_DIR}; "
            f"run the same command again to continue from epoch {epoch} (or add --restart to start from zero)")


# TrainConfig's fields as the options that set them, so an error names what the user typed
_OPTIONS = {"target_accuracy": "--target", "batch_size": "--batch-size", "max_steps": "--max-steps",
            "data_dir": "--data-dir", "dataset_options": "--dataset"}


def _option_errors(e) -> str:
    """One line per invalid setting, named by its option (a setting from the preset's recipe or a spec
    file keeps its own name)."""
    from bnlab.experiments.spec import format_errors

    lines = []
    for line in format_errors(e).splitlines():
        key, _, rest = line.strip().partition(": ")
        field = key.split(".")[0]
        lines.append(f"  {_OPTIONS.get(field, '--' + field.replace('_', '-'))}{key[len(field):]}: {rest}")
    return "\n".join(lines)
