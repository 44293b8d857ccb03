"""The ``bnlab`` command line: parse, call the library, print. No logic lives here.

One module per family of commands; importing them registers their commands on ``app``.
"""

from bnlab.cli.app import app, console
# in the order of the help listing
from bnlab.cli import check, catalog, train, experiment, deploy, keras  # noqa: F401,I001  (registers the commands)
from bnlab.cli.check import check_tables
from bnlab.cli.deploy import _checkpoint_data

__all__ = ["app", "check_tables", "console"]

if __name__ == "__main__":
    app()
