"""``python -m hooocus`` = the ``hooocus`` command."""

import sys

from hooocus.cli import main

sys.exit(main())
