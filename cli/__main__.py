"""``python -m cli``: the same as the ``wattserve`` console script."""

from wattserve.cli.main import main

main()
