"""``python -m scratchopt``: the ``scratchopt`` command."""

from scratchopt.cli import main

main()
