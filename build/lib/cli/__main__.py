"""``python -m cli``: the same as the ``wattserve`` console script."""

from cli.main import main

main()
