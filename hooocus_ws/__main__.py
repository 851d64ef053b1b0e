"""``python -m hooocus_ws serve ...``: the ``hooocus serve`` command without the rest of the CLI."""

from __future__ import annotations

import sys

from hooocus_ws.cli import main

if __name__ == "__main__":
    sys.exit(main())
