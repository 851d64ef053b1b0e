"""Both model families in one server (issue 17, engine/core/families.py): a server started on one
family runs jobs of the other, with the same bytes a single-family runner makes, frees the idle
family's weights first, lists both families' models, never batches across families, and keeps the
Flux refusals of SDXL-only fields."""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from engine.core.errors import UnsupportedForModel
from engine.core.families import FamilyRunner
from engine.core.jobs import Engine, JobState
from engine.core.request import GenerationRequest
from engine.core.runtime import Runtime, create_runtime
from engine.core.settings import Settings
from engine.core.testing import FakeRunner
from engine.flux.runner import FluxRunner
from engine.sdxl.pipeline import SDXLRunner
from hooocus_ws.protocol import FRAME_IMAGE
from tests.flux.tiny import build_tiny, save_diffusers_folder
from tests.ws.conftest import ALICE, WsReader, auth, connect, make_app

SMALL = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "seed": 5, "image_number": 1}
WAIT_S = 300


def _settings(data_dir: Path) -> Settings:
    return Settings(data_dir=data_dir, device="cpu", shutdown_grace_s=1.0)


def _bytes(engine: Any, **params: Any) -> bytes:
    job = engine.submit({**SMALL, **params})
    assert job.wait(WAIT_S) and job.state is JobState.DONE, job.events_after(0)[-1]
    return job.images[0].data


@pytest.fixture(scope="module")
def single_family_bytes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """What one runner of each family makes alone (the engines the runtime built before issue 17's doors)."""
    out = {}
    for name, runner_type in (("demo", SDXLRunner), ("demo-flux", FluxRunner)):
        settings = _settings(tmp_path_factory.mktemp(name))
        with Engine(runner_type(settings, model=name), max_queue=4) as engine:
            out[name] = _bytes(engine, base_model=name)
    return out


@pytest.mark.parametrize("default, other", [("demo", "demo-flux"), ("demo-flux", "demo")])
def test_a_server_on_one_family_runs_the_other_with_the_same_bytes(
        tmp_path: Path, single_family_bytes: dict[str, bytes], default: str, other: str) -> None:
    runtime = create_runtime(_settings(tmp_path), model=default, record_history=False).start()
    try:
        runner = runtime.engine.runner
        assert isinstance(runner, FamilyRunner) and runner.default_family == runner.family_of(default)
        assert _bytes(runtime.engine, base_model=other) == single_family_bytes[other]
        assert _bytes(runtime.engine, base_model=default) == single_family_bytes[default]
        # a request that names no model runs the operator's default model
        assert _bytes(runtime.engine) == single_family_bytes[default]
    finally:
        runtime.close()


def test_the_idle_familys_weights_are_dropped_before_the_other_family_loads(tmp_path: Path) -> None:
    runtime = create_runtime(_settings(tmp_path), model="demo", record_history=False).start()
    try:
        runner = runtime.engine.runner
        _bytes(runtime.engine)
        assert runner.sdxl.base_components is not None
        _bytes(runtime.engine, base_model="demo-flux")
        assert runner.sdxl.base_components is None and runner.flux._loaded is not None
        _bytes(runtime.engine, base_model="demo")
        assert runner.flux._loaded is None and runner.sdxl.base_components is not None
    finally:
        runtime.close()


def test_sdxl_only_fields_on_a_flux_model_are_refused_on_an_sdxl_server(tmp_path: Path) -> None:
    runtime = create_runtime(_settings(tmp_path), model="demo", record_history=False)
    try:
        for field, value in (("sharpness", 5.0), ("clip_skip", 1), ("refiner_model", "demo")):
            with pytest.raises(UnsupportedForModel) as info:
                runtime.engine.submit({**SMALL, "base_model": "demo-flux", field: value})
            assert info.value.loc == (field,)
        assert runtime.engine.jobs() == []
        runtime.engine.submit({**SMALL, "sharpness": 5.0})  # still fine for the SDXL default
    finally:
        runtime.close()


def test_options_list_both_families_models_and_each_familys_own_choices(tmp_path: Path) -> None:
    runtime = create_runtime(_settings(tmp_path), model="demo-flux", record_history=False)
    try:
        options = runtime.engine.runner.options()
    finally:
        runtime.close()
    assert options["models"][0] == "demo-flux" and options["family"] == "flux"
    assert options["model_families"] == {"demo-flux": "flux", "demo": "sdxl", "demo-flux-dev": "flux"}
    assert options["defaults"]["steps"] == 4  # the default model's (schnell) defaults stay on top
    assert options["families"]["sdxl"]["samplers"] and options["families"]["flux"]["samplers"] == []
    assert options["families"]["sdxl"]["defaults"]["steps"] != 4


def test_a_flux_folder_in_the_checkpoints_folder_runs_by_name_on_an_sdxl_server(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    folder = save_diffusers_folder(build_tiny("schnell"), settings.models_dir / "checkpoints" / "tiny-flux",
                                   "schnell")
    runtime = create_runtime(settings, model="demo", record_history=False).start()
    try:
        runner = runtime.engine.runner
        assert runner.family_of("tiny-flux") == "flux" and runner.family_of("demo") == "sdxl"
        assert runner.options()["model_families"]["tiny-flux"] == "flux"
        job = runtime.engine.submit({**SMALL, "base_model": "tiny-flux"})
        assert job.wait(WAIT_S) and job.state is JobState.DONE, job.events_after(0)[-1]
        started = next(e for e in job.events_after(0) if type(e).__name__ == "Started")
        assert started.params["family"] == "flux" and started.params["base_model"] == folder.name
    finally:
        runtime.close()
    # the same folder named by the operator as the default model (a name, not a path)
    runtime = create_runtime(settings, model="tiny-flux", record_history=False).start()
    try:
        assert runtime.engine.runner.default_family == "flux"
        for params, family in (({}, "flux"), ({"base_model": "tiny-flux"}, "flux"), ({"base_model": "demo"}, "sdxl")):
            job = runtime.engine.submit({**SMALL, **params})
            assert job.wait(WAIT_S) and job.state is JobState.DONE, job.events_after(0)[-1]
            started = next(e for e in job.events_after(0) if type(e).__name__ == "Started")
            assert started.params.get("family", "sdxl") == family  # SDXL jobs do not name their family
    finally:
        runtime.close()


class _KeyedRunner(FakeRunner):
    """A fake family runner whose batch key ignores the family (both return the same key)."""

    def batch_key(self, request: GenerationRequest) -> Hashable | None:
        return ("same", request.width)

    def run_batch(self, ctxs: list) -> list:
        for ctx in ctxs:
            self.run(ctx)
        return [None] * len(ctxs)


def test_the_batch_key_carries_the_family_so_families_never_share_a_batch(tmp_path: Path) -> None:
    runner = FamilyRunner(_settings(tmp_path), model="demo",
                          factories={"sdxl": lambda s, m: _KeyedRunner(), "flux": lambda s, m: _KeyedRunner()})
    sdxl_key = runner.batch_key(GenerationRequest.parse({**SMALL, "base_model": "demo"}))
    flux_key = runner.batch_key(GenerationRequest.parse({**SMALL, "base_model": "demo-flux"}))
    assert sdxl_key is not None and flux_key is not None and sdxl_key != flux_key
    assert runner.batch_key(GenerationRequest.parse(SMALL)) == sdxl_key  # no model named: the default's family


# -- through the doors --------------------------------------------------------------------------------


@pytest.fixture
def sdxl_server(tmp_path: Path) -> Iterator[tuple[TestClient, Runtime]]:
    runtime = create_runtime(_settings(tmp_path), model="demo")
    with TestClient(make_app(runtime)) as client:
        yield client, runtime


def test_websocket_and_http_on_an_sdxl_server_run_demo_flux(sdxl_server: tuple[TestClient, Runtime],
                                                           single_family_bytes: dict[str, bytes]) -> None:
    client, _ = sdxl_server
    with connect(client) as ws:
        reader = WsReader(ws)
        reader.recv()
        for model in ("demo-flux", "demo"):
            reader.send({"type": "generate", "params": {**SMALL, "base_model": model}})
            messages = reader.until_type("done", "error", "cancelled")
            assert messages[-1]["type"] == "done", messages[-1]
    finals = [payload for kind, _, payload in reader.frames if kind == FRAME_IMAGE]
    assert finals == [single_family_bytes["demo-flux"], single_family_bytes["demo"]]
    # /metrics reaches the SDXL runner's model cache through the device's FamilyRunner (demo ran last).
    text = client.get("/metrics", headers=auth(ALICE)).text
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("hooocus_worker_model_cache"))
    worker = '{worker="0",device="cpu"}'
    assert int(samples[f"hooocus_worker_model_cache_bytes{worker}"]) > 0
    assert int(samples[f"hooocus_worker_model_cache_entries{worker}"]) >= 1
    response = client.post("/v1/generate", headers=auth(ALICE), json={**SMALL, "base_model": "demo-flux"})
    assert response.status_code == 200 and response.json()["params"]["family"] == "flux"
    options = client.get("/v1/options", headers=auth(ALICE)).json()
    assert options["model_families"]["demo-flux"] == "flux" and options["model_families"]["demo"] == "sdxl"


def test_both_families_share_one_expansion_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.flux.runner
    import engine.sdxl.pipeline

    loads = []
    model = object()  # stands in for the GPT-2 expansion: only its identity matters here

    def fake_load(*args: Any, **kwargs: Any) -> tuple[Any, str | None]:
        loads.append(args)
        return model, None

    monkeypatch.setattr(engine.sdxl.pipeline, "load_expansion", fake_load)
    monkeypatch.setattr(engine.flux.runner, "load_expansion", fake_load)
    runner = FamilyRunner(_settings(tmp_path), model="demo-flux")
    assert runner.options()["expansion_available"] is True
    assert runner.flux._expansion is model and runner.sdxl._expansion is model
    assert len(loads) == 1  # one copy per device, not one per family


@pytest.mark.parametrize("default", ["demo", "demo-flux"])
def test_warmup_loads_only_the_default_models_family(tmp_path: Path, default: str) -> None:
    runner = FamilyRunner(_settings(tmp_path), model=default)
    runner.warmup()
    sdxl_loaded = runner._sdxl is not None and runner._sdxl.base_components is not None
    flux_loaded = any(r._loaded is not None for r in runner._flux.values())
    assert (sdxl_loaded, flux_loaded) == ((True, False) if default == "demo" else (False, True))


def test_flux_runners_per_device_are_bounded_and_the_resident_one_is_kept(tmp_path: Path) -> None:
    from engine.core.families import MAX_FLUX_RUNNERS

    made: list[FakeRunner] = []

    def fake_flux(settings: Settings, spec: str | None) -> FakeRunner:
        made.append(FakeRunner())
        return made[-1]

    runner = FamilyRunner(_settings(tmp_path), model="demo", factories={"flux": fake_flux})
    runner._flux_runner("resident")
    runner._make_resident("flux", "resident")
    for i in range(MAX_FLUX_RUNNERS + 3):
        runner._flux_runner(f"other-{i}")
        assert len(runner._flux) <= MAX_FLUX_RUNNERS
    assert "resident" in runner._flux and f"other-{MAX_FLUX_RUNNERS + 2}" in runner._flux


def test_an_unknown_model_names_both_families_models(tmp_path: Path) -> None:
    """A name no family knows is refused at submit with the models of both families listed."""
    from engine.core.constants import DEMO_FLUX_MODELS
    from engine.core.errors import UnknownModel

    runner = FamilyRunner(_settings(tmp_path), model="demo")
    with pytest.raises(UnknownModel) as info:
        runner.check(GenerationRequest.parse({"prompt": "x", "base_model": "nope"}))
    assert info.value.loc == ("base_model",) and "'nope'" in info.value.message
    assert all(name in info.value.message for name in ("demo", *DEMO_FLUX_MODELS)), info.value.message
    with pytest.raises(UnknownModel) as info:  # another field keeps the SDXL runner's own message
        runner.check(GenerationRequest.parse({"prompt": "x", "refiner_model": "nope"}))
    assert info.value.loc == ("refiner_model",) and "FLUX.1" not in info.value.message
