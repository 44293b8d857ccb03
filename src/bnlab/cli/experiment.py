"""Experiments: bnlab run, report, compare."""

from __future__ import annotations

import shlex
from pathlib import Path

import typer
from rich.table import Table

from bnlab.cli.app import _fail, app, console, describe_error, say, trust_factory_option, warn


def _stats_table(folder: Path) -> None:
    """The experiment's statistics in the terminal (bnlab run's closing table, bnlab compare)."""
    from rich.markup import escape

    from bnlab.experiments.read import load_results
    from bnlab.report.build import COMPACT_METRICS, texts
    from bnlab.report.figure1 import data_choice, trained_on

    spec, runs, _ = load_results(folder)
    t = texts(spec, runs, COMPACT_METRICS, compared=COMPACT_METRICS, short=True)
    if t.no_conclusions:  # report_mode: numbers only, the reason said once below the table
        console.print(f"[bold yellow]{escape(t.title)}[/]")
        for p in t.intro:
            console.print(escape(p))
    else:
        console.print(f"[bold]{escape(t.title)}[/]: {escape(t.budget)}")
    if (data := trained_on(spec, data_choice(folder))) is not None:
        console.print(escape(data), style="yellow")
    table = Table(title="mean ± 95% CI half-width over seeds (no ± with fewer than 3 runs); "
                        "times to target: Kaplan-Meier median [95% CI], unreached runs censored", title_justify="left")
    for h in t.header:
        table.add_column(escape(h), justify="left" if h == "variant" else "right")
    for r in t.rows:
        table.add_row(*(escape(c) for c in r))
    console.print(table)
    for s in t.precise_sentences:
        console.print(escape(s))
    if t.trends:
        console.print("trend of the error with the images per device (least squares on log2, all runs):")
        for method, error, n, xs, slope, p in t.trends:
            console.print(escape(f"  {method}, {error}: {slope}" + (f", p {p}" if p != "-" else "") + f" (n = {n})"))
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
    seeds: int = typer.Option(None, min=1, max=1000, help="Number of seeds per variant (overrides the spec)."),
    quick: bool = typer.Option(False, "--quick", help="The preset's quick scale (minutes; smoke tests, CI)."),
    out: Path = typer.Option(None, help="Experiment folder (default: runs/NAME or runs/NAME-quick)."),
    data_dir: str = typer.Option(None, "--data-dir", help="Folder with dataset files placed by hand."),
    workers: int = typer.Option(None, min=1, max=256, help="Worker processes (default: one per core)."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Run failed runs again."),
    stack: str = typer.Option("auto", "--stack", help="on: the runs of a variant that differ only in their seed "
                              "train as one stacked model where they can (the fused step's MLPs and CNNs, fp32 or "
                              "bf16-mixed, without per-run logs; "
                              "results stored run by run, resumable run by run); auto: on a "
                              "GPU only; off: every run alone."),
    backend: str = typer.Option("local", "--backend", help="local: worker processes on this machine; ray: each "
                                "run (or stacked group) a Ray task, the results and files sent back to this "
                                "process, which alone writes the folder (needs pip install 'bnlab\\[ray]')."),
    address: str = typer.Option(None, "--address", help="With --backend ray: auto or HOST:PORT joins a running "
                                "Ray cluster; without it, a local Ray instance sized to this machine is started."),
    trust_factory: bool = trust_factory_option(),
) -> None:
    """Run an experiment (variants x seeds) resumably into a folder, then print its statistics
    and write the HTML report.

    Interrupted (Ctrl-C, SIGTERM: exit 130 / 143)? Run the same command again: finished runs are
    skipped and interrupted ones continue from their last completed epoch. A finished experiment
    grows: more seeds (--seeds) or added variants in its spec run only the new runs.

    Example: bnlab run demo --quick   (on a Ray cluster: bnlab run demo --backend ray --address auto)
    """
    try:
        _check_backend(backend, address)  # before anything is loaded or written
        _run(experiment, seeds, quick, out, data_dir, workers, retry_failed, stack, backend, address, trust_factory)
    except KeyboardInterrupt:  # Ctrl-C while bnlab loads, before the experiment starts: nothing written yet
        console.print("interrupted before the experiment started; nothing was written", style="yellow")
        raise typer.Exit(code=130) from None


def _check_backend(backend: str, address: str | None) -> None:
    from bnlab.experiments.ray_backend import BackendError, check_backend, import_ray

    try:
        check_backend(backend, address)
        if backend == "ray":
            import_ray()
    except BackendError as e:
        _fail(str(e))


def _run(experiment: str, seeds: int | None, quick: bool, out: Path | None, data_dir: str | None,
         workers: int | None, retry_failed: bool, stack: str = "auto", backend: str = "local",
         address: str | None = None, trust_factory: bool = False) -> None:
    from rich.markup import escape
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from bnlab.data import ChecksumError, CorruptFileError, DatasetUnavailable
    from bnlab.experiments import ExperimentInterrupted, SpecError, StoreError, load_experiment, run_experiment
    from bnlab.signals import StopSignals, exit_code
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
        routine = message.endswith(" started") or " done: val_acc " in message  # what the bar shows
        if not console.is_terminal or not routine:
            bar.console.print(escape(f"[{p.skipped + p.done + p.failed}/{p.total}] {message} ({status})"),
                              soft_wrap=True)

    try:
        with bar:
            progress = run_experiment(spec, folder, quick=quick, workers=workers, data_dir=data_dir, seeds=seeds,
                                      retry_failed=retry_failed, on_progress=on_progress, stack=stack,
                                      backend=backend, address=address, trust_factory=trust_factory)
    except ExperimentInterrupted as e:
        for line in e.lines():
            console.print(escape(line), style="yellow", soft_wrap=True)
        same = ["bnlab", "run", experiment, "--out", str(folder)] + (["--quick"] if quick else []) + \
               (["--seeds", str(seeds)] if seeds is not None else []) + \
               (["--data-dir", data_dir] if data_dir is not None else []) + \
               (["--workers", str(workers)] if workers is not None else []) + \
               (["--retry-failed"] if retry_failed else []) + (["--stack", stack] if stack != "auto" else []) + \
               (["--backend", backend] if backend != "local" else []) + (["--address", address] if address else []) + \
               (["--trust-factory"] if trust_factory else [])
        console.print(escape(f"to resume, run the same command: {shlex.join(same)}"), soft_wrap=True)
        raise typer.Exit(code=exit_code(e.signal))
    except (SpecError, StoreError, DatasetUnavailable, ChecksumError, CorruptFileError, ValueError, OSError) as e:
        _fail(describe_error(e))
    with StopSignals() as stop:  # the runs are all saved: a signal now only stops the report
        try:
            _stats_table(folder)
            report = build_report(folder)
        except KeyboardInterrupt:
            console.print(escape(f"interrupted while writing the report; every run is saved in {folder}: "
                                 f"'bnlab report {folder}' writes it"), style="yellow", soft_wrap=True)
            raise typer.Exit(code=exit_code(stop.received))
    say(f"report: {report.html} (and {report.markdown.name})"
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
                  + ("; a smoke test (--quick) report: no verdicts" if r.smoke_test else ""), markup=False, emoji=False)
    for run_id, why in r.damaged:  # the report names them too; the terminal must not look clean
        warn(f"{run_id}: {why}")


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


@app.command()
def plan(folder: Path = typer.Argument(..., help="An experiment folder made by bnlab run (its seeds give the SD)."),
         difference: float = typer.Option(..., "--difference", "-d",
                                          help="The difference of the primary metric to detect, e.g. 0.01."),
         ) -> None:
    """How many seeds per variant a study needs to detect a difference of its primary metric with 80% power,
    from the seed-to-seed SD an experiment observed (Holm over its pairs; never fewer than an exact test needs).

    Example: bnlab plan runs/demo --difference 0.01
    """
    from bnlab.experiments import StoreError
    from bnlab.experiments.read import load_results
    from bnlab.experiments.stats import plan as plan_seeds

    try:
        spec, runs, _ = load_results(folder)
        lines = plan_seeds(runs, list(spec.variants), difference, spec.primary_metric)
    except (StoreError, ValueError) as e:
        _fail(str(e))
    for line in lines:
        console.print(line.sentence, markup=False, emoji=False)
