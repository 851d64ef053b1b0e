"""``python -m hooocus_mcp [--model demo | --connect URL]`` = ``hooocus mcp ...`` (a launcher for agent hosts).

A launcher, not a library module: it hands the command line to the product CLI, so both spellings
share one parser, one settings build, one logging set-up (to stderr) and one exit-code mapping.
Nothing imports a ``__main__`` module, so this upward import cannot form a package cycle (the
layering test allows it in exactly this file).
"""

import sys

from hooocus.cli import main

sys.exit(main(["mcp", *sys.argv[1:]]))
