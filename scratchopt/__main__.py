"""``python -m scratchopt``: the ``scratchopt`` command."""

from scratchopt.tools.cli import main

main()
