"""Reading: either scheme, a log.html entry or a pasted block -> Fooocus's parsed dict -> a
GenerationRequest, as Fooocus's "Load Parameters" does (spec §13.6)."""

from __future__ import annotations

import ast
import json
import re
import urllib.parse
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, get_args

from engine.core.constants import (
    FOOOCUS_V2_STYLE,
    LORA_MAX_WEIGHT,
    LORA_MIN_WEIGHT,
    MAX_LORAS,
    MAX_SEED,
    MAX_SIDE_PX,
    MIN_SIDE_PX,
    PERFORMANCE_NAMES,
    RANDOM_STYLE,
    REFINER_SWAP_METHODS,
    SAMPLER_NAMES,
    SCHEDULER_NAMES,
    SDXL_ASPECT_RATIOS,
)
from engine.core.errors import HooocusError, InvalidRequest
from engine.core.request import GenerationRequest, InpaintEngineName, InpaintMode
from engine.io.metadata.labels import (
    A1111_KEYS,
    A1111_SAMPLER_NAMES,
    DEFAULT_VAE_LABEL,
    NEGATIVE_PREFIX,
    file_stem,
)
from engine.sdxl.modes import PERFORMANCE_MODES, performance_for_steps

INPAINT_MODES: tuple[str, ...] = get_args(InpaintMode)
INPAINT_ENGINES: tuple[str, ...] = get_args(InpaintEngineName)

# spec §13.6 step 3: one "key: value" pair of the last line (values with , \n or : are JSON-quoted).
_A1111_PARAM_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_A1111_SIZE_RE = re.compile(r"^(\d+)x(\d+)$")
_LOG_BUTTON_RE = re.compile(r"to_clipboard\('([^']*)'\)")


# -- reading: the parsed dict ---------------------------------------------------------------------


class StyleSource(Protocol):
    """What style extraction needs (``engine.prompts.styles.StyleLibrary`` has both)."""

    def names(self) -> Sequence[str]: ...

    def apply_style(self, name: str, prompt: str) -> tuple[list[str], list[str]]: ...


# Fed to apply_style in place of the prompt, to get the template text back with a marker where
# "{prompt}" was. NUL cannot appear in a style file's JSON string unescaped, nor in a prompt.
_PROMPT_MARK = "\x00prompt\x00"


def _unwrap(text: str, template: str) -> tuple[bool, str, str]:
    """One style template against ``text``, as Fooocus's ``unwrap_style_text_from_prompt``:
    ``(matched, text without the template, inner prompt)``.

    With the prompt marker: split into left/right, ``lp = text.find(left)``,
    ``rp = text.find(right)`` (each the first occurrence, independently), a match if
    ``0 <= lp < rp``; the inner text is ``text[lp+len(left):rp]`` and the first occurrence of
    left+inner+right goes, then one leading and one trailing ", ". A template with the marker twice
    never matches. Without the marker the template must end the text (then one trailing ", " goes)
    and the "inner" text is what is left.
    """
    if _PROMPT_MARK in template:
        parts = template.split(_PROMPT_MARK)
        if len(parts) != 2:
            return False, text, ""
        left, right = parts
        lp, rp = text.find(left), text.find(right)
        if not 0 <= lp < rp:
            return False, text, ""
        inner = text[lp + len(left):rp]
        rest = text.replace(left + inner + right, "", 1)
        rest = rest[2:] if rest.startswith(", ") else rest
        rest = rest[:-2] if rest.endswith(", ") else rest
        return True, rest, inner
    if not text.endswith(template):
        return False, text, ""
    rest = text[:len(text) - len(template)]
    rest = rest[:-2] if rest.endswith(", ") else rest
    return True, rest, rest


def _first_word_repeat(prompt: str) -> str | None:
    """Fooocus's guess of the raw prompt when only an expansion is left: the text before the last
    occurrence of its first ', '-separated word, if that word occurs more than once (else None)."""
    first_word = prompt.split(", ")[0]
    positions = [i for i in range(len(prompt)) if prompt.startswith(first_word, i)]
    if len(positions) <= 1:
        return None
    real_prompt = prompt[:positions[-1]]
    return real_prompt[:-2] if real_prompt.endswith(", ") else real_prompt


def extract_styles_from_prompt(prompt: str, negative_prompt: str,
                               styles: StyleSource | None) -> tuple[list[str], str, str]:
    """spec §13.6 step 3 (Fooocus's ``extract_styles_from_prompt``): style names from a full prompt.

    Tries the styles in library order; a style matches when its positive template unwraps from the
    prompt and its negative template from the negative (:func:`_unwrap`); after each match the scan
    restarts without that style. ``real_prompt`` is the first match's non-empty inner text that
    differs from the text left. Leftover text then adds 'Fooocus V2' (with a ``real_prompt``, or
    when the first-word-repeat rule finds one). Returns (names reversed, real_prompt, negative left).
    Styles with both templates empty are skipped (they say nothing; Fooocus fails on them).
    """
    if styles is None:
        return [], prompt, negative_prompt
    templates = []
    for name in styles.names():
        if name in (FOOOCUS_V2_STYLE, RANDOM_STYLE):
            continue
        try:
            positive_lines, negative_lines = styles.apply_style(name, _PROMPT_MARK)
        except (HooocusError, KeyError, ValueError):
            continue
        positive, negative = "\n".join(positive_lines), "\n".join(negative_lines)
        if positive or negative:
            templates.append((name, positive, negative))
    found: list[str] = []
    real_prompt = ""
    while True:
        for entry in templates:
            name, positive, negative = entry
            matched, new_prompt, inner = _unwrap(prompt, positive)
            if not matched:
                continue
            matched, new_negative, _ = _unwrap(negative_prompt, negative)
            if not matched:
                continue
            prompt, negative_prompt = new_prompt, new_negative
            if real_prompt == "" and inner != "" and inner != prompt:
                real_prompt = inner
            found.append(name)
            templates.remove(entry)
            break
        else:
            break
    if prompt != "":
        if real_prompt != "":
            found.append(FOOOCUS_V2_STYLE)
        else:
            repeat = _first_word_repeat(prompt)
            if repeat is not None:
                real_prompt = repeat
                found.append(FOOOCUS_V2_STYLE)
    return list(reversed(found)), real_prompt, negative_prompt


def _file_for_name(value: str, filenames: Collection[str]) -> str | None:
    """The local file name whose stem is ``value`` (Fooocus), or that equals it (ours, lenient)."""
    for filename in filenames:
        if file_stem(filename) == value:
            return filename
    return value if value in filenames else None


def _parse_fooocus(data: Mapping[str, Any], *, model_filenames: Collection[str], lora_filenames: Collection[str],
                   vae_filenames: Collection[str], keep_unknown_names: bool) -> dict[str, Any]:
    """spec §13.6 step 2: stems back to local file names; a name not found becomes None."""
    out = dict(data)
    for key, value in data.items():
        if not isinstance(value, str) or value in ("", "None"):
            continue
        if key in ("base_model", "refiner_model", "vae"):
            filenames = vae_filenames if key == "vae" else model_filenames
            found = _file_for_name(value, filenames)
            # [quirk] "Default (model)" is no file name, so Fooocus reads the VAE back as None.
            out[key] = found if found is not None or not keep_unknown_names else value
        elif key.startswith("lora_combined_"):
            name, sep, weight = value.rpartition(" : ")
            found = _file_for_name(name, lora_filenames) if sep else None
            if found is not None:
                out[key] = f"{found} : {weight}"
            elif not keep_unknown_names:
                out[key] = None
    return out


def _parse_a1111(text: str, *, styles: StyleSource | None, model_filenames: Collection[str],
                 lora_filenames: Collection[str], vae_filenames: Collection[str],
                 keep_unknown_names: bool) -> dict[str, Any]:
    """spec §13.6 step 3: A1111 text -> Fooocus's dict (values stay strings, as in Fooocus)."""
    *lines, last = text.strip().split("\n")
    if len(_A1111_PARAM_RE.findall(last)) < 3:  # no parameter line: everything is prompt
        lines.append(last)
        last = ""
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PREFIX):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    full_prompt, full_negative = "\n".join(prompt_lines), "\n".join(negative_lines)
    found_styles, prompt, negative = extract_styles_from_prompt(full_prompt, full_negative, styles)
    data: dict[str, Any] = {"prompt": prompt, "negative_prompt": negative}
    for label, value in _A1111_PARAM_RE.findall(last):
        if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        size = _A1111_SIZE_RE.match(value) if isinstance(value, str) else None
        if size is not None:
            data["resolution"] = str((size.group(1), size.group(2)))
        elif label in A1111_KEYS:  # labels Fooocus does not know (A1111's Hires etc.) are skipped
            data[A1111_KEYS[label]] = value
    if "raw_prompt" in data:
        data["prompt"] = data["raw_prompt"]
        # [quirk] spec §13.6: the styled full prompt differs from the raw one whenever a style
        # changed the text, and Fooocus then adds 'Fooocus V2' even if no expansion ran.
        if full_prompt != str(data["raw_prompt"]).replace("\n", ", ") and FOOOCUS_V2_STYLE not in found_styles:
            found_styles.append(FOOOCUS_V2_STYLE)
    if "raw_negative_prompt" in data:
        data["negative_prompt"] = data["raw_negative_prompt"]
    data["styles"] = str(found_styles)
    # spec §9: plain A1111 images get the performance of their step count; a FLUX.1 image has none.
    if "steps" in data and "performance" not in data and data.get("model_family") != "flux":
        try:
            performance = performance_for_steps(int(data["steps"]))
        except ValueError:
            performance = None
        if performance is not None:
            data["performance"] = performance
    if "sampler" in data:
        label = str(data["sampler"]).replace(" Karras", "")
        data["sampler"] = next((key for key, name in A1111_SAMPLER_NAMES.items() if name == label), label)
    for key in ("base_model", "refiner_model", "vae"):
        if key in data:  # A1111 keeps a name it cannot find (unlike the fooocus scheme)
            filenames = vae_filenames if key == "vae" else model_filenames
            data[key] = _file_for_name(str(data[key]), filenames) or data[key]
    if data.get("lora_weights"):
        for number, entry in enumerate(str(data["lora_weights"]).split(", "), start=1):
            name, _, weight = entry.rpartition(": ")
            found = _file_for_name(name, lora_filenames) or (name if keep_unknown_names else None)
            if found is not None:  # Fooocus: only LoRAs found locally, numbered by their position
                data[f"lora_combined_{number}"] = f"{found} : {weight}"
    return data


def _as_json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def parse_parameters(parameters: str | Mapping[str, Any], scheme: str | None = None, *,
                     styles: StyleSource | None = None, model_filenames: Collection[str] = (),
                     lora_filenames: Collection[str] = (), vae_filenames: Collection[str] = (),
                     keep_unknown_names: bool = False) -> dict[str, Any]:
    """Fooocus's ``get_metadata_parser(scheme).to_json(parameters)`` (spec §13.6 steps 1-3).

    A JSON object is read as the fooocus scheme and any other text as a1111, whatever ``scheme``
    says (Fooocus's rule when the scheme is unknown; trusting the content never misreads).
    ``*_filenames`` are the local files names are matched against. ``keep_unknown_names`` keeps a
    name that is not installed (Fooocus turns it into None, or drops an a1111 LoRA), so that a
    caller can say which one is missing.
    """
    data = parameters if isinstance(parameters, Mapping) else _as_json_object(parameters)
    if data is not None:
        return _parse_fooocus(data, model_filenames=model_filenames, lora_filenames=lora_filenames,
                              vae_filenames=vae_filenames, keep_unknown_names=keep_unknown_names)
    if scheme == "fooocus":
        raise InvalidRequest("the parameters say scheme 'fooocus' but are not a JSON object")
    return _parse_a1111(str(parameters), styles=styles, model_filenames=model_filenames,
                        lora_filenames=lora_filenames, vae_filenames=vae_filenames,
                        keep_unknown_names=keep_unknown_names)


# -- reading: the request -------------------------------------------------------------------------


def _literal(value: Any) -> Any:
    """A Python literal written with str() (tuples, lists); never evaluates code."""
    if not isinstance(value, str):
        return value
    return ast.literal_eval(value.strip())


def _resolve_name(value: str, known: Collection[str] | None, what: str, warnings: list[str]) -> str | None:
    """The installed name ``value`` refers to (exact, or by stem); None + a warning when absent."""
    if known is None:
        return value
    if value in known:
        return value
    for name in known:
        if file_stem(name) in (value, file_stem(value)):
            return name
    warnings.append(f"{what} {value!r} is not installed; the default is used instead")
    return None


def _snap_side(value: int, what: str, warnings: list[str]) -> int:
    snapped = min(MAX_SIDE_PX, max(MIN_SIDE_PX, round(value / 8) * 8))
    if snapped != value:
        warnings.append(f"{what} {value} is not a multiple of 8 in [{MIN_SIDE_PX}, {MAX_SIDE_PX}]; using {snapped}")
    return snapped


def parameters_to_request(parsed: Mapping[str, Any], *, known_models: Collection[str] | None = None,
                          known_loras: Collection[str] | None = None, known_vaes: Collection[str] | None = None,
                          known_styles: Collection[str] | None = None) -> tuple[GenerationRequest, list[str]]:
    """Fooocus's "Load Parameters" (spec §13.6 step 4) onto a request: ``(request, warnings)``.

    Accepts a :func:`parse_parameters` result or the raw dict of a log.html entry. Only fields the
    metadata has are set (``model_fields_set``), so a caller can layer its own values on top.

    - steps equal to the performance's default are left unset (the mode decides);
    - a resolution in the SDXL list selects the aspect ratio, any other sets width/height;
    - LoRAs come from ``lora_combined_N`` (up to 5), the performance's own LoRA is skipped;
    - ``known_*`` None keeps every name unchecked; a list drops names not in it, with a warning,
      as Fooocus keeps its current choice: the request stays valid and says what was missing.
    """
    warnings: list[str] = []
    fields: dict[str, Any] = {}

    def text(key: str) -> str | None:
        value = parsed.get(key)
        return None if value is None else str(value)

    def number(key: str, kind: type, target: str | None = None) -> None:
        value = parsed.get(key)
        if value is None or value == "":
            return
        try:
            fields[target or key] = kind(float(value)) if kind is int else kind(value)
        except (TypeError, ValueError):
            warnings.append(f"ignored {key}={value!r}: not a number")

    def choice(key: str, allowed: Collection[str], target: str | None = None, fallback: str = "the default") -> None:
        value = text(key)
        if value is None:
            return
        if value in allowed:
            fields[target or key] = value
        else:
            warnings.append(f"unknown {key} {value!r}; using {fallback}")

    for key in ("prompt", "negative_prompt"):
        if text(key) is not None:
            fields[key] = text(key)

    if "styles" in parsed:
        try:
            names = _literal(parsed["styles"])
            if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
                raise ValueError
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            warnings.append(f"ignored styles={parsed['styles']!r}: not a list of names")
        else:
            legal = None if known_styles is None else set(known_styles) | {FOOOCUS_V2_STYLE, RANDOM_STYLE}
            kept = [n for n in names if legal is None or n in legal]
            for name in names:
                if name not in kept:
                    warnings.append(f"style {name!r} is not installed; left out")
            fields["styles"] = kept

    choice("performance", PERFORMANCE_NAMES)
    mode = PERFORMANCE_MODES[fields.get("performance", "Speed")]

    number("steps", int)
    # Fooocus: -1, "not overwritten"; a FLUX.1 image's steps are its own (no performance mode)
    if fields.get("steps") == mode.steps and parsed.get("model_family") != "flux":
        del fields["steps"]

    if parsed.get("resolution") not in (None, ""):
        try:
            width, height = (int(v) for v in _literal(parsed["resolution"]))
        except (ValueError, SyntaxError, TypeError):
            warnings.append(f"ignored resolution={parsed['resolution']!r}")
        else:
            if f"{width}*{height}" in SDXL_ASPECT_RATIOS:
                fields["aspect_ratio"] = f"{width}*{height}"
            else:
                fields["width"] = _snap_side(width, "width", warnings)
                fields["height"] = _snap_side(height, "height", warnings)

    number("guidance_scale", float, "cfg")
    number("sharpness", float)
    number("adaptive_cfg", float)
    number("clip_skip", int)
    number("refiner_switch", float)
    if parsed.get("adm_guidance") not in (None, ""):
        try:
            positive, negative, end = (float(v) for v in _literal(parsed["adm_guidance"]))
        except (ValueError, SyntaxError, TypeError):
            warnings.append(f"ignored adm_guidance={parsed['adm_guidance']!r}")
        else:
            fields.update(adm_scaler_positive=positive, adm_scaler_negative=negative, adm_scaler_end=end)
    number("overwrite_switch", int, "refiner_switch_step")
    if fields.get("refiner_switch_step", 1) <= 0:
        del fields["refiner_switch_step"]

    choice("sampler", SAMPLER_NAMES)
    choice("scheduler", SCHEDULER_NAMES)
    choice("refiner_swap_method", REFINER_SWAP_METHODS)

    seed = text("seed")
    if seed is not None:
        try:
            fields["seed"] = int(seed)
            if not 0 <= fields["seed"] <= MAX_SEED:
                raise ValueError
        except ValueError:
            fields.pop("seed", None)
            warnings.append(f"ignored seed {seed!r}: not in [0, 2^63-1]; a random seed is used")

    for key, known, what in (("base_model", known_models, "model"), ("refiner_model", known_models, "refiner"),
                             ("vae", known_vaes, "VAE")):
        value = text(key)
        if value in (None, "", "None", DEFAULT_VAE_LABEL):
            continue
        name = _resolve_name(value, known, what, warnings)
        if name is not None:
            fields[key] = name

    if parsed.get("freeu") not in (None, ""):
        try:
            b1, b2, s1, s2 = (float(v) for v in _literal(parsed["freeu"]))
        except (ValueError, SyntaxError, TypeError):
            warnings.append(f"ignored freeu={parsed['freeu']!r}")
        else:
            fields["freeu"] = {"enabled": True, "b1": b1, "b2": b2, "s1": s1, "s2": s2}

    # Inpaint/outpaint images: the method and engine, as Fooocus's Load Parameters reads them. The
    # mask and image are not in the metadata; they only become defaults for the next inpaint.
    choice("inpaint_method", INPAINT_MODES, "inpaint_mode")
    choice("inpaint_engine_version", INPAINT_ENGINES, "inpaint_engine", fallback="the mode's engine")
    if parsed.get("upscale_fast") not in (None, ""):
        warnings.append("this image was made with Upscale (Fast 2x): give it as input_image with "
                        "uov_method 'Upscale (Fast 2x)' to repeat it")

    fields_loras = _loras_from(parsed, mode.lora_file, known_loras, warnings)
    if fields_loras:
        fields["loras"] = fields_loras

    if parsed.get("is_demo") in (True, "True", "true"):
        warnings.append("these parameters come from Hooocus's demo model (random weights)")
    return GenerationRequest.parse(fields), warnings


def _loras_from(parsed: Mapping[str, Any], performance_lora: str | None, known: Collection[str] | None,
                warnings: list[str]) -> list[dict[str, Any]]:
    """``lora_combined_N`` entries in N order -> LoRA specs (spec §13.6 step 4)."""
    numbered = []
    for key, value in parsed.items():
        match = re.fullmatch(r"lora_combined_(\d+)", key)
        if match and isinstance(value, str):
            numbered.append((int(match.group(1)), value))
    loras: list[dict[str, Any]] = []
    for _number, value in sorted(numbered):
        name, sep, weight_text = value.rpartition(" : ")
        if not sep or name in ("", "None"):
            continue
        if performance_lora is not None and file_stem(name) == file_stem(performance_lora):
            continue  # the mode adds its own LoRA
        try:
            weight = float(weight_text)
        except ValueError:
            warnings.append(f"ignored LoRA {value!r}: bad weight")
            continue
        clamped = min(LORA_MAX_WEIGHT, max(LORA_MIN_WEIGHT, weight))
        if clamped != weight:
            warnings.append(f"LoRA {name!r} weight {weight} is outside [{LORA_MIN_WEIGHT}, {LORA_MAX_WEIGHT}]; "
                            f"using {clamped}")
        resolved = _resolve_name(name, known, "LoRA", warnings)
        if resolved is None:
            continue
        if len(loras) == MAX_LORAS:
            warnings.append(f"more than {MAX_LORAS} LoRAs; {name!r} and later ones left out")
            break
        loras.append({"name": resolved, "weight": clamped})
    return loras


# -- front doors: image files, log.html, pasted blocks --------------------------------------------


@dataclass(frozen=True)
class _Context:
    styles: StyleSource | None = None
    known_models: Collection[str] | None = None
    known_loras: Collection[str] | None = None
    known_vaes: Collection[str] | None = None
    known_styles: Collection[str] | None = None

    def to_request(self, parsed: Mapping[str, Any]) -> tuple[GenerationRequest, list[str]]:
        return parameters_to_request(parsed, known_models=self.known_models, known_loras=self.known_loras,
                                     known_vaes=self.known_vaes, known_styles=self.known_styles)

    def parse(self, parameters: str, scheme: str | None) -> dict[str, Any]:
        return parse_parameters(parameters, scheme, styles=self.styles, model_filenames=self.known_models or (),
                                lora_filenames=self.known_loras or (), vae_filenames=self.known_vaes or (),
                                keep_unknown_names=True)


def request_from_image(data: bytes, *, styles: StyleSource | None = None,
                       known_models: Collection[str] | None = None, known_loras: Collection[str] | None = None,
                       known_vaes: Collection[str] | None = None,
                       known_styles: Collection[str] | None = None) -> tuple[GenerationRequest, list[str]]:
    """The request stored in a PNG/JPEG/WEBP written by Fooocus, A1111 or Hooocus.

    ``styles`` lets a1111 text recover style names; the ``known_*`` lists (installed names) turn
    missing models/LoRAs/VAEs/styles into warnings instead of a request the server rejects.
    """
    from engine.io.imageio import read_image_metadata

    context = _Context(styles, known_models, known_loras, known_vaes, known_styles)
    parameters, scheme = read_image_metadata(data)
    if parameters is None:
        raise InvalidRequest("the image has no generation parameters (Fooocus writes them only when "
                             "'Save Metadata to Images' is on)")
    return context.to_request(context.parse(parameters, scheme))


def request_from_image_file(path: str | Path, **context: Any) -> tuple[GenerationRequest, list[str]]:
    """:func:`request_from_image` for a file on disk."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise InvalidRequest(f"cannot read {path}: {exc.strerror or exc}") from None
    return request_from_image(data, **context)


def parse_log_html(text: str) -> list[dict[str, Any]]:
    """Every entry of a Fooocus log.html, newest first: the JSON behind its "Copy to Clipboard"
    button (URL-encoded ``{key: value}`` of the metadata list, spec §13.5)."""
    entries = []
    for match in _LOG_BUTTON_RE.finditer(text):
        entry = _as_json_object(urllib.parse.unquote(match.group(1)))
        if entry is not None:
            entries.append(entry)
    return entries


def request_from_log_block(text: str, *, index: int = 0, styles: StyleSource | None = None,
                           known_models: Collection[str] | None = None, known_loras: Collection[str] | None = None,
                           known_vaes: Collection[str] | None = None,
                           known_styles: Collection[str] | None = None) -> tuple[GenerationRequest, list[str]]:
    """A request from what a Fooocus user copied: the JSON of a log entry's "Copy to Clipboard"
    button (plain or still URL-encoded), a whole log.html (entry ``index``, 0 = newest), or an
    A1111-style parameter text."""
    context = _Context(styles, known_models, known_loras, known_vaes, known_styles)
    stripped = text.strip()
    if stripped.startswith("%7B") or stripped.startswith("%7b"):
        stripped = urllib.parse.unquote(stripped)
    if stripped.startswith("{"):
        entry = _as_json_object(stripped)
        if entry is None:
            raise InvalidRequest("the parameter block is not a valid JSON object")
        return context.to_request(entry)
    if "to_clipboard(" in stripped or stripped[:200].lower().startswith(("<!doctype", "<html")):
        entries = parse_log_html(stripped)
        if not entries:
            raise InvalidRequest("no parameter blocks found in this log.html")
        if not 0 <= index < len(entries):
            raise InvalidRequest(f"log entry {index} does not exist; the log has {len(entries)} (0 = newest)")
        return context.to_request(entries[index])
    if not stripped:
        raise InvalidRequest("the parameter block is empty")
    return context.to_request(context.parse(stripped, "a1111"))


def request_from_log_file(path: str | Path, **context: Any) -> tuple[GenerationRequest, list[str]]:
    """:func:`request_from_log_block` for a log.html or a text file holding a copied block."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise InvalidRequest(f"cannot read {path}: {exc.strerror or exc}") from None
    return request_from_log_block(text, **context)
