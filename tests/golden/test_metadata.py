"""Golden: metadata written, embedded, read and loaded exactly as Fooocus 2.5.5 does (spec §13).

Every case of every ``metadata/*.json`` with a ``cases`` list in $HOOOCUS_REFDATA is checked, and
every ``metadata/*.html`` log. Fooocus's defaults for the fields a case does not override come from
the same folder's ``tables/`` files, not from this test.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import pytest
from PIL import Image

from engine.core.request import GenerationRequest, parse_aspect_ratio
from engine.io.imageio import encode_image, exif_block, read_image_metadata
from engine.io.metadata import (
    A1111_SAMPLER_NAMES,
    CIVITAI_NO_KARRAS,
    MetadataInput,
    build_metadata_list,
    metadata_text,
    parameters_to_request,
    parse_log_html,
    parse_parameters,
    request_from_image,
    request_from_log_block,
)
from engine.prompts.styles import StyleLibrary
from tests.paths import refdata_dir


def _case_files() -> list[Path]:
    folder = refdata_dir() / "metadata"
    return sorted(p for p in folder.glob("*.json") if "cases" in json.loads(p.read_text(encoding="utf-8")))


def _cases() -> list[Any]:
    params = []
    for path in _case_files():
        for case in json.loads(path.read_text(encoding="utf-8"))["cases"]:
            params.append(pytest.param(path, case["label"], id=f"{path.stem}:{case['label']}"))
    return params


def _logs() -> list[Any]:
    return [pytest.param(p, id=p.name) for p in sorted((refdata_dir() / "metadata").glob("*.html"))]


CASES = _cases()
LOGS = _logs()


def _load(path: Path, label: str) -> tuple[dict[str, Any], dict[str, Any]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return data, next(c for c in data["cases"] if c["label"] == label)


@pytest.fixture(scope="module")
def styles(fooocus_data: Path) -> StyleLibrary:
    return StyleLibrary.load([fooocus_data / "sdxl_styles"], builtin=False)


@pytest.fixture(scope="module")
def tables(refdata: Path) -> dict[str, Any]:
    config = json.loads((refdata / "tables" / "config_defaults.json").read_text())["values"]
    modes = {m["name"]: m for m in json.loads((refdata / "tables" / "performance_modes.json").read_text())["modes"]}
    controls = {c["label"]: c["value"] for c in json.loads((refdata / "tables" / "webui_controls.json").read_text())
                ["controls"] if isinstance(c.get("label"), str)}
    return {"config": config, "modes": modes, "controls": controls}


def _files(data: dict[str, Any], kind: str) -> list[str]:
    return [PurePath(k).name for k in data["dummy_files"] if k.startswith(kind + "/")]


def _hash10(data: dict[str, Any], file_name: str) -> str:
    content = next(v for k, v in data["dummy_files"].items() if PurePath(k).name == file_name)
    return hashlib.sha256(content.encode()).hexdigest()[:10]


#: Override keys of the cases whose name differs from the MetadataInput field (or that feed
#: several fields); any other key must be a MetadataInput field and is passed as is.
_RENAMED_OVERRIDES = {"cfg_scale", "refiner_model", "freeu", "size", "adm", "vae", "base_model"}


def _metadata_input(data: dict[str, Any], case: dict[str, Any], tables: dict[str, Any]) -> MetadataInput:
    """The writer's input for a case: its inputs and task, Fooocus defaults for the rest."""
    inputs, task, over = case["inputs"], case["task"], case["inputs"]["overrides"]
    fields = set(MetadataInput.__dataclass_fields__)
    unknown = set(over) - _RENAMED_OVERRIDES - fields
    assert not unknown, f"override keys {unknown} are neither MetadataInput fields nor mapped here"
    config, controls = tables["config"], tables["controls"]
    refiner = over.get("refiner_model", config["default_refiner_model_name"])
    refiner = None if refiner == "None" else refiner
    vae = over.get("vae", config["default_vae"])
    base = over.get("base_model", config["default_base_model_name"])
    metadata = {key: value for _label, key, value in case["log_metadata_list_[label,key,value]"]}
    kwargs: dict[str, Any] = dict(
        prompt=task["log_positive_prompt"], negative_prompt=task["log_negative_prompt"], expansion=task["expansion"],
        styles=inputs["styles"], performance=inputs["performance"],
        steps=tables["modes"][inputs["performance"]]["steps"],
        width=inputs["width"], height=inputs["height"],
        cfg=over.get("cfg_scale", config["default_cfg_scale"]),
        sharpness=config["default_sample_sharpness"],
        adm=tuple(over.get("adm", (controls["Positive ADM Guidance Scaler"], controls["Negative ADM Guidance Scaler"],
                                   controls["ADM Guidance End At Step"]))),
        base_model=base, base_model_hash=_hash10(data, base),
        refiner_model=refiner, refiner_model_hash=_hash10(data, refiner) if refiner else None,
        refiner_switch=config["default_refiner_switch"], refiner_swap_method="joint",
        adaptive_cfg=config["default_cfg_tsnr"], clip_skip=config["default_clip_skip"],
        sampler=config["default_sampler"], scheduler=config["default_scheduler"],
        vae=None if vae == config["default_vae"] else vae, seed=task["task_seed"],
        freeu=(controls["B1"], controls["B2"], controls["S1"], controls["S2"]) if over.get("freeu") else None,
        loras=[(name, weight, _hash10(data, name)) for name, weight in inputs["loras"]],
        full_prompt=task["positive"], full_negative_prompt=task["negative"],
        metadata_scheme=inputs["metadata_scheme"], version=metadata["version"],
        created_by=data["metadata_created_by"])
    kwargs.update({key: value for key, value in over.items() if key not in _RENAMED_OVERRIDES})
    return MetadataInput(**kwargs)


def test_golden_cases_present() -> None:
    assert CASES, f"no metadata cases under {refdata_dir() / 'metadata'}"
    assert LOGS, f"no log.html under {refdata_dir() / 'metadata'}"


def test_a1111_sampler_names_are_fooocus_tables(refdata: Path) -> None:
    flags = json.loads((refdata / "tables" / "flags_and_lists.json").read_text())
    expected = {**flags["KSAMPLER_to_a1111_name"], **flags["SAMPLER_EXTRA_to_a1111_name"]}
    assert list(A1111_SAMPLER_NAMES.items()) == list(expected.items())  # order decides the back-mapping
    assert set(CIVITAI_NO_KARRAS) == set(flags["CIVITAI_NO_KARRAS"])


@pytest.mark.parametrize(("path", "label"), CASES)
def test_metadata_list_and_written_string(path: Path, label: str, tables: dict[str, Any]) -> None:
    data, case = _load(path, label)
    inp = _metadata_input(data, case, tables)
    assert build_metadata_list(inp) == [tuple(item) for item in case["log_metadata_list_[label,key,value]"]]
    assert metadata_text(inp) == case["written_parameters_string"]


def _source_pixels(path: Path) -> np.ndarray:
    """The picture Fooocus saved, losslessly: the pixels of a PNG case in the same file."""
    data = json.loads(path.read_text(encoding="utf-8"))
    png = next((c for c in data["cases"] if c["image_file"].endswith(".png")), None)
    if png is None:
        pytest.skip("no PNG case to take lossless source pixels from")
    return np.asarray(Image.open(path.parent / png["image_file"]).convert("RGB"))


@pytest.mark.parametrize(("path", "label"), CASES)
def test_encoded_file_is_fooocus_file(path: Path, label: str) -> None:
    _data, case = _load(path, label)
    original = (path.parent / case["image_file"]).read_bytes()
    scheme = case["read_info_from_image"]["scheme"]
    fmt = case["inputs"]["output_format"]
    written = case["written_parameters_string"]
    # Fooocus writes its version string as EXIF Software (0x0131): the case's own version entry.
    version = next(v for _label, key, v in case["log_metadata_list_[label,key,value]"] if key == "version")
    # The one exempt difference (docs/exif-text.md): Fooocus's Pillow writes each non-ASCII
    # character of an EXIF ASCII tag as '?', we write UTF-8. With the '?' text everything else
    # must be Fooocus's file byte for byte; ASCII text has no difference at all.
    fooocus_text = fooocus_exif_text(written) if fmt != "png" else written
    if fmt != "png":  # the EXIF block byte for byte (independent of the image codec's version)
        raw = Image.open(io.BytesIO(original)).info["exif"].removeprefix(b"Exif\x00\x00")
        assert exif_block({0x9286: fooocus_text, 0x0131: version, 0x927C: scheme}) == raw
    ours = encode_image(_source_pixels(path), fmt=fmt, parameters=fooocus_text, scheme=scheme,
                        software=version)
    assert ours == original
    if fooocus_text != written:  # and our own file keeps every character
        mine = encode_image(_source_pixels(path), fmt=fmt, parameters=written, scheme=scheme, software=version)
        assert read_image_metadata(mine) == (written, scheme)


def fooocus_exif_text(text: str) -> str:
    """What Pillow 10.4 stores for an EXIF ASCII tag: ``text.encode("ascii", "replace")``."""
    return text.encode("ascii", "replace").decode("ascii")


def test_exif_exemption_is_exactly_the_non_ascii_characters() -> None:
    """The exemption changes nothing for ASCII text and only the non-ASCII characters otherwise."""
    assert fooocus_exif_text("a, b: \"c\"\nSteps: 30") == "a, b: \"c\"\nSteps: 30"
    assert fooocus_exif_text("café 日本") == "caf? ??"  # hand-derived: one '?' per code point
    text = "café, 日本"
    mine = encode_image(np.zeros((8, 8, 3), np.uint8), fmt="jpeg", parameters=text, scheme="a1111")
    assert read_image_metadata(mine) == (text, "a1111")


@pytest.mark.parametrize(("path", "label"), CASES)
def test_read_image_metadata(path: Path, label: str) -> None:
    _data, case = _load(path, label)
    parameters, scheme = read_image_metadata((path.parent / case["image_file"]).read_bytes())
    expected = case["read_info_from_image"]
    assert scheme == expected["scheme"]
    if isinstance(expected["parameters"], dict):
        assert json.loads(parameters) == expected["parameters"]
    else:
        assert parameters == expected["parameters"]


@pytest.mark.parametrize(("path", "label"), CASES)
def test_parse_parameters(path: Path, label: str, styles: StyleLibrary) -> None:
    data, case = _load(path, label)
    parameters, scheme = read_image_metadata((path.parent / case["image_file"]).read_bytes())
    parsed = parse_parameters(parameters, scheme, styles=styles, model_filenames=_files(data, "checkpoints"),
                              lora_filenames=_files(data, "loras"), vae_filenames=_files(data, "vae"))
    assert parsed == case["parsed_back_to_json"]


def _default(field: str) -> Any:
    return GenerationRequest.model_fields[field].get_default(call_default_factory=True)


def _expected_from_ui(ui: list[dict[str, Any]]) -> dict[str, Any]:
    """Fooocus's UI values after "Load Parameters" as request fields. A gradio update (no value)
    means Fooocus keeps what it had: for a fresh request that is the default."""
    values = {item["field"]: item["value"] for item in ui}

    def get(name: str) -> tuple[bool, Any]:
        value = values[name]
        return (False, None) if isinstance(value, dict) and value.get("__gradio_update__") else (True, value)

    expected: dict[str, Any] = {}
    direct = {"prompt": "prompt", "negative_prompt": "negative_prompt", "styles": "styles",
              "performance": "performance", "guidance_scale": "cfg", "sharpness": "sharpness",
              "adm_scaler_positive": "adm_scaler_positive", "adm_scaler_negative": "adm_scaler_negative",
              "adm_scaler_end": "adm_scaler_end", "refiner_swap_method": "refiner_swap_method",
              "adaptive_cfg": "adaptive_cfg", "clip_skip": "clip_skip", "base_model": "base_model",
              "refiner_switch": "refiner_switch", "sampler": "sampler", "scheduler": "scheduler", "seed": "seed",
              "image_number": "image_number"}
    for ui_name, field in direct.items():
        has, value = get(ui_name)
        expected[field] = value if has else _default(field)
    has, step = get("overwrite_step")
    expected["steps"] = None if not has or step == -1 else step
    has, switch = get("overwrite_switch")
    expected["refiner_switch_step"] = None if not has or switch <= 0 else switch
    for ui_name, field, off in (("refiner_model", "refiner_model", "None"), ("vae", "vae", "Default (model)")):
        has, value = get(ui_name)
        expected[field] = None if not has or value == off else value
    has_w, width = get("overwrite_width")
    if has_w and width != -1:
        expected["size"] = (width, get("overwrite_height")[1])
    else:
        has, label = get("aspect_ratio_label")
        expected["size"] = parse_aspect_ratio(label) if has else parse_aspect_ratio(_default("aspect_ratio"))
    has, enabled = get("freeu_enabled")
    expected["freeu"] = ({k: get(f"freeu_{k}")[1] for k in ("b1", "b2", "s1", "s2")} if has and enabled else None)
    loras = []
    for n in range(1, 6):
        name = get(f"lora_{n}_name")[1]
        if name not in (None, "None") and get(f"lora_{n}_enabled")[1]:
            loras.append((name, get(f"lora_{n}_weight")[1]))
    expected["loras"] = loras
    return expected


def _actual(request: GenerationRequest, fields: list[str]) -> dict[str, Any]:
    out = {}
    for field in fields:
        if field == "size":
            out[field] = request.size
        elif field == "freeu":
            out[field] = None if request.freeu is None else {k: getattr(request.freeu, k) for k in ("b1", "b2", "s1", "s2")}
        elif field == "loras":
            out[field] = [(lora.name, lora.weight) for lora in request.loras]
        else:
            out[field] = getattr(request, field)
    return out


@pytest.mark.parametrize(("path", "label"), CASES)
def test_request_from_image_is_what_fooocus_loads(path: Path, label: str, styles: StyleLibrary) -> None:
    data, case = _load(path, label)
    request, warnings = request_from_image(
        (path.parent / case["image_file"]).read_bytes(), styles=styles, known_models=_files(data, "checkpoints"),
        known_loras=_files(data, "loras"), known_vaes=_files(data, "vae"), known_styles=styles.legal_names())
    expected = _expected_from_ui(case["load_parameter_button_click"])
    assert _actual(request, list(expected)) == expected
    assert warnings == []


@pytest.mark.parametrize("log_path", LOGS)
def test_log_html_entries_are_the_metadata_lists(log_path: Path) -> None:
    entries = parse_log_html(log_path.read_text(encoding="utf-8"))
    lists = [{key: value for _label, key, value in case["log_metadata_list_[label,key,value]"]}
             for path in _case_files() for case in json.loads(path.read_text())["cases"]]
    assert len(entries) == len(lists)
    for entry in entries:
        assert lists.count(entry) == 1


@pytest.mark.parametrize(("path", "label"), CASES)
def test_request_from_log_entry_reproduces_the_parameters(path: Path, label: str, tables: dict[str, Any]) -> None:
    """The JSON a Fooocus user copies from log.html gives back every parameter Fooocus wrote."""
    data, case = _load(path, label)
    written = {key: value for _label, key, value in case["log_metadata_list_[label,key,value]"]}
    block = json.dumps(written, indent=0)  # what "Copy to Clipboard" gives (spec §13.5)
    request, warnings = request_from_log_block(block, known_models=_files(data, "checkpoints"),
                                               known_loras=_files(data, "loras"), known_vaes=_files(data, "vae"))
    assert warnings == []
    inp = _metadata_input(data, case, tables)
    assert (request.prompt, request.negative_prompt) == (inp.prompt, inp.negative_prompt)
    assert request.styles == ast.literal_eval(written["styles"])
    assert request.performance == inp.performance
    default_steps = tables["modes"][inp.performance]["steps"]
    assert request.steps == (None if inp.steps == default_steps else inp.steps)
    assert request.size == (inp.width, inp.height)
    assert request.seed == inp.seed
    assert (request.cfg, request.sharpness, request.adaptive_cfg) == (inp.cfg, inp.sharpness, inp.adaptive_cfg)
    assert (request.adm_scaler_positive, request.adm_scaler_negative, request.adm_scaler_end) == inp.adm
    assert (request.sampler, request.scheduler, request.clip_skip) == (inp.sampler, inp.scheduler, inp.clip_skip)
    assert (request.refiner_model, request.refiner_switch) == (inp.refiner_model, inp.refiner_switch)
    assert request.refiner_swap_method == (inp.refiner_swap_method if inp.refiner_model else "joint")
    assert request.vae == inp.vae
    freeu = request.freeu
    assert (None if freeu is None else (freeu.b1, freeu.b2, freeu.s1, freeu.s2)) == inp.freeu
    assert [(lora.name, lora.weight) for lora in request.loras] == [(n, w) for n, w, _h in inp.loras]


@pytest.mark.parametrize("log_path", LOGS)
def test_whole_log_html_gives_each_entry(log_path: Path) -> None:
    text = log_path.read_text(encoding="utf-8")
    entries = parse_log_html(text)
    for index, entry in enumerate(entries):
        from_html = request_from_log_block(text, index=index)
        from_entry = parameters_to_request(entry)
        assert from_html == from_entry
        assert from_html[0].seed == int(entry["seed"])
