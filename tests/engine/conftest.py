"""Fixtures the engine tests share: the demo-model runner (test_image_tasks_demo.py, test_inpaint_demo.py) and
the isolated environment the CLI test modules run in (test_cli*.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.paths import TEST_DATA_VARIABLES


@pytest.fixture
def isolated_cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No HOOOCUS_* from the caller's shell (the test-data folders excepted), no ./hooocus.toml from the
    working directory, a HOME of the test's own. CLI modules use it with ``pytest.mark.usefixtures``."""
    for name in [n for n in os.environ if n.startswith("HOOOCUS_") and n not in TEST_DATA_VARIABLES]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """The built-in demo model on the CPU with a fresh data folder; one per test module because
    building it costs seconds. Imported lazily so that collecting tests/engine stays cheap."""
    from engine.core.settings import load_settings
    from engine.sdxl.pipeline import SDXLRunner

    settings, _ = load_settings(cli={"data_dir": tmp_path_factory.mktemp("data"), "device": "cpu"}, env={})
    yield SDXLRunner(settings, model="demo")
