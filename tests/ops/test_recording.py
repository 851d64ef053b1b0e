"""Issue 13.4: the runtime owns the job history and the output files, so ``hooocus serve``,
``hooocus mcp`` (stdio, embedded) and ``hooocus generate`` (local) record jobs and images the same way:
a ``history.sqlite3`` row with the resolved parameters and one written image file per image (in the
output folder, once), plus the image store's copy by content hash in ``<data_dir>/images``.

Each test runs the real command on the demo model (tiny random SDXL built from config; 64x64, 2-4 steps).
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from engine.core.history import HISTORY_FILE_NAME, JobHistory
from engine.core.runtime import IMAGE_STORE_DIR_NAME, create_runtime
from engine.core.settings import Settings
from engine.core.testing import FakeRunner

# At collection, not inside a test: the SDK's stdio client binds sys.stderr when first imported, and
# under capsys (the generate test) that stream has no file descriptor to hand the child process.
from hooocus_mcp._sdk import Client, StdioServerParameters
from tests.paths import REPO_ROOT

PROMPT = "a lighthouse at dusk"
TINY = {"width": 64, "height": 64, "steps": 2, "seed": 5}
TOKEN = "recording-token-0123456789abcdef"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def data_dir(tmp_path: Path, fooocus_data: Path) -> Path:
    """A data folder with Fooocus's styles and no models (the demo model needs none)."""
    folder = tmp_path / "data"
    shutil.copytree(fooocus_data / "sdxl_styles", folder / "sdxl_styles")
    return folder


def recorded_jobs(data_dir: Path) -> list[dict]:
    assert (data_dir / HISTORY_FILE_NAME).is_file(), "no job history in the data folder"
    with JobHistory(data_dir / HISTORY_FILE_NAME) as history:
        return history.list_jobs()


def assert_recorded_once(data_dir: Path, owner: str) -> Path:
    """One done job of ``owner``, its image written once under outputs/ and kept by hash; the path."""
    jobs = recorded_jobs(data_dir)
    assert [(job["owner"], job["state"]) for job in jobs] == [(owner, "done")]
    assert jobs[0]["params"]["prompt"] == PROMPT and jobs[0]["seeds"] == [str(TINY["seed"])]
    [image] = jobs[0]["images"]
    path = Path(image["path"])
    assert path.is_file() and path.is_relative_to(data_dir / "outputs")
    assert hashlib.sha256(path.read_bytes()).hexdigest() == image["sha256"]
    written = [p for p in (data_dir / "outputs").rglob("*") if p.is_file()]
    assert written == [path], "each image is written once"
    assert (data_dir / IMAGE_STORE_DIR_NAME / f"{image['sha256']}.png").is_file()
    return path


def test_generate_records_the_job_and_writes_the_image_once(data_dir: Path, capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from hooocus.cli import main

    monkeypatch.chdir(data_dir)  # no stray hooocus.toml
    code = main(["generate", PROMPT, "--model", "demo", "--no-progress", "--data-dir", str(data_dir),
                 *(f"--{k}={v}" for k, v in TINY.items())])
    out = capsys.readouterr().out
    assert code == 0
    path = assert_recorded_once(data_dir, "cli")
    assert out.split() == [str(path)]  # it prints the file the history wrote


def test_serve_records_the_job_and_writes_the_image_once(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.core.settings import settings_from_args
    from hooocus.cli import build_parser
    from hooocus_ws.cli import prepare_server

    monkeypatch.chdir(data_dir)
    args = build_parser().parse_args(["serve", "--model", "demo", "--port", "0", "--data-dir", str(data_dir)])
    settings, _ = settings_from_args(args, env={"HOOOCUS_TOKENS": f"alice {TOKEN} generate"})
    prepared = prepare_server(args, settings)
    assert prepared.runtime.history is prepared.history is not None  # the runtime's, not a second one
    with TestClient(prepared.config.app, base_url="http://127.0.0.1") as client:  # an allowed Host
        response = client.post("/v1/generate", headers={"Authorization": f"Bearer {TOKEN}"},
                               json={"prompt": PROMPT, **TINY})
        assert response.status_code == 200, response.text
    assert_recorded_once(data_dir, "alice")


@pytest.mark.anyio
async def test_mcp_stdio_records_the_job_and_writes_the_image_once(data_dir: Path) -> None:
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    params = StdioServerParameters(command=sys.executable, cwd=str(data_dir), env=env,
                                   args=["-m", "hooocus", "mcp", "--model", "demo", "--data-dir", str(data_dir)])
    async with Client(params) as client:
        # The tool takes no step count: Lightning is the fewest steps it offers (4).
        arguments = {"prompt": PROMPT, "width": 64, "height": 64, "seed": TINY["seed"], "performance": "Lightning"}
        result = await client.call_tool("generate_image", arguments, read_timeout_seconds=300)
        assert result.structured_content["status"] == "completed", result.content[0]
    assert_recorded_once(data_dir, "stdio")


def test_record_history_false_writes_nothing(tmp_path: Path) -> None:
    """Tests and benchmarks: everything in memory, no file in the data folder."""
    runtime = create_runtime(Settings(data_dir=tmp_path / "data"), runner=FakeRunner(), record_history=False).start()
    try:
        job = runtime.engine.submit({"prompt": PROMPT}, owner="bench")
        assert job.wait(10) and len(runtime.images) == 1
    finally:
        runtime.close()
    assert runtime.history is None and runtime.images.folder is None
    assert not (tmp_path / "data").exists()


def test_the_runtime_closes_its_history_after_the_last_events(tmp_path: Path) -> None:
    """close() stops the engine first, so a queued job's shutdown cancel is still recorded."""
    runtime = create_runtime(Settings(data_dir=tmp_path), runner=FakeRunner())  # never started: stays queued
    job = runtime.engine.submit({"prompt": PROMPT}, owner="alice")
    runtime.close()
    assert runtime.history is not None
    with pytest.raises(Exception, match="closed"):
        runtime.history.list_jobs()
    [row] = recorded_jobs(tmp_path)
    assert row["job_id"] == job.job_id and row["state"] == "cancelled"
    assert row["error"]["reason"] == "shutting_down"
