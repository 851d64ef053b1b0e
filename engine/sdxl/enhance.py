"""Fooocus's Enhance on the SDXL runner (spec §12.6, issue 16): orchestration only.

One job with ``request.enhance``:

1. The images to enhance: the job's generation (the request without ``enhance``, run by the runner's
   own path), or ``input_image`` alone (enhance-only: no generation, as Fooocus's Enhance tab with an
   uploaded image).
2. For each image, in order: the optional Upscale/Vary "Before First Enhancement"; each tab: its
   mask (:class:`engine.masking.service.MaskGenerator`), erode/dilate, invert, then an inpaint pass
   with the tab's prompt (empty = the job's prompt), engine, strength, respective field and
   disable-initial-latent; the optional Upscale/Vary "After Last Enhancement" with the original or
   the last filled tab prompts.
3. Every pass is one run of the runner's own UOV or inpaint path on a step request: ``image_number``
   1, seed increment off, the job's seed (spec §12.6 "Seeds"; a random seed is drawn once for the
   whole job), no image prompts (Fooocus's enhance goals have no ControlNet/IP tasks).
4. A tab is skipped with a ``enhance_skipped`` warning when SAM found nothing (no box, or no mask
   applied, as Fooocus) or the prepared mask has no pixel > 127 (our inpaint path would otherwise fall
   back to text-to-image).

Outputs: each pass's image is an ``image`` event of the job (indices in emission order), after the
generated image, as Fooocus shows intermediate results. With ``save_only_final`` only each image's
last result is returned (the generated image when every pass was skipped; nothing for an enhance-only
job where every pass was skipped, with a warning). Cancel is checked by every pass's sampler step and
before and after every mask.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from engine.core.constants import MAX_SEED
from engine.core.events import ImageReady
from engine.core.request import UOV_DISABLED, EnhanceOptions, EnhanceTab, GenerationRequest
from engine.imaging.masks import erode_or_dilate, invert_mask, needs_inpaint
from engine.sdxl.resolve import inpaint_params

if TYPE_CHECKING:
    from engine.core.jobs import RunContext

log = logging.getLogger("hooocus.enhance")

#: Stand-ins for the step request's image fields: the step's pixels are in its context's inputs.
STEP_IMAGE_REF = "enhance:image"
STEP_MASK_REF = "enhance:mask"
UOV_AFTER = "After Last Enhancement"
LAST_FILLED = "Last Filled Enhancement Prompts"
#: Step request fields reset so a pass is a plain single-image UOV or inpaint.
_STEP_RESET: dict[str, Any] = {
    "enhance": None, "image_number": 1, "disable_seed_increment": True, "image_prompts": [],
    "inpaint_mask": None, "inpaint_mask_upload": None, "outpaint_selections": [], "uov_method": UOV_DISABLED,
    "inpaint_additional_prompt": "", "inpaint_erode_or_dilate": 0, "invert_mask": False,
}


class StepContext:
    """A pass's view of the job's :class:`RunContext`: its own request and pixels; one ``started``
    for the whole job; images renumbered (and held back under ``save_only_final``); the last
    image's pixels kept for the next pass (the runner calls :meth:`keep_rgb` before ``image``)."""

    def __init__(self, outer: RunContext, run: EnhanceRun, request: GenerationRequest,
                 inputs: dict[str, np.ndarray], *, emit: bool) -> None:
        self._outer = outer
        self._run = run
        self.request = request
        self.inputs = inputs
        self.emit = emit
        self.first_index = run.next_index  # progress/preview of this pass name the image it makes
        self.image_indices = None
        #: False: the runner drops the synthetic refiner for this pass (see EnhanceRun.synthetic_refiner).
        self.synthetic_refiner: bool | None = None
        self.rgbs: list[np.ndarray] = []
        self.events: list[ImageReady] = []

    def __getattr__(self, name: str) -> Any:  # job, job_id, cancel, failure: the job's own
        return getattr(self._outer, name)

    def check_cancelled(self) -> None:
        self._outer.check_cancelled()

    def started(self, params: dict[str, Any], seeds: Any, total_steps: int) -> None:
        if not self._run.started:
            self._run.started = True
            # The generation's steps, plus about as many again for every pass of every image (a pass
            # runs the mode's steps; Upscale passes run its UOV steps): progress totals for the doors.
            opts = self._run.options
            passes = len(opts.tabs) + (opts.uov_method != UOV_DISABLED)
            self._outer.started({**params, "enhance": opts.model_dump(mode="json")}, seeds,
                                total_steps * (1 + passes))

    def progress(self, step: int, total_steps: int, *, stage: str = "sample", image_index: int = 0,
                 image_count: int = 1) -> None:
        self._outer.progress(step, total_steps, stage=stage, image_index=self.first_index + image_index,
                             image_count=image_count)

    def preview(self, rgb: Any, *, step: int, image_index: int = 0) -> None:
        self._outer.preview(rgb, step=step, image_index=self.first_index + image_index)

    def warning(self, code: str, message: str) -> None:
        self._outer.warning(code, message)

    def keep_rgb(self, rgb: np.ndarray) -> None:
        self.rgbs.append(rgb)

    def image(self, image: ImageReady) -> None:
        self.events.append(image)
        if self.emit:
            self._run.publish(image)


class EnhanceRun:
    """The state of one enhance job (see the module docstring)."""

    def __init__(self, runner: Any, ctx: RunContext) -> None:
        self.runner = runner
        self.ctx = ctx
        request = ctx.request
        assert request.enhance is not None
        self.options: EnhanceOptions = request.enhance
        seed = request.seed if request.seed is not None else secrets.randbelow(MAX_SEED + 1)
        self.request = request.model_copy(update={"seed": seed})
        self.seed = seed
        self.started = False
        # [quirk] Fooocus decides the synthetic refiner once per task, from the job's own image task
        # (async_worker apply_image_input: an inpaint with an engine and no refiner model), and its enhance
        # passes reuse that decision (process_enhance -> process_prompt(use_synthetic_refiner)): after a
        # text-to-image, Vary/Upscale or enhance-only job the passes keep the inpaint patch for every step.
        # Copied under fooocus_quirks; off = each pass decides as a plain inpaint job does.
        settings = getattr(runner, "settings", None)
        quirks = bool(getattr(settings, "fooocus_quirks", True))
        main_synthetic = (request.image_task == "inpaint" and request.refiner_model in (None, "None")
                          and inpaint_params(request).engine != "None")
        self.synthetic_refiner: bool | None = main_synthetic if quirks else None
        self.next_index = 0

    def publish(self, image: ImageReady) -> None:
        self.ctx.image(replace(image, index=self.next_index))
        self.next_index += 1

    # -- the job ------------------------------------------------------------------------------

    def run(self) -> None:
        ctx = self.ctx
        ctx.check_cancelled()
        save_only_final = self.options.save_only_final
        if self.request.enhance_only:
            # No generation: the job starts here (a job whose passes all skip still has a started event).
            self.started = True
            ctx.started({"task": "enhance", "prompt": self.request.prompt,
                         "negative_prompt": self.request.negative_prompt, "seed": str(self.seed),
                         "enhance": self.options.model_dump(mode="json")}, (self.seed,), 0)
            images = [(ctx.inputs["input_image"], None)]
        else:
            gen = StepContext(ctx, self, self.request.model_copy(update={"enhance": None}), dict(ctx.inputs),
                              emit=not save_only_final)
            self.runner._run(gen)
            images = list(zip(gen.rgbs, gen.events, strict=True))
        for rgb, generated in images:
            final = self._enhance_one(rgb)
            if save_only_final:
                if final is not None:
                    self.publish(final)
                elif generated is not None:
                    self.publish(generated)
                else:
                    ctx.warning("enhance_skipped", "every enhance pass was skipped: no image to return")

    def _enhance_one(self, rgb: np.ndarray) -> ImageReady | None:
        """Every pass on one image; the last pass's image (None when none ran)."""
        opts = self.options
        last: ImageReady | None = None
        uov = opts.uov_method != UOV_DISABLED
        uov_after = uov and opts.uov_processing_order == UOV_AFTER
        prompt, negative = self.request.prompt, self.request.negative_prompt
        last_prompt, last_negative = prompt, negative
        emit_now = not opts.save_only_final
        passes: list[tuple[str, int]] = ([] if not uov or uov_after else [("uov", -1)])
        passes += [("tab", index) for index in range(len(opts.tabs))] + ([("uov", -1)] if uov_after else [])
        for kind, index in passes:
            self.ctx.check_cancelled()
            out: tuple[np.ndarray, ImageReady] | None
            if kind == "uov":
                use_last = uov_after and opts.uov_prompt_type == LAST_FILLED
                out = self._uov_pass(rgb, last_prompt if use_last else prompt,
                                     last_negative if use_last else negative, emit_now=emit_now)
            else:
                tab = opts.tabs[index]
                out = self._tab_pass(rgb, tab, index, emit_now=emit_now)
                if out is not None:
                    # Fooocus keeps the prompts the last pass that ran used, after the fallback to the
                    # job's prompts (async_worker: last_enhance_prompt = the processed tab prompt if not '').
                    used_prompt, used_negative = self._tab_prompts(tab)
                    last_prompt = used_prompt or last_prompt
                    last_negative = used_negative or last_negative
            if out is not None:
                rgb, last = out
        return last

    def _step(self, update: dict[str, Any], inputs: dict[str, np.ndarray], *, emit: bool
              ) -> tuple[np.ndarray, ImageReady]:
        request = self.request.model_copy(update={**_STEP_RESET, "seed": self.seed, **update})
        step = StepContext(self.ctx, self, request, inputs, emit=emit)
        step.synthetic_refiner = self.synthetic_refiner
        self.runner._run(step)
        if not step.rgbs:  # the runner always makes one image per pass; a bug otherwise
            raise RuntimeError("an enhance pass made no image")
        return step.rgbs[-1], step.events[-1]

    def _tab_prompts(self, tab: EnhanceTab) -> tuple[str, str]:
        """The tab's prompt and negative prompt; an empty (or blank) one falls back to the job's
        (Fooocus prepare_enhance_prompt)."""
        return (tab.prompt if tab.prompt.strip() else self.request.prompt,
                tab.negative_prompt if tab.negative_prompt.strip() else self.request.negative_prompt)

    def _uov_pass(self, rgb: np.ndarray, prompt: str, negative: str, *, emit_now: bool
                  ) -> tuple[np.ndarray, ImageReady]:
        update = {"uov_method": self.options.uov_method, "input_image": STEP_IMAGE_REF, "prompt": prompt,
                  "negative_prompt": negative}
        return self._step(update, {"input_image": rgb}, emit=emit_now)

    def _tab_pass(self, rgb: np.ndarray, tab: EnhanceTab, index: int, *, emit_now: bool
                  ) -> tuple[np.ndarray, ImageReady] | None:
        found = self.runner.enhance_masks().make(rgb, tab, box_grow_px=self.options.box_erode_or_dilate)
        self.ctx.check_cancelled()
        what = f"enhance tab {index + 1}"
        if tab.mask_model == "sam":
            log.info("%s: %s boxes detected for %r, %s segments, %s applied", what, found.boxes_found,
                     tab.detection_prompt, found.masks_made, found.masks_applied)
            if found.nothing_found:
                self.ctx.warning("enhance_skipped", f"{what}: no {tab.detection_prompt!r} detected; pass skipped")
                return None
        mask = erode_or_dilate(found.mask, tab.erode_or_dilate)
        if tab.invert:
            mask = invert_mask(mask)
        if not needs_inpaint(mask):
            self.ctx.warning("enhance_skipped", f"{what}: the mask is empty; pass skipped")
            return None
        prompt, negative = self._tab_prompts(tab)
        update = {"input_image": STEP_IMAGE_REF, "inpaint_mask": STEP_MASK_REF, "prompt": prompt,
                  "negative_prompt": negative,
                  "inpaint_mode": "Inpaint or Outpaint (default)", "inpaint_engine": tab.inpaint_engine,
                  "inpaint_strength": tab.strength, "inpaint_respective_field": tab.respective_field,
                  "inpaint_disable_initial_latent": tab.disable_initial_latent}
        return self._step(update, {"input_image": rgb, "inpaint_mask": mask}, emit=emit_now)
