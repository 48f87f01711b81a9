"""``python -m covidxr`` (and ``torchrun -m covidxr``) runs the command line."""

from covidxr.cli import main

main()
