"""``hooocus generate / models / config`` end to end, in-process on the demo model, plus one run of
the real console script in a subprocess.

What is proved: files land where the command prints, carry fooocus-scheme parameters that read
back, ``--json`` lines describe them, the same seed gives byte-identical files, bad arguments give
exactly one stderr line and exit code 2; ``--from-image`` / ``--from-log`` give the request
Fooocus's "Load Parameters" gives (checked against every case of metadata_roundtrip.json found in
$HOOOCUS_REFDATA), with missing models dropped and flags on top; the performance-LoRA message
names a set-up command that works; ``models`` explains skipped files; ``config show`` shows
sources and masks secrets.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from engine.core.request import GenerationRequest, parse_aspect_ratio
from engine.core.settings import settings_from_args
from engine.io.imageio import read_image_metadata
from hooocus.cli import build_parser, main, request_fields_from_args
from tests.paths import refdata_dir

SMALL = ["--model", "demo", "--steps", "3", "--width", "64", "--height", "64", "--no-progress"]
_IMAGE_SUFFIXES = (".png", ".jpeg", ".webp")


def _roundtrip_files() -> list[Path]:
    folder = refdata_dir() / "metadata"
    return sorted(p for p in folder.glob("*.json") if "cases" in json.loads(p.read_text(encoding="utf-8")))


def _image_params() -> list[Any]:
    """Every case*.png|jpeg|webp in $HOOOCUS_REFDATA/metadata (found at collection time)."""
    folder = refdata_dir() / "metadata"
    return [pytest.param(p, id=p.name) for p in sorted(folder.glob("case*")) if p.suffix in _IMAGE_SUFFIXES]


def _case_params() -> list[Any]:
    return [pytest.param(path, case["label"], id=f"{path.stem}:{case['label']}")
            for path in _roundtrip_files() for case in json.loads(path.read_text(encoding="utf-8"))["cases"]]


IMAGES = _image_params()
CASES = _case_params()
LOGS = [pytest.param(p, id=p.name) for p in sorted((refdata_dir() / "metadata").glob("*.html"))]


def _case_for_image(image: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    for path in _roundtrip_files():
        data = json.loads(path.read_text(encoding="utf-8"))
        for case in data["cases"]:
            if case.get("image_file") == image.name:
                return data, case
    raise AssertionError(f"{image.name} has no case in {[p.name for p in _roundtrip_files()]}")


def _case(path: Path, label: str) -> tuple[dict[str, Any], dict[str, Any]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return data, next(c for c in data["cases"] if c["label"] == label)


def _ui(case: dict[str, Any]) -> dict[str, Any]:
    """Fooocus's UI values after "Load Parameters", gradio updates (= "unchanged") left out."""
    return {item["field"]: item["value"] for item in case["load_parameter_button_click"]
            if not (isinstance(item["value"], dict) and item["value"].get("__gradio_update__"))}


# Fooocus UI field -> GenerationRequest field, for the values a CLI user most cares about.
_UI_TO_REQUEST = {"prompt": "prompt", "negative_prompt": "negative_prompt", "styles": "styles",
                  "performance": "performance", "guidance_scale": "cfg", "sharpness": "sharpness",
                  "sampler": "sampler", "scheduler": "scheduler", "seed": "seed", "adaptive_cfg": "adaptive_cfg",
                  "adm_scaler_positive": "adm_scaler_positive", "refiner_swap_method": "refiner_swap_method",
                  "clip_skip": "clip_skip"}


pytestmark = pytest.mark.usefixtures("isolated_cli_env")  # tests/engine/conftest.py


@pytest.fixture
def data_dir(tmp_path: Path, fooocus_data: Path) -> Path:
    """A data folder after 'hooocus setup --only styles': Fooocus's styles, no models."""
    folder = tmp_path / "data"
    shutil.copytree(fooocus_data / "sdxl_styles", folder / "sdxl_styles")
    return folder


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _request(*argv: str | Path) -> GenerationRequest:
    """The request ``hooocus generate ARGV`` would submit (notes go to stderr)."""
    args = build_parser().parse_args(["generate", *(str(a) for a in argv)])
    settings, _ = settings_from_args(args)
    return GenerationRequest.parse(request_fields_from_args(args, settings))


def _write_safetensors(path: Path, keys: list[str]) -> Path:
    import numpy as np
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: np.zeros(2, dtype=np.float16) for key in keys}, str(path))
    return path


_SDXL_BASE_KEYS = ["model.diffusion_model.out.weight", "conditioner.embedders.0.transformer.x.weight",
                   "conditioner.embedders.1.model.x.weight"]


# -- generate on the demo model ---------------------------------------------------------------------


def test_generate_writes_png_with_fooocus_parameters(capsys: pytest.CaptureFixture[str], data_dir: Path) -> None:
    small = [a for a in SMALL if a != "--no-progress"]
    code, out, err = run(capsys, "generate", "a red fox in snow", "--seed", "7", "--data-dir", data_dir, *small)
    assert code == 0, err
    assert re.search(r"100%\|.*\| 3/3 ", err), err  # the tqdm bar goes to stderr, stdout has only paths
    paths = [Path(line) for line in out.splitlines()]
    assert len(paths) == 1 and paths[0].is_file()
    assert paths[0].is_relative_to(data_dir / "outputs") and paths[0].suffix == ".png"
    parameters, scheme = read_image_metadata(paths[0].read_bytes())
    assert scheme == "fooocus"
    stored = json.loads(parameters)
    assert (stored["prompt"], stored["seed"], stored["steps"]) == ("a red fox in snow", "7", 3)
    assert stored["resolution"] == "(64, 64)" and stored["is_demo"] is True
    assert "Traceback" not in err


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_json_lines_describe_the_files(capsys: pytest.CaptureFixture[str], data_dir: Path, tmp_path: Path,
                                       fmt: str) -> None:
    out_dir = tmp_path / "elsewhere"
    code, out, err = run(capsys, "generate", "a lighthouse", "--seed", "100", "--image-number", "2", "--format", fmt,
                         "--json", "--out", out_dir, "--data-dir", data_dir, *SMALL)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [int(row["seed"]) for row in rows] == [100, 101]  # Fooocus: image i uses seed + i
    for row in rows:
        path = Path(row["path"])
        assert path.is_relative_to(out_dir) and path.suffix == f".{fmt}"
        data = path.read_bytes()
        assert row["sha256"] == hashlib.sha256(data).hexdigest()
        assert (row["width"], row["height"]) == (64, 64)
        parameters, scheme = read_image_metadata(data)
        assert scheme == "fooocus" and json.loads(parameters)["seed"] == row["seed"]
    assert not (data_dir / "outputs").exists()


def test_same_seed_twice_gives_byte_identical_files(capsys: pytest.CaptureFixture[str], data_dir: Path) -> None:
    argv = ["generate", "a teapot", "--seed", "31337", "--data-dir", data_dir, *SMALL]
    first, second = (run(capsys, *argv) for _ in range(2))
    assert first[0] == second[0] == 0
    assert "3/3" not in first[2]  # --no-progress
    path_a, path_b = Path(first[1].strip()), Path(second[1].strip())
    assert path_a != path_b and path_a.read_bytes() == path_b.read_bytes()
    code, out, _ = run(capsys, "generate", "a teapot", "--seed", "31338", "--data-dir", data_dir, *SMALL)
    assert code == 0 and Path(out.strip()).read_bytes() != path_a.read_bytes()


def _pickle_file(path: Path, marker: Path) -> Path:
    class Payload:  # unpickling it would create the marker file
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(Payload()))
    return path


@pytest.mark.parametrize(("extra", "expected"), [
    (["--width", "1001", "--height", "64"], "multiple of 8"),
    (["--sampler", "nope"], "invalid choice: 'nope'"),
    (["--steps", "abc"], "invalid int value: 'abc'"),
    (["--style", "No Such Style"], "unknown style 'No Such Style'"),
    (["--model", "no-such-model"], "unknown model 'no-such-model'; available: demo, demo-refiner"),
    (["--model", "./missing/model.safetensors"], "no model file at ./missing/model.safetensors"),
    (["--from-image", "missing.png"], "cannot read missing.png"),
    (["--from-log", "missing.html"], "cannot read missing.html"),
    (["--width", "64"], "give both width and height"),
    (["--lora", "x:heavy"], "bad weight"),
    (["--server", "http://host:1", "--token", "t"], "expected ws://host:port"),
    (["--server", "ws://host:1"], "needs a token"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_bad_arguments_give_one_line_and_exit_2(capsys: pytest.CaptureFixture[str], data_dir: Path,
                                                extra: list[str], expected: str) -> None:
    code, out, err = run(capsys, "generate", "a cat", "--data-dir", data_dir, "--no-progress", *extra)
    assert code == 2
    assert out == "" and len(err.strip().splitlines()) == 1, err
    assert expected in err and "Traceback" not in err
    assert not (data_dir / "outputs").exists()


def test_pickle_or_corrupt_model_file_is_refused_unopened(capsys: pytest.CaptureFixture[str], data_dir: Path,
                                                          tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    for model, expected in ((_pickle_file(tmp_path / "old.ckpt", marker), "unsafe_file"),
                            (_pickle_file(tmp_path / "renamed.safetensors", marker), "unsafe_file"),
                            (tmp_path / "garbage.safetensors", "model_invalid")):
        if not model.exists():
            model.write_bytes(b"\x05" * 64)
        code, out, err = run(capsys, "generate", "a cat", "--model", model, "--data-dir", data_dir)
        assert (code, out) == (2, "")
        assert len(err.strip().splitlines()) == 1 and f"[{expected}]" in err
    assert not marker.exists()


def test_fast_mode_without_its_lora_names_a_setup_command_that_works(
        capsys: pytest.CaptureFixture[str], data_dir: Path, tmp_path: Path) -> None:
    """The runner's assets_missing message names the exact 'hooocus setup' command, and set-up
    accepts it (listing the LoRA as missing; --list downloads nothing)."""
    from engine.sdxl.modes import PERFORMANCE_MODES

    model = _write_safetensors(tmp_path / "my_sdxl.safetensors", _SDXL_BASE_KEYS)
    fast = [(name, mode.lora_file) for name, mode in PERFORMANCE_MODES.items() if mode.lora_file]
    assert len(fast) == 3
    for performance, lora_file in fast:
        code, out, err = run(capsys, "generate", "a cat", "--model", model, "--performance", performance,
                             "--data-dir", data_dir)
        assert (code, out) == (1, "") and len(err.strip().splitlines()) == 1, err
        assert "[assets_missing]" in err and lora_file in err
        command = re.search(r"'(hooocus setup [^']+)'", err)
        assert command is not None, err
        argv = shlex.split(command.group(1))[1:]
        code, out, err = run(capsys, *argv, "--list")
        assert code == 0, err
        assert re.search(rf"missing\s+performance-loras/{re.escape(lora_file)}", out)
        assert str(data_dir) in out


def test_demo_model_names_are_the_runners() -> None:
    from engine.flux.runner import DEMO_FLUX_VARIANTS
    from engine.sdxl import pipeline
    from hooocus.cli import DEMO_MODELS

    assert DEMO_MODELS == (pipeline.DEMO_MODEL, pipeline.DEMO_REFINER, *DEMO_FLUX_VARIANTS)
    assert pipeline.DEMO_MODEL == "demo" and tuple(DEMO_FLUX_VARIANTS) == ("demo-flux", "demo-flux-dev")


# -- --from-image / --from-log ------------------------------------------------------------------------


def test_golden_metadata_files_present() -> None:
    assert IMAGES and CASES and LOGS, f"no metadata cases in {refdata_dir() / 'metadata'}"


@pytest.mark.parametrize("image", IMAGES)
def test_from_image_builds_the_request_fooocus_loads(capsys: pytest.CaptureFixture[str], data_dir: Path,
                                                     image: Path) -> None:
    """Nothing installed but the styles: Fooocus's values carry over, models/LoRAs/VAE become notes."""
    _data, case = _case_for_image(image)
    ui = _ui(case)
    request = _request("--from-image", image, "--data-dir", data_dir)
    notes = capsys.readouterr().err
    for ui_name, field in _UI_TO_REQUEST.items():
        if ui_name in ui:
            assert getattr(request, field) == ui[ui_name], field
    assert request.size == parse_aspect_ratio(ui["aspect_ratio_label"])
    assert request.steps == (None if ui["overwrite_step"] == -1 else ui["overwrite_step"])
    assert (request.freeu is not None) == ui["freeu_enabled"]
    assert (request.base_model, request.refiner_model, request.vae, request.loras) == (None, None, None, [])
    wanted = [ui.get("base_model"), ui.get("refiner_model"), ui.get("vae"),
              *(ui[f"lora_{n}_name"] for n in range(1, 6) if f"lora_{n}_name" in ui)]
    for name in wanted:
        if name not in (None, "None", "Default (model)"):
            assert Path(name).stem in notes and "not installed" in notes


@pytest.mark.parametrize("image", IMAGES)
def test_from_image_keeps_names_that_are_installed(capsys: pytest.CaptureFixture[str], data_dir: Path,
                                                   image: Path) -> None:
    data, case = _case_for_image(image)
    for relative in data["dummy_files"]:  # the model files the case was made with, as tiny stand-ins
        keys = _SDXL_BASE_KEYS if relative.startswith("checkpoints/") else ["lora.weight"]
        _write_safetensors(data_dir / "models" / relative, keys)
    ui = _ui(case)
    request = _request("--from-image", image, "--data-dir", data_dir)
    assert "not installed" not in capsys.readouterr().err
    assert request.base_model == ui["base_model"]
    assert request.refiner_model == (None if ui.get("refiner_model", "None") == "None" else ui["refiner_model"])
    assert request.vae == (None if ui.get("vae", "Default (model)") == "Default (model)" else ui["vae"])
    loras = [(ui[f"lora_{n}_name"], ui[f"lora_{n}_weight"]) for n in range(1, 6)
             if ui.get(f"lora_{n}_name", "None") != "None" and ui.get(f"lora_{n}_enabled")]
    assert [(lora.name, lora.weight) for lora in request.loras] == loras


@pytest.mark.parametrize("image", IMAGES)
def test_from_image_runs_on_the_demo_model_with_flags_on_top(capsys: pytest.CaptureFixture[str], data_dir: Path,
                                                             image: Path) -> None:
    _data, case = _case_for_image(image)
    ui = _ui(case)
    code, out, err = run(capsys, "generate", "--from-image", image, "--json", "--data-dir", data_dir, *SMALL)
    assert code == 0, err
    (row,) = [json.loads(line) for line in out.splitlines()]
    assert int(row["seed"]) == ui["seed"] and (row["width"], row["height"]) == (64, 64)
    stored = json.loads(read_image_metadata(Path(row["path"]).read_bytes())[0])
    assert (stored["prompt"], stored["negative_prompt"]) == (ui["prompt"], ui["negative_prompt"])
    assert (stored["performance"], stored["sampler"]) == (ui["performance"], ui["sampler"])
    # Flags win over the file.
    request = _request("--from-image", image, "--data-dir", data_dir, "--seed", "5", "--cfg", "6.5",
                       "a different prompt", "--style", "Fooocus Sharp")
    assert (request.seed, request.cfg, request.prompt, request.styles) == (5, 6.5, "a different prompt",
                                                                           ["Fooocus Sharp"])
    assert request.performance == ui["performance"]


@pytest.mark.parametrize(("path", "label"), CASES)
def test_from_log_gives_the_logged_parameters(capsys: pytest.CaptureFixture[str], data_dir: Path, tmp_path: Path,
                                              path: Path, label: str) -> None:
    """A whole log.html (some entry of it) and a pasted block (the A1111 text or the fooocus JSON
    that Fooocus wrote into the image) both give the case's parameters."""
    _data, case = _case(path, label)
    written = {key: value for _label, key, value in case["log_metadata_list_[label,key,value]"]}
    expected = (written["prompt"], written["negative_prompt"], int(written["seed"]), written["performance"],
                written["sampler"], written["scheduler"], float(written["guidance_scale"]))

    def summary(request: GenerationRequest) -> tuple[Any, ...]:
        return (request.prompt, request.negative_prompt, request.seed, request.performance, request.sampler,
                request.scheduler, request.cfg)

    for log in (p.values[0] for p in LOGS):
        count = log.read_text(encoding="utf-8").count("to_clipboard(")
        found = [summary(_request("--from-log", log, "--log-index", str(i), "--data-dir", data_dir))
                 for i in range(count)]
        assert expected in found
    pasted = tmp_path / "pasted.txt"
    pasted.write_text("\n" + case["written_parameters_string"] + "\n", encoding="utf-8")
    assert summary(_request("--from-log", pasted, "--data-dir", data_dir)) == expected
    capsys.readouterr()


@pytest.mark.parametrize("log", LOGS)
def test_from_log_runs_the_newest_entry_on_the_demo_model(capsys: pytest.CaptureFixture[str], data_dir: Path,
                                                          log: Path) -> None:
    code, out, err = run(capsys, "generate", "--from-log", log, "--json", "--data-dir", data_dir, *SMALL)
    assert code == 0, err
    (row,) = [json.loads(line) for line in out.splitlines()]
    newest = _request("--from-log", log, "--data-dir", data_dir)
    assert int(row["seed"]) == newest.seed
    assert json.loads(read_image_metadata(Path(row["path"]).read_bytes())[0])["prompt"] == newest.prompt
    code, _out, err = run(capsys, "generate", "--from-log", log, "--log-index", "999", "--data-dir", data_dir)
    assert code == 2 and "does not exist" in err


# -- the real console script --------------------------------------------------------------------------


def _console_command() -> tuple[list[str], dict[str, str]]:
    script = Path(sys.executable).with_name("hooocus")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "hooocus"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOOOCUS_")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    return command, env


def test_console_script_entry_point_rejects_bad_arguments_in_one_line(tmp_path: Path) -> None:
    command, env = _console_command()
    for extra in (["--steps", "abc"], ["--model", "no-such-model", "--data-dir", str(tmp_path / "d")]):
        bad = subprocess.run([*command, "generate", "x", *extra], capture_output=True, text=True, env=env,
                             cwd=tmp_path, timeout=120)
        assert bad.returncode == 2 and bad.stdout == "", bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr


@pytest.mark.slow  # a fresh interpreter imports torch and builds the demo model: about 8 s
def test_console_script_generates_with_a_progress_bar(data_dir: Path, tmp_path: Path) -> None:
    command, env = _console_command()
    argv = ["generate", "a red fox", "--model", "demo", "--seed", "3", "--steps", "3", "--width", "64", "--height",
            "64", "--data-dir", str(data_dir), "--log-level", "warning"]
    done = subprocess.run([*command, *argv], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    (path,) = [Path(line) for line in done.stdout.splitlines()]
    assert path.is_file() and json.loads(read_image_metadata(path.read_bytes())[0])["prompt"] == "a red fox"
    assert re.search(r"100%\|.*\| 3/3 ", done.stderr), done.stderr  # tqdm's bar, on stderr


# -- --server -----------------------------------------------------------------------------------------


def test_generate_on_a_running_server(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    from engine.core.testing import FakeRunner
    from tests.ws.conftest import ALICE, make_app, make_runtime, start_server

    runtime = make_runtime(tmp_path / "server", FakeRunner())
    live = start_server(make_app(runtime), runtime)
    try:
        base = live.ws_url.removesuffix("/v1/ws")
        code, out, err = run(capsys, "generate", "a cat", "--server", base, "--token", ALICE, "--seed", "9",
                             "--image-number", "2", "--json", "--out", tmp_path / "out", "--no-progress")
        assert code == 0, err
        rows = [json.loads(line) for line in out.splitlines()]
        assert [int(row["seed"]) for row in rows] == [9, 10]
        for row in rows:
            assert hashlib.sha256(Path(row["path"]).read_bytes()).hexdigest() == row["sha256"]
        code, out, err = run(capsys, "generate", "a cat", "--server", base, "--token", "wrong-token-0123456789")
        # The server runs in this process, so its own log records (hooocus.ws) reach the stderr the
        # command's logging set-up writes to; in real use they are another process's. Not counted.
        err_lines = [line for line in err.strip().splitlines() if " hooocus.ws" not in line]
        assert code == 1 and out == "" and len(err_lines) == 1 and "Traceback" not in err
        code, _out, err = run(capsys, "generate", "a cat", "--server", base, "--token", ALICE, "--style", "Nope")
        assert code == 2 and "unknown style" in err
    finally:
        live.stop()


# -- models, config ------------------------------------------------------------------------------------


def test_models_lists_usable_files_and_says_why_others_are_skipped(capsys: pytest.CaptureFixture[str],
                                                                   tmp_path: Path) -> None:
    data = tmp_path / "data"
    good = _write_safetensors(data / "models/checkpoints/good_sdxl.safetensors", _SDXL_BASE_KEYS)
    lora = _write_safetensors(data / "models/loras/style.safetensors", ["lora_unet.x.weight"])
    marker = tmp_path / "unpickled"
    _pickle_file(data / "models/checkpoints/old.ckpt", marker)
    (data / "models/loras/broken.safetensors").write_bytes(b"\xff" * 40)
    code, out, err = run(capsys, "models", "--json", "--data-dir", data)
    assert code == 0, err
    rows = {row["name"]: row for row in json.loads(out)}
    assert set(rows) == {"good_sdxl.safetensors", "style.safetensors", "old.ckpt", "broken.safetensors",
                         "demo", "demo-refiner", "demo-flux", "demo-flux-dev"}
    assert [rows[name]["family"] for name in ("demo", "demo-refiner", "demo-flux", "demo-flux-dev")] == [
        "sdxl", "sdxl", "flux", "flux"]
    for name in ("demo", "demo-refiner"):  # built in, always usable, and says it is no real model
        assert (rows[name]["kind"], rows[name]["usable"], rows[name]["builtin"]) == ("checkpoints", True, True)
        assert "abstract noise" in rows[name]["note"] and "hooocus setup" in rows[name]["note"]
    for name, path in (("good_sdxl.safetensors", good), ("style.safetensors", lora)):
        assert rows[name]["usable"] and rows[name]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (rows["old.ckpt"]["kind"], rows["old.ckpt"]["usable"]) == ("checkpoints", False)
    assert "pickle" in rows["old.ckpt"]["reason"]
    assert (rows["broken.safetensors"]["kind"], rows["broken.safetensors"]["usable"]) == ("loras", False)
    assert rows["broken.safetensors"]["reason"] and rows["broken.safetensors"]["sha256"] is None
    assert not marker.exists()
    code, out, _err = run(capsys, "models", "--data-dir", data)
    lines = {line.split()[1]: line for line in out.splitlines()}
    assert lines["good_sdxl.safetensors"].endswith(" ok") and "skipped: " in lines["old.ckpt"]
    assert "built in" in lines["demo"] and "abstract noise" in lines["demo"]
    code, out, err = run(capsys, "models", "--data-dir", tmp_path / "empty")
    assert code == 0 and "hooocus setup" in err
    assert [line.split()[:2] for line in out.splitlines()] == [
        ["checkpoints", "demo"], ["checkpoints", "demo-refiner"], ["checkpoints", "demo-flux"],
        ["checkpoints", "demo-flux-dev"]]


def test_config_show_gives_each_value_its_source_and_masks_secrets(capsys: pytest.CaptureFixture[str],
                                                                    tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    toml = tmp_path / "hooocus.toml"
    toml.write_text('port = 9001\nqueue_size = 5\nurl_signing_key = "toml-signing-secret"\n', encoding="utf-8")
    monkeypatch.setenv("HOOOCUS_QUEUE_SIZE", "7")  # env beats toml
    monkeypatch.setenv("HOOOCUS_TOKENS", "alice env-token-secret generate")
    code, out, err = run(capsys, "config", "show", "--json", "--data-dir", tmp_path / "d", "--device", "cpu")
    assert code == 0, err  # ./hooocus.toml is found without --config
    shown = json.loads(out)
    assert shown["port"] == {"value": 9001, "source": f"toml:{Path('hooocus.toml')}"}
    assert shown["queue_size"] == {"value": 7, "source": "env:HOOOCUS_QUEUE_SIZE"}
    assert shown["device"] == {"value": "cpu", "source": "cli"}
    assert shown["data_dir"] == {"value": str(tmp_path / "d"), "source": "cli"}
    assert shown["host"]["source"] == "default"
    assert shown["tokens"]["value"] == shown["url_signing_key"]["value"] == "***"
    code, text, _ = run(capsys, "config", "show")
    assert code == 0 and "secret" not in out + text
    assert "queue_size = 7    # env:HOOOCUS_QUEUE_SIZE" in text.splitlines()
    code, out, err = run(capsys, "config", "show", "--config", tmp_path / "missing.toml")
    assert (code, out) == (2, "") and len(err.strip().splitlines()) == 1


# -- one settings builder, one logging set-up for every command (issue 13.2) -------------------------

SECRET = "hq_Zx8-Secret_Token.value~42"


@pytest.fixture
def restore_logging():
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    root.handlers[:] = [h for h in handlers if not getattr(h, "_hooocus", False)]  # as a fresh process
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.parametrize("argv", [
    ["generate", "a cat", "--model", "demo", "--server", "ws://127.0.0.1:1"],  # refused after set-up
    ["config", "show"],
    ["models"],
    ["mcp", "--connect", "ws://127.0.0.1:1/v1/ws", "--token-env", "HOOOCUS_TEST_UNSET_TOKEN"],
], ids=lambda argv: argv[0])
def test_every_command_logs_to_stderr_through_the_masking_handler(argv: list[str], capsys, tmp_path: Path,
                                                                   monkeypatch, restore_logging) -> None:
    """``hooocus generate`` used ``logging.basicConfig`` (no masking, and a no-op under a host that
    already has handlers); every command now goes through engine.core.logging_setup."""
    import logging

    monkeypatch.chdir(tmp_path)  # no stray hooocus.toml
    monkeypatch.delenv("HOOOCUS_TEST_UNSET_TOKEN", raising=False)
    main([*argv, "--data-dir", str(tmp_path)])
    capsys.readouterr()
    logging.getLogger("hooocus.test").warning("handshake with Bearer %s and ?key=%s", SECRET, SECRET)
    err = capsys.readouterr().err
    assert "Bearer ***" in err and "key=***" in err and SECRET not in err


def test_one_settings_builder_reads_exactly_the_flags_named_like_settings(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["serve", "--port", "0", "--allowed-host", "a.example", "--allowed-host",
                                      "b.example", "--model", "demo", "--data-dir", str(tmp_path)])
    settings, sources = settings_from_args(args, env={})
    assert (settings.port, settings.allowed_hosts, settings.data_dir) == (0, ("a.example", "b.example"), tmp_path)
    assert sources["port"] == sources["allowed_hosts"] == "cli" and sources["default_model"] == "default"
    args = build_parser().parse_args(["generate", "a cat", "--steps", "3", "--device", "cpu"])
    settings, sources = settings_from_args(args, env={"HOOOCUS_PORT": "9000"})
    assert (settings.device, settings.port, sources["port"]) == ("cpu", 9000, "env:HOOOCUS_PORT")


def test_exit_codes_come_from_the_engine_errors() -> None:
    from engine.core.errors import EXIT_FAILED, EXIT_USAGE, HooocusError, UsageError, exit_code_for

    assert exit_code_for(UsageError("bad flag")) == EXIT_USAGE == 2
    assert exit_code_for(HooocusError("x", code="unknown_style")) == EXIT_USAGE
    # serve on a public address without tokens: a start-up configuration to fix, with its specific code
    assert exit_code_for(UsageError("no tokens", code="unauthorized")) == EXIT_USAGE
    # a server's refusal (generate --server with a wrong token) is a failure
    assert exit_code_for(HooocusError("x", code="unauthorized")) == EXIT_FAILED == 1
    assert exit_code_for(HooocusError("x", code="out_of_memory")) == EXIT_FAILED
