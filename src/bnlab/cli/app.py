"""The Typer app, its consoles and the one error exit every command uses."""

from __future__ import annotations

from pathlib import Path

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
# errors go to stderr, as typer's own usage errors do: stdout stays the command's output (--json stays JSON)
error_console = Console(stderr=True)


TRUST_FACTORY_HELP = ("Allow a model spec or checkpoint that names a factory (a Python function: code) to import and "
                      "run it. Without it such a model is refused, since a spec or checkpoint is data anyone can "
                      "write; give it only for files whose origin you trust.")


def trust_factory_option() -> bool:
    """The --trust-factory option of every command that builds a model from a spec or checkpoint."""
    return typer.Option(False, "--trust-factory", help=TRUST_FACTORY_HELP)


def _version(value: bool) -> None:
    if value:
        console.print(f"bnlab {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """bnlab: a laboratory for batch normalization."""


def say(text: str, style: str | None = None) -> None:
    """Print library or user text (paths, messages, notes, descriptions) verbatim: no rich markup, which
    would delete bracketed text such as ``[data]``, and no emoji codes (``:x:`` in a path)."""
    console.print(text, style=style, markup=False, emoji=False, highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    """``warning: <message>`` on stderr (stdout stays the command's output), verbatim."""
    error_console.print("warning:", style="yellow", end=" ")
    error_console.print(message, markup=False, emoji=False, highlight=False, soft_wrap=True)


def _fail(message: str, code: int = 2) -> None:
    """The one error exit of every command: ``error: <message>`` on stderr, the message printed verbatim
    (rich markup would delete bracketed text such as ``[data]`` or pydantic's ``[type=...]``), exit 2."""
    error_console.print("error:", style="red", end=" ")
    error_console.print(message, markup=False, emoji=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code=code)


def describe_error(e: BaseException) -> str:
    """An exception as the sentence a user reads: a file-system error as 'PATH: what went wrong'."""
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    if isinstance(e, MemoryError) or out_of_memory(e):
        return f"out of memory: the input asks for more than this machine has ({e})"
    if isinstance(e, RecursionError):
        return f"the input is nested too deeply ({e})"
    return str(e)


def out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is a failed allocation: torch's CPU allocator reports one as a RuntimeError."""
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and (
        "can't allocate memory" in str(e) or "out of memory" in str(e).lower()))


def fail_if_out_of_memory(e: RuntimeError, what) -> None:
    """A RuntimeError from torch's allocator (a model larger than this machine's memory) as the one error exit,
    ``what`` named; any other RuntimeError is a bug and is raised on."""
    if not out_of_memory(e):
        raise e
    _fail(f"{what}: the model does not fit in memory ({e})")


def _blocking_file(path: Path) -> Path | None:
    """The existing file among ``path``'s parents that stops it from being created, if any."""
    for parent in path.absolute().parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def check_out_folder(path: Path | None, option: str = "--out", what: str = "the output") -> None:
    """Refuse, before any work, an output folder that cannot be one: an existing file, or a path under a file."""
    if path is None:
        return
    if path.exists() and not path.is_dir():
        _fail(f"{option} {path}: expected a folder for {what}, but it is a file")
    if (blocker := _blocking_file(path)) is not None:
        _fail(f"{option} {path}: cannot create a folder there: {blocker} is a file, not a folder")


def check_out_file(path: Path, option: str, what: str) -> None:
    """Refuse, before any work, an output file path that cannot be one: a folder, or a path under a file."""
    if path.is_dir():
        _fail(f"{option} {path}: expected a file name for {what}, but it is a folder")
    if (blocker := _blocking_file(path)) is not None:
        _fail(f"{option} {path}: cannot create a file there: {blocker} is a file, not a folder")
