"""resolve_request: Fooocus's handler order (spec §1 steps 1–7), seeds (spec §15), public echo."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from engine.core.constants import MAX_SEED
from engine.core.errors import UnknownLora, UnknownStyle
from engine.core.request import GenerationRequest
from engine.prompts.assembly import process_resolved
from engine.prompts.styles import StyleLibrary
from engine.sdxl.modes import performance_for_steps
from engine.sdxl.resolve import ResolvedRequest, resolve_request

LIBRARY = StyleLibrary.load([])  # our own set: loads a packaged file, fast


def _resolve(rng: random.Random | None = None, fooocus_quirks: bool = True, **fields: Any) -> ResolvedRequest:
    fields.setdefault("seed", 7)
    return resolve_request(GenerationRequest(**fields), default_model="base.safetensors",
                           default_styles=("Hooocus Enhance", "Hooocus Sharp"), style_library=LIBRARY,
                           rng=rng or random.Random(0), fooocus_quirks=fooocus_quirks)


def test_defaults() -> None:
    resolved = _resolve()
    assert (resolved.width, resolved.height, resolved.steps, resolved.switch_step) == (1152, 896, 30, 15)
    assert resolved.styles == ("Hooocus Enhance", "Hooocus Sharp") and not resolved.use_expansion
    assert (resolved.base_model, resolved.refiner_model, resolved.performance_lora) == ("base.safetensors", None, None)
    assert (resolved.cfg, resolved.sharpness, resolved.sampler, resolved.scheduler) == (4.0, 2.0, "dpmpp_2m_sde_gpu",
                                                                                       "karras")
    assert resolved.denoise == 1.0 and resolved.seeds == (7,)


@pytest.mark.parametrize(("performance", "steps"), [("Quality", 60), ("Speed", 30), ("Extreme Speed", 8),
                                                    ("Lightning", 4), ("Hyper-SD", 4)])
def test_steps_per_mode_and_override(performance: str, steps: int) -> None:
    assert _resolve(performance=performance).steps == steps
    assert _resolve(performance=performance, steps=13).steps == 13


def test_fast_mode_overrides_and_lora_order() -> None:
    resolved = _resolve(performance="lightning", cfg=9.0, sharpness=5.0, refiner_model="r.safetensors",
                        loras=[{"name": "a.safetensors", "weight": 0.5}, {"name": "off.safetensors", "enabled": False},
                               {"name": "None"}])
    assert (resolved.performance, resolved.sampler, resolved.scheduler, resolved.cfg, resolved.sharpness) == \
        ("Lightning", "euler", "sgm_uniform", 1.0, 0.0)
    assert (resolved.refiner_model, resolved.refiner_switch, resolved.switch_step) == (None, 1.0, 4)
    assert resolved.user_loras == (("a.safetensors", 0.5),)
    assert resolved.loras == (("a.safetensors", 0.5), ("sdxl_lightning_4step_lora.safetensors", 1.0))


def test_refiner_equal_to_base_is_dropped() -> None:
    assert _resolve(base_model="m.safetensors", refiner_model="m.safetensors").refiner_model is None
    assert _resolve(refiner_model="None").refiner_model is None
    assert _resolve(refiner_model="r.safetensors").refiner_model == "r.safetensors"


@pytest.mark.parametrize(("steps", "switch", "expected"), [(30, 0.5, 15), (30, 0.8, 24), (25, 0.5, 12),
                                                           (27, 0.5, 14), (60, 0.75, 45)])
def test_switch_step_rounds_like_python(steps: int, switch: float, expected: int) -> None:
    # int(round(x)) with Python's round-half-to-even (12.5 -> 12, 13.5 -> 14).
    assert _resolve(steps=steps, refiner_switch=switch, fooocus_quirks=False).switch_step == expected
    assert _resolve(steps=steps, refiner_switch=switch, refiner_switch_step=3).switch_step == 3


def test_switch_step_quirk_uses_the_performance_steps() -> None:
    # spec §1 step 7 as Fooocus 2.5.5 runs it (parity runs: 6 overridden steps of Speed -> switch 15)
    assert _resolve(steps=6, refiner_switch=0.5).switch_step == 15
    assert _resolve(steps=6, refiner_switch=0.5, performance="Quality").switch_step == 30
    assert _resolve(steps=6, refiner_switch=0.5, fooocus_quirks=False).switch_step == 3


def test_size_from_width_height_or_aspect_ratio() -> None:
    assert _resolve(aspect_ratio="896*1152").size == (896, 1152)
    assert _resolve(aspect_ratio="896*1152", width=1024, height=512).size == (1024, 512)


def test_seeds() -> None:
    assert _resolve(seed=MAX_SEED - 1, image_number=3).seeds == (MAX_SEED - 1, MAX_SEED, 0)
    assert _resolve(seed=5, image_number=3, disable_seed_increment=True).seeds == (5, 5, 5)
    drawn = resolve_request(GenerationRequest(), default_model="b", default_styles=(), style_library=LIBRARY,
                            rng=random.Random(123))
    assert drawn.seed == random.Random(123).randint(0, MAX_SEED)


def test_styles_checked_and_expansion_flag() -> None:
    resolved = _resolve(styles=["fooocus v2", "hooocus-anime"])
    assert resolved.styles == ("Fooocus V2", "Hooocus Anime") and resolved.use_expansion
    off = resolve_request(GenerationRequest(styles=["Fooocus V2"], seed=1), default_model="b", default_styles=(),
                          style_library=LIBRARY, expansion_available=False)
    assert not off.use_expansion and off.warnings[0][0] == "assets_missing"
    with pytest.raises(UnknownStyle):
        _resolve(styles=["Nope"])


def test_available_loras_canonicalise() -> None:
    resolved = resolve_request(GenerationRequest(seed=1, loras=[{"name": "sunflowers", "weight": 0.7}]),
                               default_model="b", default_styles=(), style_library=LIBRARY,
                               available_loras=["sub/sunflowers.safetensors"])
    assert resolved.user_loras == (("sub/sunflowers.safetensors", 0.7),)
    with pytest.raises(UnknownLora) as info:
        resolve_request(GenerationRequest(seed=1, loras=[{"name": "nope"}]), default_model="b", default_styles=(),
                        style_library=LIBRARY, available_loras=["a.safetensors"])
    assert info.value.loc == ("loras", 0, "name")


def test_public_dict_is_json_safe() -> None:
    resolved = _resolve(seed=MAX_SEED, image_number=2, freeu={"b1": 1.1})
    public = json.loads(json.dumps(resolved.to_public_dict()))
    assert public["seeds"] == [str(MAX_SEED), "0"] and public["seed"] == str(MAX_SEED)
    assert public["freeu"]["b1"] == 1.1 and public["switch_step"] == 15


def test_process_resolved_wires_the_performance_lora() -> None:
    resolved = _resolve(performance="Extreme Speed", prompt="x <lora:sdxl_lcm_lora:0.5> <lora:a:0.3>",
                        styles=["Hooocus Sharp"], loras=[{"name": "b.safetensors", "weight": 0.2}])
    plan = process_resolved(resolved, style_library=LIBRARY, wildcards=None, expansion=None,
                            available_loras=["a.safetensors", "sdxl_lcm_lora.safetensors"])
    # the performance LoRA is never picked inline; it is appended last (spec §2.1.3-4)
    assert plan.loras == [("b.safetensors", 0.2), ("a.safetensors", 0.3), ("sdxl_lcm_lora.safetensors", 1.0)]
    assert plan.tasks[0].task_prompt == "x" and plan.tasks[0].negative_is_positive


def test_performance_for_steps() -> None:
    # spec §9: metadata without a performance field; first match wins (4 steps reads as Lightning).
    assert [performance_for_steps(s) for s in (60, 30, 8, 4, 5)] == ["Quality", "Speed", "Extreme Speed",
                                                                     "Lightning", None]
