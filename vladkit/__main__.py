"""``python -m vladkit``: the ``vladkit`` command (:mod:`vladkit.app.cli`)."""

import sys

from .app.cli import main

if __name__ == "__main__":
    sys.exit(main())
