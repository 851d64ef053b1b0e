"""``python -m hooocus_mcp [--model demo | --connect URL]`` = ``hooocus mcp ...`` (a launcher for agent hosts)."""

import sys

from hooocus_mcp.cli import main

sys.exit(main())
