"""The pure text rules of Describe (spec §12.5): no model, no torch, no numpy.

Numbers and rules, each from spec §12.5 unless said otherwise:

- Art/Anime: general tags with probability **> 0.35**, character tags **> 0.85** (strictly
  greater, as Fooocus compares); characters first, then general tags, each in the order of the
  tag file (not sorted by probability); ``(``/``)`` escaped as ``\\(``/``\\)`` and ``_`` replaced
  by a space, joined with ``", "``. The tag file's rows before the first general tag (category 0)
  are the rating tags, which are never output; character tags start at the first category-4 row.
- Photograph styles ``[Fooocus V2, Fooocus Enhance, Fooocus Sharp]``; Art/Anime styles
  ``[Fooocus V2, Fooocus Masterpiece]``; both: the prompts joined with ``", "`` (photo first, as
  Fooocus runs it first) and the style sets merged. Fooocus merges them in a Python ``set`` (no
  stable order); we keep first-seen order so the answer is reproducible.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

#: The API's names for Fooocus's two content types (refdata tables/flags_and_lists.json describe_types).
DescribeMode = Literal["photo", "anime", "both"]
FOOOCUS_TYPE_BY_MODE = {"photo": "Photograph", "anime": "Art/Anime"}
#: Fooocus's default content type is Photograph (refdata config_defaults default_describe_content_type).
DEFAULT_MODE: DescribeMode = "photo"

GENERAL_THRESHOLD = 0.35
CHARACTER_THRESHOLD = 0.85
#: The tag file's category column: 0 general, 4 character (9 rating: before the general block).
GENERAL_CATEGORY = "0"
CHARACTER_CATEGORY = "4"

PHOTO_STYLES: tuple[str, ...] = ("Fooocus V2", "Fooocus Enhance", "Fooocus Sharp")
ANIME_STYLES: tuple[str, ...] = ("Fooocus V2", "Fooocus Masterpiece")
PROMPT_SEPARATOR = ", "


@dataclass(frozen=True)
class TagTable:
    """The tag file: every tag name in model-output order, and where the general and character
    blocks start (indices into ``names``)."""

    names: tuple[str, ...]
    general_index: int
    character_index: int


def parse_tag_csv(text: str) -> TagTable:
    """Read ``selected_tags.csv`` (header ``tag_id,name,category,count``). A file without a general
    or a character block is refused: thresholds could not be applied to it."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None:
        raise ValueError("the tag file is empty")
    names: list[str] = []
    general_index: int | None = None
    character_index: int | None = None
    for row in reader:
        if len(row) < 3:
            raise ValueError(f"tag file row {len(names) + 2} has {len(row)} columns, expected at least 3")
        if general_index is None and row[2] == GENERAL_CATEGORY:
            general_index = len(names)
        elif character_index is None and row[2] == CHARACTER_CATEGORY:
            character_index = len(names)
        names.append(row[1])
    if general_index is None or character_index is None:
        raise ValueError("the tag file has no general (category 0) or no character (category 4) tags")
    return TagTable(names=tuple(names), general_index=general_index, character_index=character_index)


def select_tags(table: TagTable, probabilities: Sequence[float], *, general_threshold: float = GENERAL_THRESHOLD,
                character_threshold: float = CHARACTER_THRESHOLD, exclude: Iterable[str] = ()) -> list[str]:
    """The tags over their thresholds: character tags first, then general ones, in file order.

    The general block runs from ``general_index`` to ``character_index`` (rating rows before it
    are skipped); ``exclude`` drops raw tag names (Fooocus passes none)."""
    if len(probabilities) != len(table.names):
        raise ValueError(f"the model gave {len(probabilities)} scores for {len(table.names)} tags")
    pairs = list(zip(table.names, probabilities))
    general = [name for name, p in pairs[table.general_index:table.character_index] if p > general_threshold]
    character = [name for name, p in pairs[table.character_index:] if p > character_threshold]
    excluded = {name.strip().lower() for name in exclude}
    return [name for name in character + general if name not in excluded]


def tags_to_prompt(tags: Iterable[str]) -> str:
    """Escape brackets (they are emphasis syntax in a prompt), join, then ``_`` → space."""
    escaped = (tag.replace("(", "\\(").replace(")", "\\)") for tag in tags)
    return PROMPT_SEPARATOR.join(escaped).replace("_", " ")


def modes_of(mode: DescribeMode) -> tuple[str, ...]:
    """The models to run for ``mode``, in Fooocus's order (Photograph first)."""
    return ("photo", "anime") if mode == "both" else (mode,)


def styles_for(modes: Iterable[str]) -> list[str]:
    """The merged style set of the modes that ran, first-seen order."""
    out: list[str] = []
    for mode in modes:
        for style in PHOTO_STYLES if mode == "photo" else ANIME_STYLES:
            if style not in out:
                out.append(style)
    return out


def join_prompts(prompts: Iterable[str]) -> str:
    return PROMPT_SEPARATOR.join(prompts)
