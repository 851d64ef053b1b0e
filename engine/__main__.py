"""``python -m engine`` = the ``hooocus`` command."""

import sys

from engine.cli import main

sys.exit(main())
