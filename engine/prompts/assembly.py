"""One request -> per-image prompt tasks, exactly like Fooocus's ``process_prompt`` (spec §2.1–2.2).

Pure and torch-free: styles, wildcards and the Fooocus V2 expansion come in as explicit objects
(the expansion as a plain ``(prompt, seed) -> str`` callable, or None), so this is testable with
stubs and the golden data.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.core.constants import FOOOCUS_V2_STYLE, MAX_LORAS, RANDOM_STYLE, SEED_MODULUS
from engine.prompts.inline_loras import LoraEntry, parse_lora_references
from engine.prompts.styles import StyleLibrary
from engine.prompts.wildcards import WildcardLibrary, apply_arrays, apply_wildcards

if TYPE_CHECKING:
    from engine.sdxl.resolve import ResolvedRequest

Expansion = Callable[[str, int], str]

#: spec §2.2.11: |cfg - 1| below this encodes the negative as a copy of the positive.
CFG_ONE_TOLERANCE = 1e-4


def safe_str(text: str) -> str:
    """spec §2.1.1: collapse double spaces (16 passes), strip ',. \\r\\n' from both ends."""
    for _ in range(16):
        text = text.replace("  ", " ")
    return text.strip(",. \r\n")


def remove_empty_str(items: Sequence[str], default: str | None = None) -> list[str]:
    """Drop '' entries; an empty result becomes ``[default]`` unless default is None."""
    kept = [item for item in items if item != ""]
    if not kept and default is not None:
        return [default]
    return kept


@dataclass(frozen=True)
class PromptTask:
    """The texts for one image (Fooocus's task dict, spec §2.2)."""

    index: int
    task_seed: int
    task_prompt: str
    task_negative_prompt: str
    #: Texts encoded one by one and concatenated along tokens (spec §3.5); the expansion is last.
    positive: list[str]
    negative: list[str]
    #: How many leading texts feed the pooled vector (the expansion never does).
    positive_top_k: int
    negative_top_k: int
    expansion: str
    #: Applied styles, 'Random Style' replaced by the pick; without 'Fooocus V2'.
    styles: list[str]
    log_positive_prompt: str
    log_negative_prompt: str
    extra_positive_prompts: list[str] = field(default_factory=list)
    extra_negative_prompts: list[str] = field(default_factory=list)
    #: spec §2.2.11: cfg == 1, so the negative conditioning is a copy of the positive one.
    negative_is_positive: bool = False


@dataclass(frozen=True)
class PromptPlan:
    tasks: list[PromptTask]
    #: UI LoRAs + inline ``<lora:...>`` references (spec §2.1.3) + the performance LoRAs.
    loras: list[LoraEntry]
    #: The expansion actually ran (asked for, callable present, main prompt not empty).
    use_expansion: bool
    #: 'Fooocus V2' was asked for but no expansion callable was given (assets missing).
    expansion_skipped: bool = False


def process_prompt(
    prompt: str,
    negative_prompt: str = "",
    *,
    styles: Sequence[str] = (),
    seed: int,
    image_number: int = 1,
    style_library: StyleLibrary,
    wildcards: WildcardLibrary | None = None,
    expansion: Expansion | None = None,
    use_expansion: bool | None = None,
    loras: Sequence[LoraEntry] = (),
    performance_loras: Sequence[LoraEntry] = (),
    available_loras: Sequence[str] = (),
    max_loras: int = MAX_LORAS,
    disable_seed_increment: bool = False,
    read_wildcards_in_order: bool = False,
    cfg: float = 4.0,
) -> PromptPlan:
    """Fooocus ``process_prompt`` (spec §1 step 1 and §2.1–2.2).

    ``styles`` are the caller's names (canonical), in order; 'Fooocus V2' in them switches the
    expansion on unless ``use_expansion`` says otherwise. ``available_loras`` are the LoRA file
    names inline references may pick from; ``performance_loras``' files are never picked inline.
    """
    wants_expansion = FOOOCUS_V2_STYLE in styles if use_expansion is None else use_expansion
    template_styles = [s for s in styles if s != FOOOCUS_V2_STYLE]

    # spec §2.1.2: lines, cleaned; first line is the main prompt.
    prompts = remove_empty_str([safe_str(line) for line in prompt.splitlines()], default="")
    negatives = remove_empty_str([safe_str(line) for line in negative_prompt.splitlines()], default="")
    main_prompt, main_negative = prompts[0], negatives[0]
    extra_positive, extra_negative = prompts[1:], negatives[1:]

    # spec §2.1.3-4: inline LoRAs from the first line only, before wildcards.
    parsed_loras, main_prompt = parse_lora_references(
        main_prompt, loras, max_loras=max_loras, available_names=available_loras,
        skip_names=[name for name, _ in performance_loras])
    all_loras = parsed_loras + [(name, float(weight)) for name, weight in performance_loras]
    expansion_skipped = wants_expansion and main_prompt != "" and expansion is None
    run_expansion = wants_expansion and main_prompt != "" and expansion is not None
    negative_is_positive = abs(float(cfg) - 1.0) < CFG_ONE_TOLERANCE

    tasks = []
    for i in range(image_number):
        task_seed = (seed if disable_seed_increment else seed + i) % SEED_MODULUS
        rng = random.Random(task_seed)
        # spec §2.2.2: one rng, shared in this order.
        task_prompt = apply_arrays(apply_wildcards(main_prompt, rng, i, read_wildcards_in_order, wildcards), i)
        task_negative = apply_wildcards(main_negative, rng, i, read_wildcards_in_order, wildcards)
        task_extra_positive = [apply_wildcards(t, rng, i, read_wildcards_in_order, wildcards) for t in extra_positive]
        task_extra_negative = [apply_wildcards(t, rng, i, read_wildcards_in_order, wildcards) for t in extra_negative]

        positive: list[str] = []
        negative: list[str] = []
        task_styles = list(template_styles)
        if task_styles:  # spec §2.2.5
            placeholder_used = False
            for j, name in enumerate(task_styles):
                if name == RANDOM_STYLE:
                    name = task_styles[j] = style_library.random_style(rng)
                p_lines, n_lines = style_library.apply_style(name, task_prompt)
                placeholder_used = placeholder_used or style_library.get(name).has_placeholder
                positive += p_lines
                negative += n_lines
            if not placeholder_used:
                positive = [task_prompt, *positive]
        else:
            positive = [task_prompt]
        negative.append(task_negative)  # spec §2.2.6: the user negative always comes after styles
        positive = remove_empty_str(positive + task_extra_positive, default=task_prompt)
        negative = remove_empty_str(negative + task_extra_negative, default=task_negative)

        expanded = expansion(task_prompt, task_seed) if run_expansion and expansion is not None else ""
        tasks.append(PromptTask(
            index=i,
            task_seed=task_seed,
            task_prompt=task_prompt,
            task_negative_prompt=task_negative,
            positive=positive + [expanded] if run_expansion else positive,
            negative=negative,
            positive_top_k=len(positive),  # spec §2.2.9-10: counted before the expansion
            negative_top_k=len(negative),
            expansion=expanded,
            styles=task_styles,
            log_positive_prompt="\n".join([task_prompt, *task_extra_positive]),
            log_negative_prompt="\n".join([task_negative, *task_extra_negative]),
            extra_positive_prompts=task_extra_positive,
            extra_negative_prompts=task_extra_negative,
            negative_is_positive=negative_is_positive,
        ))
    return PromptPlan(tasks=tasks, loras=all_loras, use_expansion=run_expansion,
                      expansion_skipped=expansion_skipped)


def process_resolved(resolved: ResolvedRequest, *, style_library: StyleLibrary,
                     wildcards: WildcardLibrary | None, expansion: Expansion | None,
                     available_loras: Sequence[str] = ()) -> PromptPlan:
    """:func:`process_prompt` for a :class:`~engine.sdxl.resolve.ResolvedRequest` (the pipeline's call)."""
    return process_prompt(
        resolved.prompt, resolved.negative_prompt, styles=resolved.styles, seed=resolved.seed,
        image_number=resolved.image_number, style_library=style_library, wildcards=wildcards,
        expansion=expansion if resolved.use_expansion else None, use_expansion=resolved.use_expansion,
        loras=resolved.user_loras,
        performance_loras=[resolved.performance_lora] if resolved.performance_lora else [],
        available_loras=available_loras, disable_seed_increment=resolved.disable_seed_increment,
        read_wildcards_in_order=resolved.read_wildcards_in_order, cfg=resolved.cfg)
