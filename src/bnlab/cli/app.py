"""The Typer app, its console and the one error exit every command uses."""

from __future__ import annotations

import typer
from rich.console import Console

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


def _fail(message: str, code: int = 2) -> None:
    console.print(f"[red]error:[/] {message}")
    raise typer.Exit(code=code)
