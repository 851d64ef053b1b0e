"""Where the shared reference data lives. Golden tests read their folders from the environment."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Where the reference data lives; tests that isolate themselves from HOOOCUS_* settings keep these.
TEST_DATA_VARIABLES = frozenset({"HOOOCUS_SHARED", "HOOOCUS_REFDATA", "HOOOCUS_PARITY", "HOOOCUS_PARITY_CHECKPOINT"})


def shared_dir() -> Path:
    return Path(os.environ.get("HOOOCUS_SHARED", REPO_ROOT.parent / "shared"))


def refdata_dir() -> Path:
    """The golden data folder: $HOOOCUS_REFDATA, default ../shared/refdata."""
    return Path(os.environ.get("HOOOCUS_REFDATA", shared_dir() / "refdata"))


def parity_dir() -> Path:
    """The end-to-end parity folder: $HOOOCUS_PARITY, default ../shared/parity."""
    return Path(os.environ.get("HOOOCUS_PARITY", shared_dir() / "parity"))


def fooocus_data_dir() -> Path:
    return shared_dir() / "fooocus-data"
