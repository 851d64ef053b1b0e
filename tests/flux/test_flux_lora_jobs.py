"""FLUX.1 LoRAs in requests (issue 17): ``request.loras`` and inline ``<lora:NAME:WEIGHT>`` tags merge
the file into demo-flux for that job (weight · alpha/rank · up@down) and the next job without it gets
the model back bit for bit; the options list the LoRA folder; a LoRA for another family (SDXL) is
refused at submit with ``unknown_lora`` at ``("loras", i, "name")``, nothing queued; metadata carries
the LoRA so ``--from-image`` reproduces the image. Through the engine, HTTP and the CLI."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from starlette.testclient import TestClient

from engine.core.errors import UnknownLora
from engine.core.events import Done, ImageReady, JobWarning, Started
from engine.core.runtime import Runtime, create_runtime
from engine.core.settings import Settings
from engine.flux.demo import build_demo_flux
from tests.flux.test_flux_doors import run_cli
from tests.ws.conftest import ALICE, auth, make_app

PARAMS = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "seed": 11}
WAIT_S = 120
RANK, ALPHA, WEIGHT = 4, 2.0, 0.8
KOHYA, DIFFUSERS, SDXL = "flux_kohya.safetensors", "flux_diffusers.safetensors", "sdxl_style.safetensors"
CLIP_ONLY = "flux_clip_only.safetensors"
#: One module in each of the demo transformer's block kinds, in BFL (kohya) naming; qkv is fused there
#: (its up-projection's rows are q, k, v of the diffusers model, in that order).
KOHYA_MODULES = {"img_in": ("x_embedder",), "double_blocks_0_img_attn_qkv": (
    "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k", "transformer_blocks.0.attn.to_v"),
    "single_blocks_0_linear2": ("single_transformer_blocks.0.proj_out",)}
DIFFUSERS_MODULES = ("transformer_blocks.0.ff.net.2", "single_transformer_blocks.0.attn.to_q")
CLIP_MODULE = "encoder.layers.0.mlp.fc1"


def _pair(gen: torch.Generator, out: int, inp: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(out, RANK, generator=gen) * 0.3, torch.randn(RANK, inp, generator=gen) * 0.3


def write_loras(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """The four LoRA files, and for each Flux one the expected delta per diffusers weight
    (``alpha/rank · up @ down``, before the request's weight)."""
    folder.mkdir(parents=True, exist_ok=True)
    demo = build_demo_flux("schnell")
    params = dict(demo.transformer.named_parameters())
    clip = dict(demo.text_encoder.named_parameters())
    gen = torch.Generator().manual_seed(5)
    kohya, kohya_deltas = {}, {}
    for module, targets in KOHYA_MODULES.items():
        shapes = [params[t + ".weight"].shape for t in targets]
        up, down = _pair(gen, sum(s[0] for s in shapes), shapes[0][1])
        kohya |= {f"lora_unet_{module}.lora_up.weight": up, f"lora_unet_{module}.lora_down.weight": down,
                  f"lora_unet_{module}.alpha": torch.tensor(ALPHA)}
        for target, piece in zip(targets, up.split([s[0] for s in shapes]), strict=True):
            kohya_deltas[("transformer", target + ".weight")] = (ALPHA / RANK, piece, down)
    up, down = _pair(gen, *clip[CLIP_MODULE + ".weight"].shape)  # CLIP-L, transformers-4 naming, no alpha
    kohya |= {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": up,
              "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": down}
    kohya_deltas[("text_encoder", CLIP_MODULE + ".weight")] = (1.0, up, down)  # kohya: no alpha = rank
    save_file(kohya, folder / KOHYA)
    save_file({k: v for k, v in kohya.items() if k.startswith("lora_te1_")}, folder / CLIP_ONLY)
    diffusers, diffusers_deltas = {}, {}
    for module in DIFFUSERS_MODULES:
        up, down = _pair(gen, *params[module + ".weight"].shape)
        diffusers |= {f"transformer.{module}.lora_A.weight": down, f"transformer.{module}.lora_B.weight": up,
                      f"transformer.{module}.alpha": torch.tensor(ALPHA)}
        diffusers_deltas[("transformer", module + ".weight")] = (ALPHA / RANK, up, down)
    save_file(diffusers, folder / DIFFUSERS)
    sdxl = {}  # kohya names of an SDXL LoRA (UNet input blocks, the bigG text encoder)
    for i in range(8):
        for name in (f"lora_unet_input_blocks_4_1_transformer_blocks_{i}_attn1_to_q",
                     f"lora_te2_text_model_encoder_layers_{i}_mlp_fc1"):
            up, down = _pair(gen, 64, 32)
            sdxl |= {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down, f"{name}.alpha": torch.tensor(ALPHA)}
    save_file(sdxl, folder / SDXL)
    return {KOHYA: kohya_deltas, DIFFUSERS: diffusers_deltas}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("data")
    write_loras(Settings(data_dir=data).models_dir / "loras")
    return data


@pytest.fixture(scope="module")
def runtime(data_dir: Path) -> Iterator[Runtime]:
    rt = create_runtime(Settings(data_dir=data_dir, device="cpu"), model="demo-flux", record_history=False).start()
    yield rt
    rt.close()


def _run(runtime: Runtime, params: dict) -> tuple[list, ImageReady]:
    job = runtime.engine.submit(params)
    events = list(job.iter_events(timeout_s=WAIT_S))
    assert isinstance(events[-1], Done), events[-1]
    return events, job.images[0]


def _pixels(image: ImageReady) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image.data)).convert("RGB"))


def _lora(name: str, weight: float = WEIGHT) -> dict:
    return {"loras": [{"name": name, "weight": weight}]}


def test_options_list_the_lora_files_that_fit(runtime: Runtime) -> None:
    # The folder holds four files; the SDXL one does not fit a FLUX.1 model, so it is not offered.
    assert runtime.engine.runner.flux.registry.names("loras") == [CLIP_ONLY, DIFFUSERS, KOHYA, SDXL]
    assert runtime.engine.runner.options()["loras"] == [CLIP_ONLY, DIFFUSERS, KOHYA]


@pytest.mark.parametrize("name", [KOHYA, DIFFUSERS])
def test_merged_weights_are_w_plus_weight_alpha_over_rank_up_down_and_restore(tmp_path: Path, name: str) -> None:
    from engine.flux.runner import FluxRunner

    expected_deltas = write_loras(tmp_path / "models" / "loras")[name]
    runner = FluxRunner(Settings(data_dir=tmp_path, device="cpu"), model="demo-flux")
    loaded = runner._load()
    modules = {"transformer": loaded.components.transformer, "text_encoder": loaded.components.text_encoder}
    before = {(c, n): p.detach().clone() for c, m in modules.items() for n, p in m.named_parameters()}
    warnings: list[tuple[str, str]] = []

    class Ctx:
        def warning(self, code: str, message: str) -> None:
            warnings.append((code, message))

    runner._apply_loras(loaded, [(name, WEIGHT)], Ctx())  # type: ignore[arg-type]
    after = {(c, n): p.detach() for c, m in modules.items() for n, p in m.named_parameters()}
    assert not warnings and loaded.loras == ((name, WEIGHT),)
    # Bit for bit: the merge does these float32 operations in this order (original + (weight·scale) · up@down),
    # and weight·alpha/rank is exact in binary here (0.8 · 0.5 and 0.8 · 1.0).
    for ref, (scale, up, down) in expected_deltas.items():
        assert torch.equal(after[ref], before[ref] + (WEIGHT * scale) * (up @ down)), ref
    assert {ref for ref in after if not torch.equal(after[ref], before[ref])} == set(expected_deltas)
    runner._apply_loras(loaded, [], Ctx())  # type: ignore[arg-type]
    assert all(torch.equal(after[ref], before[ref]) for ref in before) and loaded.loras == ()


def test_a_control_lora_at_run_time_is_skipped_with_a_warning_not_a_failed_job(tmp_path: Path) -> None:
    # Inline tags reach the runner unchecked: a layout the matcher refuses (ModelInvalid) must not fail the job.
    from engine.flux.runner import FluxRunner

    folder = tmp_path / "models" / "loras"
    folder.mkdir(parents=True)
    save_file({"double_blocks.0.img_attn.norm.query_norm.scale": torch.ones(8),
               "img_in.lora_A.weight": torch.zeros(RANK, 128), "img_in.lora_B.weight": torch.zeros(16, RANK)},
              folder / "canny.safetensors")
    runner = FluxRunner(Settings(data_dir=tmp_path, device="cpu"), model="demo-flux")
    loaded = runner._load()
    before = {n: p.detach().clone() for n, p in loaded.components.transformer.named_parameters()}
    warnings: list[tuple[str, str]] = []

    class Ctx:
        def warning(self, code: str, message: str) -> None:
            warnings.append((code, message))

    runner._apply_loras(loaded, [("canny.safetensors", 1.0)], Ctx())  # type: ignore[arg-type]
    assert [code for code, _ in warnings] == ["lora_mismatch"] and "Control LoRA" in warnings[0][1]
    assert loaded.loras == ()
    assert all(torch.equal(p, before[n]) for n, p in loaded.components.transformer.named_parameters())


def test_lora_job_differs_repeats_and_the_next_job_without_it_is_restored(runtime: Runtime) -> None:
    plain = _run(runtime, PARAMS)[1]
    events, with_lora = _run(runtime, {**PARAMS, **_lora(KOHYA)})
    again = _run(runtime, {**PARAMS, **_lora(KOHYA)})[1]
    other = _run(runtime, {**PARAMS, **_lora(DIFFUSERS)})[1]
    after = _run(runtime, PARAMS)[1]
    assert not [e for e in events if isinstance(e, JobWarning)]
    assert with_lora.data == again.data
    # pixels, not bytes: the PNG text alone (the LoRA line) would already make the bytes differ
    assert not np.array_equal(_pixels(with_lora), _pixels(plain))
    assert not np.array_equal(_pixels(other), _pixels(with_lora))
    assert after.data == plain.data  # the weights (and the encoded-prompt cache) were restored
    assert with_lora.metadata["lora_combined_1"] == f"{KOHYA} : {WEIGHT}" and "lora_combined_1" not in plain.metadata


def test_a_clip_only_lora_changes_the_image_though_the_prompt_was_encoded_before(runtime: Runtime) -> None:
    # The same prompt ran without LoRAs first: its encoding must not be reused with CLIP-L's new weights.
    plain = _run(runtime, PARAMS)[1]
    clip_only = _run(runtime, {**PARAMS, **_lora(CLIP_ONLY)})[1]
    assert not np.array_equal(_pixels(clip_only), _pixels(plain))


def test_inline_lora_tag_applies_like_the_request_field(runtime: Runtime) -> None:
    by_field = _run(runtime, {**PARAMS, **_lora("flux_diffusers", 0.5)})[1]  # a stem names the file too
    events, inline = _run(runtime, {**PARAMS, "prompt": PARAMS["prompt"] + ", <lora:flux_diffusers:0.5>"})
    started = next(e for e in events if isinstance(e, Started))
    assert started.params["loras"] == [[DIFFUSERS, 0.5]]
    assert np.array_equal(_pixels(inline), _pixels(by_field))
    assert inline.metadata["lora_combined_1"] == f"{DIFFUSERS} : 0.5"


def test_an_inline_sdxl_lora_is_skipped_at_run_time_with_a_warning(runtime: Runtime) -> None:
    # Inline tags are parsed on the worker (as on SDXL), after submit: the run-time match skips the file.
    plain = _run(runtime, PARAMS)[1]
    events, image = _run(runtime, {**PARAMS, "prompt": PARAMS["prompt"] + ", <lora:sdxl_style:1>"})
    assert [e.code for e in events if isinstance(e, JobWarning)] == ["lora_mismatch"]
    assert np.array_equal(_pixels(image), _pixels(plain)) and "lora_combined_1" not in image.metadata


@pytest.mark.parametrize("scheme", ["fooocus", "a1111"])
def test_metadata_with_a_lora_regenerates_the_same_image(runtime: Runtime, scheme: str) -> None:
    """--from-image of a Flux image with a LoRA: the stored LoRA (name, weight) reads back and re-runs."""
    from engine.io.metadata import request_from_image

    image = _run(runtime, {**PARAMS, "styles": [], "metadata_scheme": scheme, **_lora(KOHYA)})[1]
    request, warnings = request_from_image(image.data, known_models=["demo-flux"],
                                           known_loras=runtime.engine.runner.options()["loras"])
    assert not [w for w in warnings if "demo" not in w]
    assert [(lora.name, lora.weight, lora.enabled) for lora in request.loras] == [(KOHYA, WEIGHT, True)]
    again = _run(runtime, {**request.model_dump(exclude_unset=True), "styles": [], "metadata_scheme": scheme})[1]
    assert again.data == image.data


def test_the_header_only_fit_check_agrees_with_the_full_match(tmp_path: Path) -> None:
    from engine.flux.lora import load_flux_lora, lora_fit_problem, match_flux_lora

    write_loras(tmp_path)
    demo = build_demo_flux("schnell")
    models = {"transformer": demo.transformer, "text_encoder": demo.text_encoder}
    weight = dict(demo.transformer.named_parameters())["transformer_blocks.0.attn.to_q.weight"]
    save_file({"transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(RANK, weight.shape[1]),  # bare PEFT names
               "transformer_blocks.0.attn.to_q.lora_B.weight": torch.ones(weight.shape[0], RANK)}, tmp_path / "peft.safetensors")
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.ones(RANK, weight.shape[1] + 1),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.ones(weight.shape[0], RANK)},
              tmp_path / "wrong_width.safetensors")  # a LoRA for a FLUX.1 of another width
    fits = {}
    for path in sorted(tmp_path.glob("*.safetensors")):
        match = match_flux_lora(load_flux_lora(path), models)
        fits[path.name] = lora_fit_problem(path, models) is None
        assert fits[path.name] == (bool(match.deltas) and not match.skipped), path.name
    assert fits == {CLIP_ONLY: True, DIFFUSERS: True, KOHYA: True, "peft.safetensors": True, SDXL: False,
                    "wrong_width.safetensors": False}


@pytest.mark.parametrize("name", [SDXL, "missing"])
def test_sdxl_or_unknown_lora_is_refused_at_submit_nothing_queued(runtime: Runtime, name: str) -> None:
    before = len(runtime.engine.jobs())
    loras = [{"name": DIFFUSERS, "enabled": False}, {"name": name, "weight": 1.0}]
    with pytest.raises(UnknownLora) as info:
        runtime.engine.submit({**PARAMS, "loras": loras})
    assert info.value.code == "unknown_lora" and info.value.loc == ("loras", 1, "name")
    assert ("does not fit this FLUX.1 model" in info.value.message) == (name == SDXL)
    assert len(runtime.engine.jobs()) == before


def test_http_lora_job_options_and_sdxl_refusal(data_dir: Path) -> None:
    runtime = create_runtime(Settings(data_dir=data_dir, device="cpu", shutdown_grace_s=1.0), model="demo-flux",
                             record_history=False)
    with TestClient(make_app(runtime)) as client:
        options = client.get("/v1/options", headers=auth(ALICE)).json()
        assert KOHYA in options["loras"] and SDXL not in options["loras"]
        response = client.post("/v1/generate", headers=auth(ALICE), json={**PARAMS, **_lora(KOHYA)})
        assert response.status_code == 200 and response.json()["state"] == "done"
        assert response.json()["params"]["loras"] == [[KOHYA, WEIGHT]]
        refused = client.post("/v1/generate", headers=auth(ALICE), json={**PARAMS, **_lora(SDXL)})
        assert refused.status_code == 422
        assert refused.json()["error"]["code"] == "unknown_lora" and refused.json()["error"]["loc"] == ["loras", 0, "name"]


def test_cli_lora_flag_from_image_and_sdxl_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    write_loras(tmp_path / "data" / "models" / "loras")
    common = ["--data-dir", tmp_path / "data", "--width", "64", "--height", "64", "--no-progress", "--json"]
    base = ["generate", "x", "--model", "demo-flux", "--seed", "1"]
    runs = [run_cli(capsys, *base, "--lora", f"flux_kohya:{WEIGHT}", *common) for _ in range(2)]
    plain = run_cli(capsys, *base, *common)
    assert [code for code, _, _ in (*runs, plain)] == [0, 0, 0], (runs, plain)
    first, second, without = (Path(json.loads(out)["path"]).read_bytes() for _, out, _ in (*runs, plain))
    assert first == second
    assert not np.array_equal(*(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in (first, without)))
    code, out, err = run_cli(capsys, "generate", "--from-image", json.loads(runs[0][1])["path"], *common)
    assert code == 0, err
    assert Path(json.loads(out)["path"]).read_bytes() == first
    code, out, err = run_cli(capsys, *base, "--lora", "sdxl_style:1", *common)
    assert code == 2 and out == "" and "unknown_lora" in err and "sdxl_style" in err


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_mcp_inline_lora_tag_on_demo_flux_changes_the_image(data_dir: Path) -> None:
    """Besides its ``loras`` argument (tests/flux/test_door_loras.py), MCP's generate_image lets agents name
    a LoRA with an inline tag in the prompt, which must reach the Flux merge as it does through the engine."""
    import base64

    from hooocus_mcp._sdk import Client
    from hooocus_mcp.backend import LocalBackend
    from hooocus_mcp.tools import ServerOptions, build_server
    from tests.mcp.conftest import STDIO

    rt = create_runtime(Settings(data_dir=data_dir, device="cpu"), model="demo-flux", record_history=False).start()
    server = build_server(LocalBackend(rt), ServerOptions(default_caller=STDIO, progress_min_interval_s=0))
    args = {"prompt": PARAMS["prompt"], "width": 64, "height": 64, "seed": 11, "model": "demo-flux", "styles": []}
    pixels = {}
    try:
        async with Client(server) as mcp:
            for label, prompt in (("plain", PARAMS["prompt"]), ("tag", PARAMS["prompt"] + ", <lora:flux_kohya:0.8>")):
                done = await mcp.call_tool("generate_image", {**args, "prompt": prompt})
                assert done.structured_content["status"] == "completed", done.content[0]
                uri = done.structured_content["images"][0]["uri"]
                data = base64.b64decode((await mcp.read_resource(uri)).contents[0].blob)
                pixels[label] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    finally:
        rt.close()
    engine_door = create_runtime(Settings(data_dir=data_dir, device="cpu"), model="demo-flux",
                                 record_history=False).start()
    try:  # the same LoRA through the request field on the engine: the same pixels
        by_field = _pixels(_run(engine_door, {**PARAMS, "styles": [], **_lora(KOHYA)})[1])
    finally:
        engine_door.close()
    assert not np.array_equal(pixels["tag"], pixels["plain"])
    assert np.array_equal(pixels["tag"], by_field)
