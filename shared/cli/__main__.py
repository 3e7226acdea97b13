"""``python -m distill.shared.cli``: the same as the ``distill`` console script."""

from distill.shared.cli.main import main

main()
