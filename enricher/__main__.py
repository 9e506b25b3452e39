"""``python -m enricher``: the same as the ``enricher`` console script."""

from .cli import main

main()
