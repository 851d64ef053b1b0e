"""Inline ``<lora:NAME:WEIGHT>`` references in the prompt (spec §2.1.3). Pure text functions."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import PurePath

from engine.core.constants import MAX_LORAS
from engine.core.errors import UnknownLora

#: spec §2.1.3, the reference pattern: whole match, NAME, WEIGHT.
LORA_REFERENCE_RE = re.compile(r"(<lora:([^:]+):([+-]?(?:\d+(?:\.\d*)?|\.\d+))>)")

LoraEntry = tuple[str, float]


def cleanup_prompt(prompt: str) -> str:
    """spec §2.1.3 [quirk]: collapse spaces and commas, strip the comma pieces, join with ', '."""
    prompt = re.sub(" +", " ", prompt)
    prompt = re.sub(",+", ",", prompt)
    return ", ".join(piece for piece in (p.strip() for p in prompt.split(",")) if piece)


def _file_by_stem(stem: str, file_names: Iterable[str]) -> str | None:
    for file_name in file_names:
        if PurePath(file_name).stem == stem:
            return file_name
    return None


def canonical_lora_name(name: str, available: Sequence[str], index: int) -> str:
    """The file name a caller meant for ``request.loras[index]`` (exact, or by stem); UnknownLora when
    none matches. Both families turn request LoRA names into file names with it."""
    if name in available:
        return name
    by_stem = _file_by_stem(name, available)
    if by_stem is not None:
        return by_stem
    raise UnknownLora(f"unknown LoRA {name!r}; the options list (GET /v1/options, MCP list_options) shows the "
                      "installed LoRAs", loc=("loras", index, "name"))


def parse_lora_references(prompt: str, loras: Sequence[LoraEntry], *, max_loras: int = MAX_LORAS,
                          available_names: Iterable[str] = (),
                          skip_names: Iterable[str] = ()) -> tuple[list[LoraEntry], str]:
    """Pull ``<lora:NAME:WEIGHT>`` out of ``prompt`` (spec §2.1.3).

    - The prompt is split on ','; every match is removed from its piece.
    - A match counts only when a file in ``available_names`` (minus ``skip_names``, the current
      performance LoRA) has the stem NAME; otherwise it is dropped silently.
    - A found file already in ``loras`` is not added again (found duplicates among themselves are).
    - Nothing new found: ``loras`` comes back unchanged. Otherwise 'None' slots are dropped and the
      list is cut to ``max_loras``.
    - The prompt is always rewritten by :func:`cleanup_prompt`.
    """
    skipped = set(skip_names)
    candidates = [n for n in available_names if n not in skipped and PurePath(n).name not in skipped]
    found: list[LoraEntry] = []
    pieces = []
    for piece in prompt.split(","):
        for whole, name, weight in LORA_REFERENCE_RE.findall(piece):
            file_name = _file_by_stem(name, candidates)
            if file_name is not None:
                found.append((file_name, float(weight)))
            piece = piece.replace(whole, "")
        pieces.append(piece)
    cleaned = cleanup_prompt(",".join(pieces))

    existing = [(name, float(weight)) for name, weight in loras]
    known = {name for name, _ in existing}
    new = [entry for entry in found if entry[0] not in known]
    if not new:
        return existing, cleaned
    merged = [entry for entry in existing + new if entry[0] != "None"]
    return merged[:max_loras], cleaned
