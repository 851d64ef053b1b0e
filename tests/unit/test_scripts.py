"""scripts/test and scripts/serve on a fresh clone (issue 11): installs are constrained, an importable
torch 2.14.1 (with its torchvision) is kept, the slow step runs after a failed fast step, and a slow step that selects
nothing (pytest exit 5) does not fail the script. A stand-in .venv/bin/python records every call
instead of installing or testing anything, so this runs in well under a second per case."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.paths import REPO_ROOT

#: What scripts/test adds to the fast suite and the non-parity slow step by default (pytest-xdist: a process
#: per logical CPU, at most 4).
FAST_WORKERS = "-n logical --maxprocesses 4 --dist loadfile"

#: Stands in for .venv/bin/python: logs its arguments; `-c` (the torch probe) exits $TORCH_RC,
#: `-m pytest -m "not slow"` exits $FAST_RC, `-m pytest -m slow ...` exits $SLOW_RC (its parity half,
#: `-m pytest -m slow tests/parity`, $PARITY_RC when set), pip exits 0.
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
case "$1 $2" in
  "-c "*) exit "${TORCH_RC:-0}" ;;
  "-m pytest") if [ "$3 $4 $5" = "-m slow tests/parity" ]; then exit "${PARITY_RC:-${SLOW_RC:-0}}";
                elif [ "$3 $4" = "-m slow" ]; then exit "${SLOW_RC:-0}"; else exit "${FAST_RC:-0}"; fi ;;
esac
exit 0
"""


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    root = tmp_path / "hooocus"
    shutil.copytree(REPO_ROOT / "scripts", root / "scripts")
    shutil.copy(REPO_ROOT / "constraints.txt", root / "constraints.txt")
    venv_bin = root / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text(FAKE_PYTHON)
    (venv_bin / "python").chmod(0o755)
    (venv_bin / "hooocus").write_text("#!/usr/bin/env bash\necho \"serve $*\" >> \"$CALLS\"\n")
    (venv_bin / "hooocus").chmod(0o755)
    return root


def _run(clone: Path, script: str, *args: str, **env: str) -> tuple[int, list[str]]:
    calls = clone / "calls.log"
    # Only what the scripts need on PATH: no apt-get, so the Chromium step never runs from a test.
    tools = clone / "tools"
    if not tools.is_dir():
        tools.mkdir()
        for name in ("bash", "dirname", "id"):
            (tools / name).symlink_to(shutil.which(name))
    base = {"PATH": str(tools), "CALLS": str(calls), "HOME": str(clone)}
    result = subprocess.run([str(tools / "bash"), str(clone / "scripts" / script), *args], env={**base, **env},
                            capture_output=True, text=True, timeout=60)
    return result.returncode, calls.read_text().splitlines() if calls.exists() else []


def test_installs_with_constraints_and_keeps_an_importable_torch(clone: Path) -> None:
    code, calls = _run(clone, "test", TORCH_RC="0")
    assert code == 0
    pip = [c for c in calls if c.startswith("-m pip install")]
    assert pip == ["-m pip install -q --disable-pip-version-check -c constraints.txt -e .[dev]"]
    code, calls = _run(clone, "serve", TORCH_RC="1")  # no torch 2.14.1 yet: installed first, with its torchvision
    pip = [c for c in calls if c.startswith("-m pip install")][-2:]
    assert pip == ["-m pip install -q --disable-pip-version-check -c constraints.txt torch==2.14.1 torchvision==0.29.1",
                   "-m pip install -q --disable-pip-version-check -c constraints.txt -e ."]
    assert calls[-1] == "serve serve" and code == 0


@pytest.mark.parametrize(("fast", "slow", "expected"), [("0", "5", 0), ("0", "1", 1), ("1", "0", 1), ("1", "5", 1)])
def test_slow_step_always_runs_and_exit_5_is_not_a_failure(clone: Path, fast: str, slow: str, expected: int) -> None:
    code, calls = _run(clone, "test", FAST_RC=fast, SLOW_RC=slow)
    runs = [c for c in calls if c.startswith("-m pytest")]
    # The slow step's parity module runs in a process of its own (fresh memory for the full-size runs).
    # The fast suite runs in one process per logical CPU, at most 4 (pytest-xdist).
    assert runs == [f"-m pytest -m not slow {FAST_WORKERS}", f"-m pytest -m slow {FAST_WORKERS} --ignore=tests/parity",
                    "-m pytest -m slow tests/parity"]
    assert code == expected


@pytest.mark.parametrize(("parity", "expected"), [("0", 0), ("1", 1), ("5", 0)])
def test_a_failing_parity_half_fails_the_script(clone: Path, parity: str, expected: int) -> None:
    code, _calls = _run(clone, "test", SLOW_RC="0", PARITY_RC=parity)
    assert code == expected


def test_arguments_keep_the_slow_step_in_one_process(clone: Path) -> None:
    _code, calls = _run(clone, "test", "-k", "parity")
    assert [c for c in calls if c.startswith("-m pytest")] == [f"-m pytest -m not slow {FAST_WORKERS} -k parity",
                                                                "-m pytest -m slow -k parity"]


def test_the_number_of_fast_test_processes_can_be_chosen(clone: Path) -> None:
    _code, calls = _run(clone, "test", HOOOCUS_TEST_WORKERS="0")
    assert [c for c in calls if c.startswith("-m pytest")][0] == (
        "-m pytest -m not slow -n 0 --maxprocesses 4 --dist loadfile")


def test_scripts_name_no_machine_specific_setup() -> None:
    text = "\n".join((REPO_ROOT / "scripts" / name).read_text() for name in ("test", "serve", "_install.sh"))
    assert "this machine" not in text and "PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
