"""Where the test data lives. The fast suite's data is in the repository (tests/data/, see its
README); each folder can be pointed elsewhere with an environment variable, and another folder
with the same layout and other cases must work unchanged. Only the large end-to-end parity runs
stay outside ($HOOOCUS_PARITY, default ../shared/parity); tests that need them skip without them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TEST_DATA_DIR = REPO_ROOT / "tests" / "data"
#: Where the reference data lives; tests that isolate themselves from HOOOCUS_* settings keep these.
TEST_DATA_VARIABLES = frozenset({"HOOOCUS_REFDATA", "HOOOCUS_FOOOCUS_DATA", "HOOOCUS_SDXL_CONFIGS",
                                 "HOOOCUS_PARITY", "HOOOCUS_PARITY_CHECKPOINT", "HOOOCUS_PARITY_SETS",
                                 "HOOOCUS_PARITY_MAX_SIDE_PX"})

#: Where the parity runs come from, for the one-line skip reason.
PARITY_SOURCE = ("the end-to-end Fooocus parity runs (about 30 MB per run, kept outside the repository; "
                 "see README.md, 'Parity runs')")
#: Stand-in for Fooocus's positive.txt (CC BY-NC 4.0, never in this repository): tests of the
#: expansion mechanics need some allowed words, not Fooocus's; these are made up for the tests
#: (each is one GPT-2 token with its leading space, as an allowed word must be).
STAND_IN_POSITIVE_WORDS = ("vivid", "elegant", "dramatic", "detailed", "cinematic", "gentle", "radiant", "glowing",
                           "golden", "quiet", "ancient", "bright", "soft", "warm", "cold", "sharp", "calm", "wild",
                           "rich", "deep", "intricate")


def _from_env(variable: str, default: Path) -> Path:
    value = os.environ.get(variable)
    return Path(value) if value else default


def refdata_dir() -> Path:
    """The golden data folder: $HOOOCUS_REFDATA, default tests/data/refdata."""
    return _from_env("HOOOCUS_REFDATA", TEST_DATA_DIR / "refdata")


def fooocus_data_dir() -> Path:
    """Fooocus's styles, wildcards, presets and the CLIP/GPT-2 tokenizers: $HOOOCUS_FOOOCUS_DATA,
    default tests/data/fooocus-data."""
    return _from_env("HOOOCUS_FOOOCUS_DATA", TEST_DATA_DIR / "fooocus-data")


def sdxl_configs_dir() -> Path:
    """The SDXL Hugging Face configs: $HOOOCUS_SDXL_CONFIGS, default tests/data/sdxl-configs."""
    return _from_env("HOOOCUS_SDXL_CONFIGS", TEST_DATA_DIR / "sdxl-configs")


def sdxl_base_keys_file() -> Path:
    """The 2,514 (key, shape, dtype) rows of an SDXL base checkpoint (tests/data/README.md)."""
    return TEST_DATA_DIR / "sdxl_base_keys.json"


def parity_dir() -> Path:
    """The end-to-end parity folder: $HOOOCUS_PARITY, default ../shared/parity (outside the repo)."""
    return _from_env("HOOOCUS_PARITY", REPO_ROOT.parent / "shared" / "parity")


def parity_skip_reason() -> str | None:
    """Why the parity tests skip, or None when they run.

    Only the default location may be absent: a $HOOOCUS_PARITY that names a missing folder is a
    mistake and fails the tests that read it (they assert their runs are present).
    """
    if os.environ.get("HOOOCUS_PARITY") or parity_dir().is_dir():
        return None
    return f"no parity runs: {parity_dir()} is absent; set HOOOCUS_PARITY to {PARITY_SOURCE}"


def parity_runs_where(kind: str, wanted: Callable[[Path], bool]) -> list[Any]:
    """pytest params: every recorded parity run (runs/ and runs-extra/) for which ``wanted(folder)``
    holds, found at collection time, so another folder with other runs works unchanged; one skip
    with the reason when the parity folder, or any run of that ``kind``, is absent."""
    reason = parity_skip_reason()
    if reason is None:
        folders = [p.parent for sub in ("runs", "runs-extra") for p in sorted((parity_dir() / sub).glob("*/params.json"))]
        found = [pytest.param(folder, id=folder.name) for folder in folders if wanted(folder)]
        if found:
            return found
        reason = f"no {kind} run among the parity runs in {parity_dir()}"
    return [pytest.param(None, id=f"no-{kind}-run", marks=pytest.mark.skip(reason=reason))]


def shared_dir() -> Path:
    """The ``../shared`` folder a developer checkout (and CI) may have beside the repository."""
    return REPO_ROOT.parent / "shared"


def positive_words_file() -> Path | None:
    """Fooocus's own positive.txt, from outside the repository: $HOOOCUS_FOOOCUS_DATA's folder, else
    a ``../shared/fooocus-data`` beside the checkout (CI has one); None on a clean clone."""
    for folder in (fooocus_data_dir(), shared_dir() / "fooocus-data"):
        path = folder / "prompt_expansion" / "positive.txt"
        if path.is_file():
            return path
    return None


def external_refdata_file(relative: str) -> Path | None:
    """The complete (not trimmed) copy of a refdata file, for the parts the in-repo copy leaves out
    for licence reasons (the allowed-token list derived from positive.txt): ``../shared/refdata``
    when present, else None."""
    path = shared_dir() / "refdata" / relative
    return path if path.is_file() else None


def require_positive_words_file() -> Path:
    """positive.txt for tests that compare with Fooocus's real word list; skip with one reason without it."""
    path = positive_words_file()
    if path is None:
        pytest.skip("needs Fooocus's positive.txt (CC BY-NC 4.0, never in this repository): set "
                    "HOOOCUS_FOOOCUS_DATA to a folder with prompt_expansion/positive.txt (or have ../shared beside the checkout)")
    return path
