"""``python -m hooocus_ws serve ...`` = ``hooocus serve ...``.

A launcher, not a library module: it hands the command line to the product CLI, so both spellings
share one parser, one settings build, one logging set-up and one exit-code mapping. Nothing imports
a ``__main__`` module, so this upward import cannot form a package cycle (the layering test allows
it in exactly this file).
"""

from __future__ import annotations

import sys

from hooocus.cli import main

if __name__ == "__main__":
    sys.exit(main())
