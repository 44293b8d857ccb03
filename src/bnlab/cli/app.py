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
    """The one error exit of every command: ``error: <message>``, the message printed verbatim (rich
    markup would delete bracketed text such as ``[data]`` or pydantic's ``[type=...]``), exit 2."""
    console.print("error:", style="red", end=" ")
    console.print(message, markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code=code)


def describe_error(e: BaseException) -> str:
    """An exception as the sentence a user reads: a file-system error as 'PATH: what went wrong'."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return str(e)
