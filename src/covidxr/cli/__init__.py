"""``covidxr`` command line: a thin layer over the Python API, above both floors (runtime and lab).
Errors print as one line, exit code 1."""

from __future__ import annotations

import logging
import sys

from covidxr.cli import lab, run  # noqa: F401  (their commands register on the group)
from covidxr.cli.lab import train_command
from covidxr.cli.options import _config_type, cli

__all__ = ["_config_type", "cli", "main", "train_command"]


def main() -> None:
    """The ``covidxr`` command: library warnings (``logging.getLogger("covidxr")``) print as one line each."""
    progress = logging.StreamHandler(sys.stdout)  # what a command reports as it goes (as print did)
    progress.addFilter(lambda record: record.levelno < logging.WARNING)
    progress.setFormatter(logging.Formatter("%(message)s"))
    warnings = logging.StreamHandler(sys.stderr)
    warnings.setLevel(logging.WARNING)
    warnings.setFormatter(logging.Formatter("covidxr: %(message)s"))
    library = logging.getLogger("covidxr")
    library.handlers[:] = [progress, warnings]
    library.setLevel(logging.INFO)
    library.propagate = False
    cli()


if __name__ == "__main__":
    main()
