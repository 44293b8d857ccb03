"""bnlab check: the BN maths verified on this machine, and timed."""

from __future__ import annotations

import json
from dataclasses import asdict

import typer
from rich.markup import escape
from rich.table import Table

from bnlab.cli.app import app, console


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
        console.print("native MLP step: " + (f"built, checked above ({escape(native_status['build_dir'])})"
                                             if native_status["available"] else
                                             f"[yellow]unavailable[/] ({escape(str(native_status['reason']))}); "
                                             "training uses the Python fused step"))
        if failed:
            console.print(f"[red]{len(failed)} of {len(rows)} checks failed:[/] "
                          + escape("; ".join(f"{r.group} {r.case} {r.quantity}" for r in failed)))
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
