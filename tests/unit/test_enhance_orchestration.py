"""engine/sdxl/enhance.py's rules with a recording stand-in for the runner (no models): each pass's
step request (prompt fallback, the tab's inpaint fields, seed, one image, no image prompts), the pass
order for "Before First" / "After Last", "Last Filled Enhancement Prompts", the mask preparation
(erode/dilate, invert, skip on an empty mask) and what ``save_only_final`` returns."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace
from typing import Any

import numpy as np

from engine.core.events import ImageReady, JobWarning, Started
from engine.core.jobs import Job, RunContext
from engine.core.request import GenerationRequest
from engine.masking.service import MaskResult
from engine.sdxl.enhance import EnhanceRun
from tests.engine.demo import StubEngine

IMG = "sha256:" + "0" * 64


class _Masks:
    def __init__(self, mask: np.ndarray) -> None:
        self.mask = mask
        self.seen: list[Any] = []

    def make(self, rgb: np.ndarray, tab: Any, *, box_grow_px: int = 0) -> MaskResult:
        self.seen.append((tab.detection_prompt, box_grow_px))
        return MaskResult(self.mask.copy(), None, None, None)


class RecordingRunner:
    """Stands in for SDXLRunner: each ``_run`` records the step request and its inputs and makes one
    image whose pixels are the input + 1 (so the chain of passes is visible)."""

    def __init__(self, mask: np.ndarray, *, fooocus_quirks: bool = True) -> None:
        self.steps: list[tuple[GenerationRequest, dict[str, np.ndarray]]] = []
        self.synthetic: list[bool | None] = []
        self.masks = _Masks(mask)
        self.settings = SimpleNamespace(fooocus_quirks=fooocus_quirks)

    def enhance_masks(self) -> _Masks:
        return self.masks

    def _run(self, ctx: Any) -> None:
        self.steps.append((ctx.request, dict(ctx.inputs)))
        self.synthetic.append(getattr(ctx, "synthetic_refiner", None))
        ctx.started({"task": "step"}, (ctx.request.seed,), 1)
        count = 1 if ctx.request.input_image else ctx.request.image_number
        for index in range(count):
            base = ctx.inputs.get("input_image", np.zeros((8, 8, 3), np.uint8))
            rgb = (base.astype(np.int32) + 1 + index).clip(0, 255).astype(np.uint8)
            ctx.keep_rgb(rgb)
            data = rgb.tobytes()
            ctx.image(ImageReady(job_id="", index=index, seed=ctx.request.seed + index, data=data,
                                 sha256=hashlib.sha256(data).hexdigest(), width=8, height=8))


def _run(fields: dict[str, Any], mask: np.ndarray | None = None, inputs: dict[str, np.ndarray] | None = None,
         *, fooocus_quirks: bool = True) -> tuple[RecordingRunner, Job]:
    runner = RecordingRunner(np.full((8, 8), 255, np.uint8) if mask is None else mask, fooocus_quirks=fooocus_quirks)
    job = Job("j", GenerationRequest.parse({"prompt": "a fox", "negative_prompt": "blur", "seed": 7, **fields}),
              "local")
    EnhanceRun(runner, RunContext(job, StubEngine(), inputs=inputs or {})).run()  # type: ignore[arg-type]
    return runner, job


def _images(job: Job) -> list[ImageReady]:
    return [e for e in job.events_after(0) if isinstance(e, ImageReady)]


def test_tab_step_requests_carry_the_tab_fields_and_the_job_seed() -> None:
    tabs = [{"detection_prompt": "face", "prompt": "detailed face", "inpaint_engine": "v1", "strength": 0.4,
             "respective_field": 0.3, "disable_initial_latent": True},
            {"detection_prompt": "hand"}]
    runner, job = _run({"image_number": 2, "image_prompts": [{"image": IMG}], "enhance": {"tabs": tabs,
                                                                                       "box_erode_or_dilate": 5}})
    generation, *passes = runner.steps
    assert generation[0].enhance is None and generation[0].image_number == 2 and generation[0].image_prompts
    assert len(passes) == 4  # 2 images x 2 tabs
    first = passes[0][0]
    assert (first.prompt, first.negative_prompt) == ("detailed face", "blur")  # empty negative -> the job's
    assert (first.inpaint_engine, first.inpaint_strength, first.inpaint_respective_field,
            first.inpaint_disable_initial_latent) == ("v1", 0.4, 0.3, True)
    assert first.inpaint_mode == "Inpaint or Outpaint (default)" and first.uov_method == "Disabled"
    assert passes[1][0].prompt == "a fox"  # the second tab has no prompt: the job's
    for request, inputs in passes:
        assert request.seed == 7 and request.image_number == 1 and request.disable_seed_increment
        assert request.image_prompts == [] and request.enhance is None and "inpaint_mask" in inputs
    assert runner.masks.seen == [("face", 5), ("hand", 5)] * 2
    # each pass works on the previous result: image 2 of the generation is base + 2, its passes +1 each
    assert passes[2][1]["input_image"][0, 0, 0] == 2 and passes[3][1]["input_image"][0, 0, 0] == 3
    assert [e.index for e in _images(job)] == [0, 1, 2, 3, 4, 5]
    (started,) = [e for e in job.events_after(0) if isinstance(e, Started)]
    assert started.total_steps == 1 * (1 + 2)  # the generation's steps + as many again per pass
    assert started.params["enhance"]["box_erode_or_dilate"] == 5


def test_uov_after_uses_the_last_filled_prompts_when_asked() -> None:
    tabs = [{"detection_prompt": "face", "prompt": "detailed face", "negative_prompt": "ugly"},
            {"detection_prompt": "hand"}]
    filled = [{"detection_prompt": "hand"}, {"detection_prompt": "face", "prompt": "detailed face",
                                              "negative_prompt": "ugly"}]
    # Fooocus keeps the prompts the last pass used after the fallback: a last tab without its own
    # prompt hands on the job's prompts, not an earlier tab's.
    for tab_list, prompt_type, expected in ((tabs, "Original Prompts", ("a fox", "blur")),
                                            (filled, "Last Filled Enhancement Prompts", ("detailed face", "ugly")),
                                            (tabs, "Last Filled Enhancement Prompts", ("a fox", "blur"))):
        runner, _job = _run({"enhance": {"tabs": tab_list, "uov_method": "Upscale (2x)",
                                         "uov_processing_order": "After Last Enhancement",
                                         "uov_prompt_type": prompt_type}})
        kinds = ["uov" if r.uov_method != "Disabled" else "tab" for r, _ in runner.steps[1:]]
        assert kinds == ["tab", "tab", "uov"]
        uov = runner.steps[-1][0]
        assert (uov.prompt, uov.negative_prompt) == expected and uov.uov_method == "Upscale (2x)"
    before, _job = _run({"enhance": {"tabs": tabs, "uov_method": "Vary (Strong)"}})
    assert [r.uov_method for r, _ in before.steps[1:]] == ["Vary (Strong)", "Disabled", "Disabled"]
    assert before.steps[1][0].prompt == "a fox"


def test_mask_preparation_and_empty_mask_skip() -> None:
    corner = np.zeros((8, 8), np.uint8)
    corner[3:5, 3:5] = 255  # away from the border (erosion treats outside the image as set)
    runner, job = _run({"enhance": {"tabs": [{"detection_prompt": "face", "erode_or_dilate": -1},
                                             {"detection_prompt": "face", "invert": True}]}}, mask=corner)
    # erode by one: the 2x2 square shrinks to nothing -> skipped; invert: everything but the square
    assert [w.code for w in job.events_after(0) if isinstance(w, JobWarning)] == ["enhance_skipped"]
    (tab_pass,) = runner.steps[1:]
    mask = tab_pass[1]["inpaint_mask"]
    assert (mask[3:5, 3:5] == 0).all() and mask.sum() == (64 - 4) * 255


def test_save_only_final_returns_each_images_last_result() -> None:
    empty = np.zeros((8, 8), np.uint8)
    runner, job = _run({"image_number": 2, "enhance": {"tabs": [{"detection_prompt": "face"}],
                                                       "save_only_final": True}})
    images = _images(job)
    assert [e.index for e in images] == [0, 1] and [e.data[0] for e in images] == [2, 3]  # base+1(+1 gen idx)+1
    _runner, skipped = _run({"enhance": {"tabs": [{"detection_prompt": "face"}], "save_only_final": True}},
                            mask=empty)
    assert [e.data[0] for e in _images(skipped)] == [1]  # every pass skipped: the generated image
    _runner, only = _run({"input_image": IMG, "enhance": {"tabs": [{"detection_prompt": "face"}],
                                                          "save_only_final": True}},
                         mask=empty, inputs={"input_image": np.zeros((8, 8, 3), np.uint8)})
    assert not _images(only)
    assert [w.code for w in only.events_after(0) if isinstance(w, JobWarning)] == ["enhance_skipped"] * 2


def test_passes_keep_the_jobs_synthetic_refiner_decision_under_fooocus_quirks() -> None:
    tabs = {"tabs": [{"detection_prompt": "face"}]}
    after_text, _job = _run({"enhance": tabs})
    assert after_text.synthetic == [None, False]  # the generation decides itself; the pass: no synthetic refiner
    image = {"input_image": np.zeros((8, 8, 3), np.uint8), "inpaint_mask": np.full((8, 8), 255, np.uint8)}
    after_inpaint, _job = _run({"input_image": IMG, "inpaint_mask": IMG, "enhance": tabs}, inputs=image)
    assert after_inpaint.synthetic == [None, True]  # an inpaint job with an engine and no refiner: kept
    no_engine, _job = _run({"input_image": IMG, "inpaint_mask": IMG, "inpaint_engine": "None", "enhance": tabs},
                           inputs=image)
    assert no_engine.synthetic == [None, False]
    plain, _job = _run({"enhance": tabs}, fooocus_quirks=False)
    assert plain.synthetic == [None, None]  # quirks off: each pass decides as a plain inpaint job
