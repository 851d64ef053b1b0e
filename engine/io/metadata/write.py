"""Writing: what the pipeline knows after a job -> Fooocus's metadata list -> the fooocus (JSON)
or a1111 (text) scheme string (spec §13.1-§13.3)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.core.constants import (
    FOOOCUS_V2_STYLE,
)
from engine.io.metadata.labels import (
    A1111_LABELS,
    A1111_SAMPLER_NAMES,
    ADAPTIVE_CFG_DEFAULT,
    CIVITAI_NO_KARRAS,
    DEFAULT_VAE_LABEL,
    NEGATIVE_PREFIX,
    MetadataList,
    file_stem,
)


def default_version_string() -> str:
    """'Hooocus v<version>' for the Version field (we write our own name; Fooocus ignores it)."""
    from engine.io.imageio import hooocus_version

    found = hooocus_version()
    return f"Hooocus v{found}" if found else "Hooocus"


# -- writing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MetadataInput:
    """Everything the metadata writer needs about one finished image (one task of a job).

    Model, LoRA and VAE names are file names (``juggernautXL_v8Rundiffusion.safetensors``); the
    writer derives the stems. Numbers are coerced to Fooocus's Python types (floats print as
    ``4.0``), so ``cfg=4`` still writes ``4.0``.
    """

    #: The raw prompt and negative prompt after wildcards and arrays (Fooocus log_*_prompt).
    prompt: str
    negative_prompt: str
    #: The Fooocus V2 expansion, '' when it did not run.
    expansion: str
    #: Style names as used (Random Style resolved); 'Fooocus V2' may be anywhere or absent.
    styles: Sequence[str]
    performance: str
    steps: int
    width: int
    height: int
    cfg: float
    sharpness: float
    adm: tuple[float, float, float]
    base_model: str
    base_model_hash: str
    #: The positive and negative texts that were encoded, expansion included (spec §2.2).
    full_prompt: Sequence[str]
    full_negative_prompt: Sequence[str]
    seed: int
    sampler: str
    scheduler: str
    refiner_model: str | None = None
    refiner_model_hash: str | None = None
    refiner_switch: float = 0.5
    #: Fooocus overwrite_switch (the refiner swap step); written only when > 0 with a refiner.
    overwrite_switch: int = -1
    refiner_swap_method: str = "joint"
    adaptive_cfg: float = ADAPTIVE_CFG_DEFAULT
    clip_skip: int = 2
    #: None = the checkpoint's own VAE (written as 'Default (model)').
    vae: str | None = None
    #: (b1, b2, s1, s2) when FreeU is on.
    freeu: tuple[float, float, float, float] | None = None
    #: (file name, weight, sha256[:10]) for every LoRA that was loaded, in order.
    loras: Sequence[tuple[str, float, str]] = ()
    #: 'fooocus', 'a1111', or None when metadata is off (written as False, spec §13.1).
    metadata_scheme: str | None = "fooocus"
    version: str = field(default_factory=default_version_string)
    created_by: str = ""
    #: Made with the built-in random-weight demo model: recorded so nobody mistakes the image.
    is_demo: bool = False
    #: Inpaint/outpaint: the method and engine (Fooocus's "Load Parameters" reads them back as
    #: inpaint_method / inpaint_engine_version); None for other tasks.
    inpaint_mode: str | None = None
    inpaint_engine: str | None = None
    #: The model family (issue 17): "sdxl" writes Fooocus's list; "flux" writes only what FLUX.1 has
    #: (no negative prompt, sharpness, ADM, refiner, sampler, scheduler, VAE, CLIP skip, FreeU) plus
    #: the family, so a reader knows the image is not an SDXL one.
    family: str = "sdxl"
    #: FLUX.1 [dev]'s distilled guidance (written as guidance_scale, read back as cfg); None for schnell.
    guidance: float | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        for name in ("cfg", "sharpness", "refiner_switch", "adaptive_cfg"):
            set_(self, name, float(getattr(self, name)))
        for name in ("steps", "width", "height", "clip_skip", "overwrite_switch", "seed"):
            set_(self, name, int(getattr(self, name)))
        set_(self, "adm", tuple(float(v) for v in self.adm))
        set_(self, "freeu", None if self.freeu is None else tuple(float(v) for v in self.freeu))
        set_(self, "loras", tuple((str(n), float(w), str(h)) for n, w, h in self.loras))
        set_(self, "styles", tuple(self.styles))
        set_(self, "full_prompt", tuple(self.full_prompt))
        set_(self, "full_negative_prompt", tuple(self.full_negative_prompt))


def _styles_label(inp: MetadataInput) -> list[str]:
    styles = [s for s in inp.styles if s != FOOOCUS_V2_STYLE]
    if inp.expansion and FOOOCUS_V2_STYLE in inp.styles:  # 'Fooocus V2' prepended when it ran
        styles = [FOOOCUS_V2_STYLE, *styles]
    return styles


def _flux_metadata_list(inp: MetadataInput) -> MetadataList:
    """The FLUX.1 list (issue 17): Fooocus's keys for what FLUX.1 has, in Fooocus's order, plus the family."""
    out: MetadataList = [
        ("Prompt", "prompt", inp.prompt),
        ("Fooocus V2 Expansion", "prompt_expansion", inp.expansion),
        ("Styles", "styles", str(_styles_label(inp))),
        ("Steps", "steps", inp.steps),
        ("Resolution", "resolution", str((inp.width, inp.height))),
    ]
    if inp.guidance is not None:
        out.append(("Guidance Scale", "guidance_scale", float(inp.guidance)))
    out += [("Base Model", "base_model", inp.base_model), ("Seed", "seed", str(inp.seed)),
            ("Model Family", "model_family", inp.family)]
    for number, (name, weight, _hash) in enumerate(inp.loras, start=1):
        out.append((f"LoRA {number}", f"lora_combined_{number}", f"{name} : {weight}"))
    scheme = inp.metadata_scheme if inp.metadata_scheme in ("fooocus", "a1111") else False
    out += [("Metadata Scheme", "metadata_scheme", scheme), ("Version", "version", inp.version)]
    return out


def build_metadata_list(inp: MetadataInput) -> MetadataList:
    """spec §13.1: Fooocus's ``(label, key, value)`` list, in its order, with its conditions."""
    if inp.family == "flux":
        return _flux_metadata_list(inp)
    styles = _styles_label(inp)
    refiner = inp.refiner_model if inp.refiner_model not in (None, "", "None") else None
    out: MetadataList = [
        ("Prompt", "prompt", inp.prompt),
        ("Negative Prompt", "negative_prompt", inp.negative_prompt),
        ("Fooocus V2 Expansion", "prompt_expansion", inp.expansion),
        ("Styles", "styles", str(styles)),
        ("Performance", "performance", inp.performance),
        ("Steps", "steps", inp.steps),
        ("Resolution", "resolution", str((inp.width, inp.height))),
        ("Guidance Scale", "guidance_scale", inp.cfg),
        ("Sharpness", "sharpness", inp.sharpness),
        ("ADM Guidance", "adm_guidance", str(inp.adm)),
        ("Base Model", "base_model", inp.base_model),
        ("Refiner Model", "refiner_model", refiner or "None"),
        ("Refiner Switch", "refiner_switch", inp.refiner_switch),
    ]
    if refiner and inp.overwrite_switch > 0:
        out.append(("Overwrite Switch", "overwrite_switch", inp.overwrite_switch))
    if refiner and inp.refiner_swap_method != "joint":
        out.append(("Refiner Swap Method", "refiner_swap_method", inp.refiner_swap_method))
    if inp.adaptive_cfg != ADAPTIVE_CFG_DEFAULT:
        out.append(("CFG Mimicking from TSNR", "adaptive_cfg", inp.adaptive_cfg))
    if inp.clip_skip > 1:
        out.append(("CLIP Skip", "clip_skip", inp.clip_skip))
    out += [
        ("Sampler", "sampler", inp.sampler),
        ("Scheduler", "scheduler", inp.scheduler),
        ("VAE", "vae", inp.vae or DEFAULT_VAE_LABEL),
        ("Seed", "seed", str(inp.seed)),
    ]
    if inp.freeu is not None:
        out.append(("FreeU", "freeu", str(inp.freeu)))
    if inp.inpaint_mode is not None:
        out.append(("Inpaint Mode", "inpaint_method", inp.inpaint_mode))
        out.append(("Inpaint Engine Version", "inpaint_engine_version", inp.inpaint_engine or "None"))
    for number, (name, weight, _hash) in enumerate(inp.loras, start=1):
        out.append((f"LoRA {number}", f"lora_combined_{number}", f"{name} : {weight}"))
    scheme = inp.metadata_scheme if inp.metadata_scheme in ("fooocus", "a1111") else False
    out += [("Metadata Scheme", "metadata_scheme", scheme), ("Version", "version", inp.version)]
    return out


def to_fooocus_scheme(items: MetadataList, inp: MetadataInput) -> str:
    """spec §13.2: the list as a dict plus the full prompts, stems and hashes; sorted ASCII JSON."""
    data: dict[str, Any] = {}
    for _label, key, value in items:
        if key.startswith("lora_combined_"):
            name, _, weight = str(value).rpartition(" : ")
            value = f"{file_stem(name)} : {weight}"
        data[key] = value
    data["full_prompt"] = list(inp.full_prompt)
    data["steps"] = inp.steps
    data["base_model"] = file_stem(inp.base_model)
    data["base_model_hash"] = inp.base_model_hash
    if inp.family != "flux":  # FLUX.1 has no negative prompt, refiner or separate VAE
        data["full_negative_prompt"] = list(inp.full_negative_prompt)
        if inp.refiner_model not in (None, "", "None"):
            data["refiner_model"] = file_stem(inp.refiner_model)
            data["refiner_model_hash"] = inp.refiner_model_hash
        data["vae"] = file_stem(inp.vae or DEFAULT_VAE_LABEL)
    data["loras"] = [[file_stem(name), weight, digest] for name, weight, digest in inp.loras]
    if inp.created_by:
        data["created_by"] = inp.created_by
    if inp.is_demo:
        data["is_demo"] = True
    return json.dumps(dict(sorted(data.items())))


def _a1111_quote(value: str) -> str:
    """spec §13.3: a value containing ',', newline or ':' is written as a JSON string.

    Fooocus writes it with ``ensure_ascii=False``: non-ASCII characters stay as they are (the
    "fooocus" JSON scheme, unlike this one, keeps ASCII escapes).
    """
    return json.dumps(value, ensure_ascii=False) if any(ch in value for ch in ",\n:") else value


def a1111_sampler_label(sampler: str, scheduler: str) -> str:
    """spec §13.3: the A1111 name, plus ' Karras' for karras unless the sampler is CIVITAI_NO_KARRAS."""
    label = A1111_SAMPLER_NAMES.get(sampler, sampler)
    if scheduler == "karras" and sampler not in CIVITAI_NO_KARRAS:
        label += " Karras"
    return label


def to_a1111_scheme(items: MetadataList, inp: MetadataInput) -> str:
    """spec §13.3: A1111's three-part text (prompt, 'Negative prompt:' line, parameter line)."""
    data = {key: value for _label, key, value in items}
    if inp.family == "flux":
        return _flux_a1111(data, inp)
    params: dict[str, Any] = {
        "Steps": inp.steps,
        "Sampler": a1111_sampler_label(str(data["sampler"]), str(data["scheduler"])),
        "Seed": data["seed"],
        "Size": f"{inp.width}x{inp.height}",
        "CFG scale": data["guidance_scale"],
        "Sharpness": data["sharpness"],
        "ADM Guidance": data["adm_guidance"],
        "Model": file_stem(inp.base_model),
        "Model hash": inp.base_model_hash,
        "Performance": data["performance"],
        "Scheduler": data["scheduler"],
        "VAE": file_stem(inp.vae or DEFAULT_VAE_LABEL),
        "Raw prompt": inp.prompt,
        "Raw negative prompt": inp.negative_prompt,
    }
    if inp.refiner_model not in (None, "", "None"):
        params["Refiner"] = file_stem(inp.refiner_model)
        params["Refiner hash"] = inp.refiner_model_hash
    for key in ("adaptive_cfg", "clip_skip", "overwrite_switch", "refiner_swap_method", "freeu", "inpaint_method",
                "inpaint_engine_version"):
        if key in data:
            params[A1111_LABELS[key]] = data[key]
    if inp.loras:
        params["Lora hashes"] = ", ".join(f"{file_stem(name)}: {digest}" for name, _w, digest in inp.loras)
        params["Lora weights"] = ", ".join(f"{file_stem(name)}: {weight}" for name, weight, _h in inp.loras)
    params["Version"] = data["version"]
    if inp.created_by:
        params["User"] = inp.created_by
    if inp.is_demo:
        params["Demo model"] = True
    lines = [", ".join(inp.full_prompt)]
    negative = ", ".join(inp.full_negative_prompt)
    if negative:
        lines.append(f"{NEGATIVE_PREFIX} {negative}")
    lines.append(", ".join(f"{label}: {_a1111_quote(str(value))}" for label, value in params.items()
                           if value is not None))
    return "\n".join(lines)


def _flux_a1111(data: dict[str, Any], inp: MetadataInput) -> str:
    """A1111 text for a FLUX.1 image: the prompt line and the parameters FLUX.1 has, with the family."""
    params: dict[str, Any] = {"Steps": inp.steps, "Seed": data["seed"], "Size": f"{inp.width}x{inp.height}"}
    if "guidance_scale" in data:
        params["CFG scale"] = data["guidance_scale"]
    params.update({"Model": file_stem(inp.base_model), "Model hash": inp.base_model_hash,
                   "Raw prompt": inp.prompt, A1111_LABELS["model_family"]: inp.family})
    if inp.loras:
        params["Lora hashes"] = ", ".join(f"{file_stem(name)}: {digest}" for name, _w, digest in inp.loras)
        params["Lora weights"] = ", ".join(f"{file_stem(name)}: {weight}" for name, weight, _h in inp.loras)
    params["Version"] = data["version"]
    if inp.created_by:
        params["User"] = inp.created_by
    if inp.is_demo:
        params["Demo model"] = True
    return "\n".join([", ".join(inp.full_prompt), ", ".join(f"{label}: {_a1111_quote(str(value))}"
                                                             for label, value in params.items())])


#: spec §12.1: Fooocus logs Upscale (Fast 2x) as this one entry (no prompt processing ran).
FAST_UPSCALE_ITEM = ("Upscale (Fast)", "upscale_fast", "2x")


def fast_upscale_metadata(scheme: str | None, version: str | None = None) -> tuple[str | None, MetadataList]:
    """The text to embed for an Upscale (Fast 2x) image and its list: Fooocus's one entry, plus the
    scheme and version. Both schemes write the same JSON object (there is no prompt to put first)."""
    items: MetadataList = [FAST_UPSCALE_ITEM, ("Metadata Scheme", "metadata_scheme", scheme or False),
                           ("Version", "version", version or default_version_string())]
    if scheme not in ("fooocus", "a1111"):
        return None, items
    return json.dumps(dict(sorted((key, value) for _label, key, value in items))), items


def metadata_text(inp: MetadataInput) -> str | None:
    """The string to embed for ``inp.metadata_scheme`` (None when metadata is off)."""
    items = build_metadata_list(inp)
    if inp.metadata_scheme == "fooocus":
        return to_fooocus_scheme(items, inp)
    if inp.metadata_scheme == "a1111":
        return to_a1111_scheme(items, inp)
    return None
