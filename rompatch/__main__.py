"""``python -m rompatch``: the command line, as the ``rompatch`` script."""

from .cli.main import main

main()
