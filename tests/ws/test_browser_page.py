"""The page's issue-14 features in headless Chromium against a real uvicorn and a FakeRunner: the
Advanced panel and the style picker into the generate message, the gallery from GET /v1/jobs with
"use these parameters", a dropped Fooocus PNG filling the form (POST /v1/parameters), and an inpaint
job from an uploaded image and a mask painted with the pointer.

What the page sent is read where it lands: the Job's request (and, for the mask, the decoded arrays
the runner gets in ``RunContext.inputs``), not from the page's own DOM.
"""

from __future__ import annotations

import base64
import json
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from PIL import Image

from engine.core.history import JobHistory
from engine.core.jobs import RunContext
from engine.core.testing import FakeRunner
from engine.io.metadata import request_from_image
from tests.paths import refdata_dir
from tests.ws.browser import ActionChains, By, Select, WebDriverWait, chromium_browser, connect_page, status  # noqa: F401 (fixture)
from tests.ws.conftest import ALICE, auth, make_app, make_runtime, start_server

pytestmark = pytest.mark.browser


FOOOCUS_PNG = refdata_dir() / "metadata" / "case1_fooocus_png.png"


@dataclass
class PageRunner(FakeRunner):
    """A FakeRunner that offers LoRAs and a refiner (the plain one lists none) and keeps the image
    inputs each job's runner got."""

    inputs_seen: list[dict[str, np.ndarray]] = field(default_factory=list)

    def options(self) -> dict[str, object]:
        return {**super().options(), "loras": ["detail.safetensors", "ink.safetensors"], "refiners": ["demo"]}

    def run(self, ctx: RunContext) -> None:
        self.inputs_seen.append(dict(getattr(ctx, "inputs", {})))
        super().run(ctx)


def chips(browser: Any) -> list[str]:
    return [c.get_attribute("data-style") for c in browser.find_elements(By.CSS_SELECTOR, "#style-chips .chip")]


def value(browser: Any, element_id: str) -> str:
    return browser.find_element(By.ID, element_id).get_attribute("value")


def set_value(browser: Any, element_id: str, text: str) -> None:
    element = browser.find_element(By.ID, element_id)
    element.clear()
    element.send_keys(text)


def generate_and_wait(browser: Any, wait: WebDriverWait) -> None:
    browser.find_element(By.ID, "generate").click()
    wait.until(lambda d: status(d).startswith(("done", "failed", "error")))
    assert status(browser).startswith("done"), status(browser)


def test_advanced_panel_and_style_picker_go_into_the_request(browser, tmp_path, live_factory):
    live = live_factory(make_runtime(tmp_path, PageRunner()))
    wait = connect_page(browser, live.http_url + "/", "adv-sampler")
    # Style search: filters as you type, a click picks, the chip's x removes.
    set_value(browser, "style-search", "sharp")
    shown = browser.execute_script("return Array.from(document.querySelectorAll('#styles option'))"
                                   ".filter(o => !o.hidden).map(o => o.value)")
    assert shown == ["Fooocus Sharp"]
    browser.find_element(By.CSS_SELECTOR, "#styles option[value='Fooocus Sharp']").click()
    set_value(browser, "style-search", "enh")
    browser.find_element(By.CSS_SELECTOR, "#styles option[value='Fooocus Enhance']").click()
    assert chips(browser) == ["Fooocus Sharp", "Fooocus Enhance"]  # picked order: Fooocus applies styles in order
    set_value(browser, "style-search", "")
    browser.find_element(By.CSS_SELECTOR, "#style-chips .chip[data-style='Fooocus Enhance'] button").click()
    assert chips(browser) == ["Fooocus Sharp"]
    browser.find_element(By.CSS_SELECTOR, "#styles option[value='Fooocus Enhance']").click()
    browser.find_element(By.CSS_SELECTOR, "#styles option[value='Fooocus Sharp']").click()  # a click unpicks
    browser.find_element(By.CSS_SELECTOR, "#styles option[value='Fooocus Sharp']").click()
    assert chips(browser) == ["Fooocus Enhance", "Fooocus Sharp"]

    browser.find_element(By.CSS_SELECTOR, "#advanced summary").click()
    Select(browser.find_element(By.ID, "adv-model")).select_by_value("demo")
    Select(browser.find_element(By.ID, "adv-refiner")).select_by_value("demo")
    set_value(browser, "adv-refiner-switch", "0.7")
    Select(browser.find_elements(By.CSS_SELECTOR, "#loras .lora-name")[0]).select_by_value("ink.safetensors")
    weight = browser.find_elements(By.CSS_SELECTOR, "#loras .lora-weight")[0]
    weight.clear()
    weight.send_keys("-0.5")
    Select(browser.find_element(By.ID, "adv-sampler")).select_by_value("euler")
    Select(browser.find_element(By.ID, "adv-scheduler")).select_by_value("normal")
    for element_id, text in (("adv-steps", "3"), ("adv-cfg", "7.5"), ("adv-sharpness", "5"), ("adv-clip-skip", "1"),
                             ("adv-adm-positive", "1.2"), ("adv-adm-end", "0.4"), ("adv-freeu-b1", "1.1")):
        set_value(browser, element_id, text)
    browser.find_element(By.ID, "adv-freeu").click()
    Select(browser.find_element(By.ID, "adv-format")).select_by_visible_text("webp")
    browser.find_element(By.ID, "prompt").send_keys("a tiny test")
    generate_and_wait(browser, wait)

    request = live.runtime.engine.jobs()[-1].request
    assert request.styles == ["Fooocus Enhance", "Fooocus Sharp"]
    assert (request.base_model, request.refiner_model, request.refiner_switch) == ("demo", "demo", 0.7)
    assert [(lora.name, lora.weight, lora.enabled) for lora in request.loras] == [("ink.safetensors", -0.5, True)]
    assert (request.sampler, request.scheduler, request.steps, request.cfg, request.sharpness) == (
        "euler", "normal", 3, 7.5, 5.0)
    assert (request.clip_skip, request.adm_scaler_positive, request.adm_scaler_end) == (1, 1.2, 0.4)
    assert request.freeu is not None and request.freeu.enabled and request.freeu.b1 == 1.1
    assert request.output_format == "webp"
    # Untouched fields are not sent (a server preset still applies to them).
    assert not {"adm_scaler_negative", "adaptive_cfg", "vae", "width"} & request.model_fields_set


def test_gallery_lists_this_tokens_jobs_and_reuses_their_parameters(browser, tmp_path):
    runtime = make_runtime(tmp_path, PageRunner())
    history = JobHistory(tmp_path / "history.sqlite3")
    live = start_server(make_app(runtime, history=history), runtime)
    try:
        first = {"prompt": "first job", "seed": 11, "steps": 2, "cfg": 6.5, "sampler": "euler",
                 "styles": ["Fooocus Sharp"], "image_number": 2}
        for body in (first, {"prompt": "second job", "steps": 1}):
            post = urllib.request.Request(live.http_url + "/v1/generate", data=json.dumps(body).encode(),
                                          headers={**auth(ALICE), "Content-Type": "application/json"})
            with urllib.request.urlopen(post, timeout=20) as response:
                assert json.load(response)["state"] == "done"
        wait = connect_page(browser, live.http_url + "/", "adv-sampler")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery figure")) == 2)
        figures = browser.find_elements(By.CSS_SELECTOR, "#gallery figure")
        assert "second job" in figures[0].text and "first job" in figures[1].text  # newest first
        # Images come through the token (fetch -> blob:), decoded, with a download link each.
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery figure a.download")) == 3)
        images = browser.find_elements(By.CSS_SELECTOR, "#gallery img")
        assert len(images) == 3 and all(img.get_attribute("src").startswith("blob:") for img in images)
        assert all(browser.execute_script("return arguments[0].naturalWidth", img) > 0 for img in images)

        figures[1].find_element(By.CSS_SELECTOR, ".use-params").click()
        assert value(browser, "prompt") == "first job" and value(browser, "seed") == "11"
        assert value(browser, "adv-cfg") == "6.5" and value(browser, "adv-sampler") == "euler"
        assert chips(browser) == ["Fooocus Sharp"]
        generate_and_wait(browser, wait)
        again = runtime.engine.jobs()[-1].request
        assert {key: getattr(again, key) for key in first} == first  # the same job, asked for again
        # The gallery refreshes after a job: the new one is first.
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery figure")) == 3)
    finally:
        live.stop()


_DROP_SCRIPT = """
    const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));
    const transfer = new DataTransfer();
    transfer.items.add(new File([bytes], arguments[1], { type: "image/png" }));
    document.body.dispatchEvent(new DragEvent("drop", { dataTransfer: transfer, bubbles: true, cancelable: true }));
"""


def test_dropping_a_fooocus_png_fills_the_form(browser, tmp_path, live_factory):
    runner = PageRunner()
    live = live_factory(make_runtime(tmp_path, runner))
    wait = connect_page(browser, live.http_url + "/", "adv-sampler")
    data = FOOOCUS_PNG.read_bytes()
    browser.execute_script(_DROP_SCRIPT, base64.b64encode(data).decode(), FOOOCUS_PNG.name)
    wait.until(lambda d: status(d).startswith(("parameters loaded", "cannot load")))
    assert status(browser).startswith("parameters loaded"), status(browser)
    options = runner.options()
    expected, notes = request_from_image(data, known_models=options["models"], known_loras=options["loras"],
                                         known_styles=options["styles"])
    assert value(browser, "prompt") == expected.prompt and value(browser, "seed") == str(expected.seed)
    assert chips(browser) == expected.styles
    assert value(browser, "aspect") == expected.aspect_ratio
    # The file's checkpoint and LoRA are not on this server: said, not sent.
    shown = [w.text for w in browser.find_elements(By.CSS_SELECTOR, "#warnings li")]
    assert notes and shown == [f"parameters: {note}" for note in notes]
    generate_and_wait(browser, wait)
    request = live.runtime.engine.jobs()[-1].request
    assert (request.prompt, request.seed, request.styles, request.aspect_ratio) == (
        expected.prompt, expected.seed, expected.styles, expected.aspect_ratio)


def test_page_inpaints_with_a_painted_mask(browser, tmp_path, live_factory):
    """Needs POST /v1/uploads (imgdoors) and the request's image fields (pipewire)."""
    runner = PageRunner()
    live = live_factory(make_runtime(tmp_path, runner))
    wait = connect_page(browser, live.http_url + "/", "adv-sampler")
    picture = tmp_path / "input.png"
    Image.new("RGB", (256, 192), (40, 120, 200)).save(picture)
    browser.find_element(By.ID, "image-file").send_keys(str(picture))
    wait.until(lambda d: status(d).startswith(("image ready", "upload failed")))
    assert status(browser) == "image ready", status(browser)
    assert browser.find_element(By.ID, "input-ref").text.startswith("input image sha256:")
    mask = browser.find_element(By.ID, "mask")
    wait.until(lambda d: mask.get_attribute("width") == "256")
    # The image is shown at its own size (256x192 < 512), so page pixels are image pixels.
    ActionChains(browser).move_to_element_with_offset(mask, -88, 0).click_and_hold() \
        .move_by_offset(80, 0).move_by_offset(80, 0).release().perform()  # y=96, x from 40 to 200
    browser.find_element(By.ID, "prompt").send_keys("a boat")
    generate_and_wait(browser, wait)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results figure img"))

    request = live.runtime.engine.jobs()[-1].request
    assert request.input_image.startswith("sha256:") and request.inpaint_mask.startswith("sha256:")
    assert request.uov_method == "Disabled" and request.outpaint_selections == []
    inputs = runner.inputs_seen[-1]
    assert inputs["input_image"].shape == (192, 256, 3)
    painted = inputs["inpaint_mask"]
    assert painted.shape == (192, 256)
    # The stroke: a 32 px wide line from x=40 to x=200 at y=96 (round caps). Well inside it is
    # painted; outside the line and its caps (16 px radius) nothing is.
    assert (painted[90:103, 45:196] > 127).all()
    assert (painted[:70] == 0).all() and (painted[122:] == 0).all() and (painted[:, :20] == 0).all()


def test_describe_button_fills_the_prompt_and_styles(browser, tmp_path, live_factory, describe_models_dir):
    """Issue 16: the Describe button sends the uploaded image to the tiny tagger (the real loaders)
    and fills the prompt and the styles this server offers; the next generate carries them."""
    from engine.core.settings import Settings
    from engine.describe.service import Describer

    runtime = make_runtime(tmp_path, PageRunner())
    runtime.describer = Describer(Settings(data_dir=describe_models_dir.parent, device="cpu"),
                                  resolve_image=runtime.engine.resolve_inputs.resolve_one,
                                  device_lock=runtime.engine.device_lock)
    try:
        live = live_factory(runtime)
        wait = connect_page(browser, live.http_url + "/", "adv-sampler")
        picture = tmp_path / "blue.png"
        Image.new("RGB", (64, 48), (0, 0, 255)).save(picture)
        browser.find_element(By.ID, "image-file").send_keys(str(picture))
        wait.until(lambda d: status(d).startswith(("image ready", "upload failed")))
        Select(browser.find_element(By.ID, "describe-mode")).select_by_value("both")
        browser.find_element(By.ID, "describe").click()
        wait.until(lambda d: status(d).startswith(("described", "describe failed")))
        assert status(browser) == "described (both)", status(browser)
        # Both: the BLIP caption (random words from the tiny model), then the tagger's tags.
        tags = "hatsune miku, smile, ribbon \\(hair\\), blue theme"
        prompt = value(browser, "prompt")
        assert prompt.endswith(", " + tags) and len(prompt) > len(tags) + 2
        # Fooocus's styles for both are V2, Enhance, Sharp, Masterpiece; this server (no expansion,
        # no Masterpiece style) offers Enhance and Sharp of them, and only those are picked.
        assert chips(browser) == ["Fooocus Enhance", "Fooocus Sharp"]
        Select(browser.find_element(By.ID, "uov")).select_by_visible_text("Vary (Subtle)")
        generate_and_wait(browser, wait)
        request = live.runtime.engine.jobs()[-1].request
        assert request.prompt == prompt and list(request.styles) == ["Fooocus Enhance", "Fooocus Sharp"]
    finally:
        runtime.describer.close()


def test_page_sends_image_prompt_slots(browser, tmp_path, live_factory):
    """Issue 16: a picked file in an Image Prompt slot is uploaded and sent as image_prompts[i] with its
    type, weight and stop; the runner gets the decoded pixels under the slot's field path."""
    runner = PageRunner()
    live = live_factory(make_runtime(tmp_path, runner))
    wait = connect_page(browser, live.http_url + "/", "adv-sampler")
    picture = tmp_path / "ref.png"
    Image.new("RGB", (48, 40), (200, 30, 30)).save(picture)
    rows = browser.find_elements(By.CSS_SELECTOR, ".ip-slot")
    assert len(rows) == 4
    rows[1].find_element(By.CSS_SELECTOR, ".ip-file").send_keys(str(picture))
    Select(rows[1].find_element(By.CSS_SELECTOR, ".ip-type")).select_by_visible_text("CPDS")
    rows[1].find_element(By.CSS_SELECTOR, ".ip-weight").send_keys("0.7")
    browser.find_element(By.ID, "prompt").send_keys("a boat")
    generate_and_wait(browser, wait)
    (slot,) = live.runtime.engine.jobs()[-1].request.image_prompts
    assert slot.image.startswith("sha256:") and slot.type == "CPDS" and slot.weight == 0.7 and slot.stop_at is None
    assert runner.inputs_seen[-1]["image_prompts.0.image"].shape == (40, 48, 3)


def test_page_sends_the_enhance_panel(browser, tmp_path, live_factory):
    """Issue 16: the ticked Enhance panel becomes the request's ``enhance`` (tabs without a detection
    text are left out, a rembg tab needs none); with an uploaded image and no other task the job is
    enhance-only on that image."""
    runner = PageRunner()
    live = live_factory(make_runtime(tmp_path, runner))
    wait = connect_page(browser, live.http_url + "/", "adv-sampler")
    browser.find_element(By.ID, "enhance-on").click()
    rows = browser.find_elements(By.CSS_SELECTOR, ".enh-tab")
    assert len(rows) == 3  # Fooocus's default_enhance_tabs
    rows[0].find_element(By.CSS_SELECTOR, ".enh-detect").send_keys("face")
    rows[0].find_element(By.CSS_SELECTOR, ".enh-prompt").send_keys("detailed face")
    rows[0].find_element(By.CSS_SELECTOR, ".enh-strength").send_keys("0.5")
    Select(rows[2].find_element(By.CSS_SELECTOR, ".enh-mask-model")).select_by_visible_text("u2net")
    rows[2].find_element(By.CSS_SELECTOR, ".enh-invert").click()
    Select(browser.find_element(By.ID, "enhance-uov")).select_by_visible_text("Upscale (2x)")
    Select(browser.find_element(By.ID, "enhance-uov-order")).select_by_visible_text("After Last Enhancement")
    browser.find_element(By.ID, "prompt").send_keys("a boat")
    generate_and_wait(browser, wait)
    enhance = live.runtime.engine.jobs()[-1].request.enhance
    assert enhance is not None and enhance.uov_method == "Upscale (2x)"
    assert enhance.uov_processing_order == "After Last Enhancement" and not enhance.save_only_final
    assert [(t.mask_model, t.detection_prompt, t.prompt, t.strength, t.invert) for t in enhance.tabs] == [
        ("sam", "face", "detailed face", 0.5, False), ("u2net", "", "", 1.0, True)]

    picture = tmp_path / "input.png"
    Image.new("RGB", (64, 48), (40, 120, 200)).save(picture)
    browser.find_element(By.ID, "image-file").send_keys(str(picture))
    wait.until(lambda d: status(d).startswith(("image ready", "upload failed")))
    browser.find_element(By.ID, "enhance-final-only").click()
    generate_and_wait(browser, wait)
    request = live.runtime.engine.jobs()[-1].request
    assert request.enhance_only and request.enhance.save_only_final
    assert runner.inputs_seen[-1]["input_image"].shape == (48, 64, 3)
