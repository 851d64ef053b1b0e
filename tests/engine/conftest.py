"""Fixtures the demo-model engine tests share (test_image_tasks_demo.py, test_inpaint_demo.py)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """The built-in demo model on the CPU with a fresh data folder; one per test module because
    building it costs seconds. Imported lazily so that collecting tests/engine stays cheap."""
    from engine.core.settings import load_settings
    from engine.sdxl.pipeline import SDXLRunner

    settings, _ = load_settings(cli={"data_dir": tmp_path_factory.mktemp("data"), "device": "cpu"}, env={})
    yield SDXLRunner(settings, model="demo")
