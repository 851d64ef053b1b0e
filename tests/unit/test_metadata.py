"""engine.io.metadata: the writer's conditional rules, the reader's quirks, and the request policy."""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import replace
from pathlib import Path

import pytest

from engine.core.errors import InvalidRequest
from engine.io.metadata import (
    MetadataInput,
    build_metadata_list,
    extract_styles_from_prompt,
    metadata_text,
    parameters_to_request,
    parse_parameters,
    request_from_log_block,
    to_a1111_scheme,
)
from engine.prompts.styles import StyleLibrary


def _input(**changes) -> MetadataInput:
    base = MetadataInput(
        prompt="a cat", negative_prompt="", expansion="", styles=[], performance="Speed", steps=30, width=1152,
        height=896, cfg=4, sharpness=2, adm=(1.5, 0.8, 0.3), base_model="base.safetensors", base_model_hash="aaaaaaaaaa",
        full_prompt=["a cat"], full_negative_prompt=[""], seed=5, sampler="dpmpp_2m_sde_gpu", scheduler="karras",
        version="Hooocus v0", metadata_scheme="fooocus")
    return replace(base, **changes)


def _keys(inp: MetadataInput) -> list[str]:
    return [key for _label, key, _value in build_metadata_list(inp)]


@pytest.fixture(scope="module")
def styles(fooocus_data: Path) -> StyleLibrary:
    return StyleLibrary.load([fooocus_data / "sdxl_styles"], builtin=False)


def test_conditional_entries_follow_spec_13_1() -> None:
    assert "overwrite_switch" not in _keys(_input(overwrite_switch=12))  # no refiner
    assert "refiner_swap_method" not in _keys(_input(refiner_swap_method="vae"))
    with_refiner = _input(refiner_model="r.safetensors", refiner_model_hash="bbbbbbbbbb", overwrite_switch=12,
                          refiner_swap_method="vae")
    assert {"overwrite_switch", "refiner_swap_method"} <= set(_keys(with_refiner))
    assert "overwrite_switch" not in _keys(replace(with_refiner, overwrite_switch=0))
    assert "refiner_swap_method" not in _keys(replace(with_refiner, refiner_swap_method="joint"))
    assert "adaptive_cfg" not in _keys(_input(adaptive_cfg=7)) and "adaptive_cfg" in _keys(_input(adaptive_cfg=7.5))
    assert "clip_skip" not in _keys(_input(clip_skip=1)) and "clip_skip" in _keys(_input(clip_skip=2))
    assert "freeu" not in _keys(_input()) and "freeu" in _keys(_input(freeu=(1, 1, 1, 1)))
    values = {key: value for _l, key, value in build_metadata_list(_input(metadata_scheme=None))}
    assert values["metadata_scheme"] is False
    assert values["guidance_scale"] == 4.0 and str(values["guidance_scale"]) == "4.0"  # ints print as Fooocus floats
    assert values["vae"] == "Default (model)" and values["refiner_model"] == "None"


def test_fooocus_v2_is_prepended_only_when_the_expansion_ran() -> None:
    styles = ["Fooocus Sharp", "Fooocus V2"]
    ran = {k: v for _l, k, v in build_metadata_list(_input(styles=styles, expansion="a cat, word"))}
    skipped = {k: v for _l, k, v in build_metadata_list(_input(styles=styles, expansion=""))}
    assert ran["styles"] == "['Fooocus V2', 'Fooocus Sharp']"
    assert skipped["styles"] == "['Fooocus Sharp']"


def test_a1111_sampler_names_and_karras_rule() -> None:
    def line(sampler: str, scheduler: str) -> str:
        inp = _input(sampler=sampler, scheduler=scheduler)
        return to_a1111_scheme(build_metadata_list(inp), inp).splitlines()[-1]

    assert "Sampler: DPM++ 2M SDE Karras," in line("dpmpp_2m_sde_gpu", "karras")
    assert "Sampler: Euler," in line("euler", "karras")  # CIVITAI_NO_KARRAS
    assert "Sampler: DPM++ 2M SDE," in line("dpmpp_2m_sde_gpu", "exponential")
    # spec §13.6: reading maps the name back to the FIRST matching key, so _gpu is lost.
    text = metadata_text(_input(metadata_scheme="a1111"))
    assert parse_parameters(text, "a1111")["sampler"] == "dpmpp_2m_sde"


def test_a1111_negative_line_only_when_there_is_a_negative() -> None:
    assert "Negative prompt:" not in metadata_text(_input(metadata_scheme="a1111"))
    text = metadata_text(_input(metadata_scheme="a1111", full_negative_prompt=["ugly", "bad"]))
    assert text.splitlines()[1] == "Negative prompt: ugly, bad"


def test_plain_a1111_text() -> None:
    """Genuine A1111 parameters: no Raw prompt, labels Fooocus does not know, no Performance."""
    text = ("masterpiece, a cat, (fluffy:1.2)\nNegative prompt: lowres, bad hands\n"
            "Steps: 4, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 123, Size: 1000x1000, "
            "Model hash: abc, Model: sdxl_base, Denoising strength: 0.5, Hires upscale: 2")
    parsed = parse_parameters(text)
    assert parsed["prompt"] == "masterpiece, a cat, (fluffy:1.2)"
    assert parsed["negative_prompt"] == "lowres, bad hands"
    assert (parsed["sampler"], parsed["steps"], parsed["resolution"]) == ("dpmpp_2m", "4", "('1000', '1000')")
    assert parsed["performance"] == "Lightning"  # spec §9: performance from steps (4 -> Lightning first)
    assert "Denoising strength" not in json.dumps(parsed) and parsed["styles"] == "[]"
    request, warnings = parameters_to_request(parsed, known_models=["juggernaut.safetensors"])
    assert (request.width, request.height, request.steps, request.cfg) == (1000, 1000, None, 7.0)
    assert request.base_model is None and any("sdxl_base" in w for w in warnings)


def test_text_without_parameter_line_is_all_prompt() -> None:
    assert parse_parameters("just a prompt, with: colons, and commas")["prompt"] == \
        "just a prompt, with: colons, and commas"


def test_style_extraction_recovers_negative_only_and_prompt_styles(styles: StyleLibrary) -> None:
    positive, negative = [], []
    for name in ("Fooocus Enhance", "Fooocus Sharp"):
        p, n = styles.apply_style(name, "a cat")
        positive += p
        negative += n
    found, prompt, rest = extract_styles_from_prompt(", ".join(positive), ", ".join(negative), styles)
    assert (found, prompt, rest) == (["Fooocus Enhance", "Fooocus Sharp"], "a cat", "")
    # A user negative after the style negatives stops the peeling, as in Fooocus.
    assert extract_styles_from_prompt(", ".join(positive), ", ".join([*negative, "ugly"]), styles)[0] == []


def test_a1111_styles_round_trip_with_fooocus_v2_quirk(styles: StyleLibrary) -> None:
    p, n = styles.apply_style("Fooocus Sharp", "a cat")
    inp = _input(metadata_scheme="a1111", styles=["Fooocus Sharp"], full_prompt=p, full_negative_prompt=n)
    parsed = parse_parameters(metadata_text(inp), "a1111", styles=styles)
    # [quirk] spec §13.6: a style changed the text, so Fooocus adds 'Fooocus V2' although none ran.
    assert parsed["styles"] == "['Fooocus Sharp', 'Fooocus V2']"
    assert parsed["prompt"] == "a cat"


def test_fooocus_scheme_names_not_installed() -> None:
    text = metadata_text(_input(vae="v.safetensors", loras=[("l.safetensors", 0.5, "cccccccccc")]))
    fooocus = parse_parameters(text, "fooocus", model_filenames=["other.safetensors"])
    assert fooocus["base_model"] is None and fooocus["vae"] is None and fooocus["lora_combined_1"] is None
    kept = parse_parameters(text, "fooocus", keep_unknown_names=True)
    assert (kept["base_model"], kept["vae"], kept["lora_combined_1"]) == ("base", "v", "l : 0.5")
    found = parse_parameters(text, "fooocus", model_filenames=["base.safetensors"], lora_filenames=["l.safetensors"])
    assert (found["base_model"], found["lora_combined_1"]) == ("base.safetensors", "l.safetensors : 0.5")
    a1111 = metadata_text(replace(_input(metadata_scheme="a1111"), loras=[("l.safetensors", 0.5, "cccccccccc")]))
    assert "lora_combined_1" not in parse_parameters(a1111, "a1111")  # Fooocus: only LoRAs found locally
    assert parse_parameters(a1111, "a1111", keep_unknown_names=True)["lora_combined_1"] == "l : 0.5"


def test_request_policy_for_missing_names_and_limits() -> None:
    parsed = {
        "prompt": "p", "base_model": "gone.safetensors", "refiner_model": "None", "vae": "Default (model)",
        "performance": "Lightning", "steps": 4, "resolution": "(1001, 1003)", "seed": "-4",
        "lora_combined_1": "sdxl_lightning_4step_lora.safetensors : 1.0",
        "lora_combined_2": "missing.safetensors : 0.3", "lora_combined_3": "big.safetensors : 3.5",
        **{f"lora_combined_{n}": f"l{n}.safetensors : 0.1" for n in range(4, 10)},
    }
    known_loras = ["big.safetensors", *(f"l{n}.safetensors" for n in range(4, 10))]
    request, warnings = parameters_to_request(parsed, known_models=["base.safetensors"], known_loras=known_loras)
    assert request.base_model is None and request.vae is None and request.refiner_model is None
    assert request.steps is None and request.performance == "Lightning"
    assert (request.width, request.height) == (1000, 1000)
    assert request.seed is None
    assert [lora.name for lora in request.loras] == ["big.safetensors", "l4.safetensors", "l5.safetensors",
                                                     "l6.safetensors", "l7.safetensors"]
    assert request.loras[0].weight == 2.0
    joined = " | ".join(warnings)
    for fragment in ("gone.safetensors", "missing.safetensors", "3.5", "more than 5", "seed", "1001"):
        assert fragment in joined
    assert "lightning" not in joined.lower()  # the performance LoRA is skipped silently
    # Only what the metadata holds is set, so a caller's own values can go on top.
    assert set(request.model_dump(exclude_unset=True)) == {"prompt", "performance", "width", "height", "loras"}


def test_unchecked_names_are_kept() -> None:
    request, warnings = parameters_to_request({"base_model": "juggernautXL_v8Rundiffusion",
                                               "lora_combined_1": "offset : 0.1"})
    assert (request.base_model, request.loras[0].name, warnings) == ("juggernautXL_v8Rundiffusion", "offset", [])


def test_log_block_forms(styles: StyleLibrary) -> None:
    entry = {"prompt": "a fox", "seed": "77", "styles": "['Fooocus V2']", "resolution": "(1024, 1024)"}
    plain, _ = request_from_log_block(json.dumps(entry))
    encoded, _ = request_from_log_block(urllib.parse.quote(json.dumps(entry)))
    html = f"<html><body><button onclick=\"to_clipboard('{urllib.parse.quote(json.dumps(entry))}')\"></body></html>"
    from_html, _ = request_from_log_block(html)
    assert plain == encoded == from_html
    assert (plain.prompt, plain.seed, plain.styles, plain.aspect_ratio) == ("a fox", 77, ["Fooocus V2"], "1024*1024")
    a1111, _ = request_from_log_block("a fox\nSteps: 30, Sampler: Euler, Seed: 3, Size: 1152x896", styles=styles)
    # [quirk] Fooocus's style recovery returns its real_prompt, '' for a plain text with no style,
    # no expansion and no repeated first word; only a 'Raw prompt' field would restore it.
    assert (a1111.prompt, a1111.seed, a1111.sampler, a1111.aspect_ratio) == ("", 3, "euler", "1152*896")
    for bad, message in (("", "empty"), ("{not json", "JSON"), ("<html><body></body></html>", "no parameter")):
        with pytest.raises(InvalidRequest, match=message):
            request_from_log_block(bad)
    with pytest.raises(InvalidRequest, match="entry 3"):
        request_from_log_block(html, index=3)


def test_bad_values_are_warnings_not_crashes() -> None:
    request, warnings = parameters_to_request({"steps": "many", "styles": "__import__('os')", "sampler": "magic",
                                               "resolution": "(1,)", "freeu": "nope", "performance": "Turbo"})
    assert request == parameters_to_request({})[0]
    assert len(warnings) == 6


def test_unknown_choices_are_named_in_warnings_and_known_ones_are_kept() -> None:
    bad = {"performance": "Turbo", "sampler": "magic", "scheduler": "odd", "refiner_swap_method": "x",
           "inpaint_method": "Paint", "inpaint_engine_version": "v9"}
    request, warnings = parameters_to_request(bad)
    assert request == parameters_to_request({})[0]
    assert warnings == [f"unknown {key} {value!r}; using the default" for key, value in list(bad.items())[:5]] + [
        "unknown inpaint_engine_version 'v9'; using the mode's engine"]
    good = {"performance": "Quality", "sampler": "euler", "scheduler": "karras", "inpaint_method": "Inpaint or Outpaint (default)",
            "inpaint_engine_version": "v2.6"}
    request, warnings = parameters_to_request(good)
    assert warnings == []
    assert (request.performance, request.sampler, request.scheduler, request.inpaint_mode, request.inpaint_engine) == (
        "Quality", "euler", "karras", "Inpaint or Outpaint (default)", "v2.6")


def test_a1111_quotes_values_with_a_colon() -> None:
    """spec §13.3: ',' '\\n' or ':' quote a value; one LoRA's 'name: hash' has only the colon."""
    inp = _input(metadata_scheme="a1111", prompt="ratio 16:9", loras=[("one.safetensors", 0.5, "dddddddddd")])
    line = metadata_text(inp).splitlines()[-1]
    assert 'Raw prompt: "ratio 16:9"' in line and 'Lora hashes: "one: dddddddddd"' in line
    parsed = parse_parameters(metadata_text(inp), "a1111", lora_filenames=["one.safetensors"])
    assert (parsed["prompt"], parsed["lora_combined_1"]) == ("ratio 16:9", "one.safetensors : 0.5")


# Hand-derived from Fooocus's rule (issue 12): json.dumps(text, ensure_ascii=False) when the value
# holds ',', a newline or ':'; otherwise the text as is.
@pytest.mark.parametrize(("value", "expected"), [
    ("日本, 東京", '"日本, 東京"'),
    ("café: crème\n", '"café: crème\\n"'),
    ("naïve", "naïve"),
    ('a "b", c', '"a \\"b\\", c"'),
])
def test_a1111_quote_keeps_non_ascii(value: str, expected: str) -> None:
    from engine.io.metadata.write import _a1111_quote

    assert _a1111_quote(value) == expected


class _TinyStyles:
    """A three-style library for hand-derived recovery cases (library order A, B, C)."""

    TEMPLATES = {"A": ("photo of {prompt}, sharp", "blurry"), "B": ("{prompt}, cinematic", "ugly"),
                 "C": ("art", "")}

    def names(self) -> list[str]:
        return list(self.TEMPLATES)

    def apply_style(self, name: str, prompt: str) -> tuple[list[str], list[str]]:
        positive, negative = self.TEMPLATES[name]
        return positive.replace("{prompt}", prompt).splitlines(), negative.splitlines()


# Each expected result was worked out by hand from Fooocus's unwrap/extract rules as issue 12
# states them (find-based left/right split, restart after each match, first-inner real_prompt,
# first-word-repeat rule, reversed list) — not produced by our code.
STYLE_RECOVERY_CASES = [
    # Styles B then A on "a cat" plus an expansion: A unwraps first (its negative ends the text),
    # leaving "a cat, cinematic, , a cat, very detailed"; B then leaves ", a cat, very detailed".
    ("a cat, cinematic, photo of a cat, sharp, a cat, very detailed", "ugly, blurry",
     (["Fooocus V2", "B", "A"], "a cat", "")),
    # A then B: B's right part ", cinematic" is found after A's text, so B's inner swallows A.
    ("photo of a cat, sharp, a cat, cinematic, a cat, very detailed", "blurry, ugly",
     (["Fooocus V2", "B"], "photo of a cat, sharp, a cat", "blurry")),
    # A template without {prompt} must end the text; then the first word "a dog" repeats.
    ("a dog, a dog, shiny, art", "", (["Fooocus V2", "C"], "a dog", "")),
    # Nothing matches and no first word repeats: real_prompt stays ''.
    ("a red car", "", ([], "", "")),
]


@pytest.mark.parametrize(("prompt", "negative", "expected"), STYLE_RECOVERY_CASES)
def test_style_recovery_follows_fooocus_unwrap(prompt: str, negative: str,
                                               expected: tuple[list[str], str, str]) -> None:
    assert extract_styles_from_prompt(prompt, negative, _TinyStyles()) == expected
