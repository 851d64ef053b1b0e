"""Runtime.close runs the backend's undo once, though a server closes its runtime twice (the
drain on SIGTERM, then the app's lifespan): a second Ray undeploy after disconnecting would have
started a new local Ray just to delete from it (seen with ``hooocus serve --backend ray``)."""

from __future__ import annotations

from pathlib import Path

from engine.core.jobs import Engine
from engine.core.runtime import Runtime
from engine.core.settings import Settings
from engine.core.store import ImageStore
from engine.core.testing import FakeRunner


def test_on_close_runs_once_however_often_the_runtime_is_closed(tmp_path: Path) -> None:
    calls: list[str] = []
    runtime = Runtime(settings=Settings(data_dir=tmp_path), engine=Engine(FakeRunner()), images=ImageStore(),
                      on_close=lambda: calls.append("undeploy")).start()
    runtime.close()
    runtime.close()
    assert calls == ["undeploy"]
