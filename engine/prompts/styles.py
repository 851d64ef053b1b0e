"""Style templates in Fooocus's JSON format (spec §2.3, §2.4).

A style is ``{"name", "prompt"?, "negative_prompt"?}``; ``prompt`` may contain ``{prompt}``.
:class:`StyleLibrary` reads any folder of such files (a Fooocus ``sdxl_styles`` folder included,
which we never ship) plus our own small set in ``engine/prompts/data/styles``. Loading happens when the
caller asks for it, never at import.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from engine.core.constants import FOOOCUS_V2_STYLE, RANDOM_STYLE
from engine.core.errors import UnknownStyle

log = logging.getLogger("hooocus.styles")

#: Fooocus moves its built-in style files to the end of the load order, in this order (spec §2.3).
FOOOCUS_BUILTIN_STYLE_FILES: tuple[str, ...] = (
    "sdxl_styles_fooocus.json", "sdxl_styles_sai.json", "sdxl_styles_mre.json", "sdxl_styles_twri.json",
    "sdxl_styles_diva.json", "sdxl_styles_marc_k3nt3l.json",
)
#: The pseudo-styles: not templates, always legal (spec §2.3).
PSEUDO_STYLES: tuple[str, ...] = (FOOOCUS_V2_STYLE, RANDOM_STYLE)

# spec §2.3 step 4: substring fix-ups applied after capitalisation (a plain replace, so "Saint"
# also becomes "SAInt"; that is what Fooocus does).
_NAME_FIXUPS: tuple[tuple[str, str], ...] = (("3d", "3D"), ("Sai", "SAI"), ("Mre", "MRE"), ("(s", "(S"))


def normalize_style_name(name: str) -> str:
    """Fooocus ``normalize_key`` (spec §2.3): '-' -> ' ', capitalise each word, fix-ups.

    Words are split on single spaces, so a double space survives (as in Fooocus).
    """
    words = name.replace("-", " ").split(" ")
    text = " ".join(word[:1].upper() + word[1:].lower() for word in words)
    for old, new in _NAME_FIXUPS:
        text = text.replace(old, new)
    return text


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str = ""
    negative_prompt: str = ""
    #: The file the winning definition came from ("builtin:..." for our own set).
    source: str = ""

    @property
    def has_placeholder(self) -> bool:
        return "{prompt}" in self.prompt


def _style_files(folder: Path) -> list[Path]:
    """JSON files under ``folder`` in Fooocus's order: others sorted case-insensitively, then the
    Fooocus built-in files in their fixed order (spec §2.3)."""
    files = sorted((p for p in folder.rglob("*.json") if p.is_file()),
                   key=lambda p: p.relative_to(folder).as_posix().lower())
    builtin_rank = {name: rank for rank, name in enumerate(FOOOCUS_BUILTIN_STYLE_FILES)}
    others = [p for p in files if not (p.parent == folder and p.name in builtin_rank)]
    builtins = sorted((p for p in files if p.parent == folder and p.name in builtin_rank),
                      key=lambda p: builtin_rank[p.name])
    return others + builtins


def _read_entries(text: str, source: str) -> tuple[list[Style], list[str]]:
    """Parse one style file; bad entries are skipped and reported, never fatal."""
    errors: list[str] = []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return [], [f"{source}: not valid JSON ({exc})"]
    if not isinstance(data, list):
        return [], [f"{source}: expected a JSON list of styles"]
    styles: list[Style] = []
    for index, entry in enumerate(data):
        fields = (entry.get("name"), entry.get("prompt", ""), entry.get("negative_prompt", "")) \
            if isinstance(entry, dict) else (None, None, None)
        if not all(isinstance(value, str) for value in fields) or not fields[0]:
            errors.append(f"{source}[{index}]: needs a string 'name' and optional string 'prompt'/'negative_prompt'")
            continue
        name, prompt, negative = fields
        styles.append(Style(normalize_style_name(name), prompt, negative, source))
    return styles, errors


def builtin_style_text() -> str:
    """Our own style set (engine/prompts/data/styles/hooocus_styles.json), written for Hooocus."""
    return resources.files("engine.prompts").joinpath("data/styles/hooocus_styles.json").read_text(encoding="utf-8")


class StyleLibrary:
    """Styles by normalised name, in load order (Python dict order, like Fooocus's ``styles``).

    ``Random Style`` draws from the styles that came from folders when there are any, so that with
    a Fooocus ``sdxl_styles`` folder it picks exactly what Fooocus picks for the same seed (the
    pick is an index into the 277-entry list, spec §2.4); it draws from our own set only when no
    folder gave any style.
    """

    def __init__(self, styles: Sequence[Style], *, random_pool: Sequence[str] | None = None,
                 load_errors: Sequence[str] = ()) -> None:
        self._styles: dict[str, Style] = {}
        for style in styles:  # later entries overwrite, keeping the first position (dict semantics)
            self._styles[style.name] = style
        pool = list(self._styles) if random_pool is None else [n for n in random_pool if n in self._styles]
        self._random_pool: tuple[str, ...] = tuple(pool)
        self.load_errors: tuple[str, ...] = tuple(load_errors)

    @classmethod
    def load(cls, folders: Iterable[Path | str] = (), *, builtin: bool = True) -> StyleLibrary:
        """Read our own set (if ``builtin``) and then every folder in the given order.

        Within a folder the Fooocus load order applies (spec §2.3). A later definition of the same
        normalised name overwrites an earlier one. Unreadable files are logged and skipped.
        """
        styles: list[Style] = []
        errors: list[str] = []
        if builtin:
            found, bad = _read_entries(builtin_style_text(), "builtin:hooocus_styles.json")
            styles += found
            errors += bad
        from_folders: list[str] = []
        for folder in (Path(f) for f in folders):
            if not folder.is_dir():
                errors.append(f"{folder}: not a folder")
                continue
            for path in _style_files(folder):
                try:
                    text = path.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as exc:
                    errors.append(f"{path}: cannot read ({exc})")
                    continue
                found, bad = _read_entries(text, str(path))
                styles += found
                errors += bad
                from_folders += [s.name for s in found]
        for message in errors:
            log.warning("style file problem: %s", message)
        library = cls(styles, load_errors=errors)
        if from_folders:
            wanted = set(from_folders)
            library._random_pool = tuple(name for name in library._styles if name in wanted)
        return library

    # -- lookup --------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Template names in load order (no pseudo-styles)."""
        return list(self._styles)

    def legal_names(self) -> list[str]:
        """Every name a request may use: 'Fooocus V2', 'Random Style', then the templates."""
        return [*PSEUDO_STYLES, *self._styles]

    def __contains__(self, name: object) -> bool:
        return name in self._styles

    def __len__(self) -> int:
        return len(self._styles)

    def get(self, name: str) -> Style:
        try:
            return self._styles[name]
        except KeyError:
            raise UnknownStyle(f"unknown style {name!r}") from None

    def canonical(self, name: str) -> str | None:
        """The legal name a caller meant: exact, then normalised, then case-insensitive; or None."""
        if name in PSEUDO_STYLES or name in self._styles:
            return name
        for candidate in (normalize_style_name(name.strip()), name.strip()):
            if candidate in PSEUDO_STYLES or candidate in self._styles:
                return candidate
        folded = name.strip().casefold()
        for legal in self.legal_names():
            if legal.casefold() == folded:
                return legal
        return None

    def check(self, names: Sequence[str]) -> list[str]:
        """Canonical names for ``names``; raise UnknownStyle (with the position) for the first bad one."""
        out = []
        for index, name in enumerate(names):
            legal = self.canonical(name)
            if legal is None:
                raise UnknownStyle(f"unknown style {name!r}; the options list (GET /v1/options, MCP list_options) "
                                   "shows the installed styles",
                                   loc=("styles", index))
            out.append(legal)
        return out

    # -- the pipeline's calls --------------------------------------------------------------------

    def apply_style(self, name: str, prompt: str) -> tuple[list[str], list[str]]:
        """spec §2.2.5: the template's lines with ``{prompt}`` filled in, and its negative lines."""
        style = self.get(name)
        return style.prompt.replace("{prompt}", prompt).splitlines(), style.negative_prompt.splitlines()

    def random_style(self, rng: random.Random) -> str:
        """spec §2.4: ``rng.choice`` over the pool in load order (one draw from the shared rng)."""
        if not self._random_pool:
            raise UnknownStyle("'Random Style' needs at least one installed style")
        return rng.choice(self._random_pool)

    def default_styles(self, *, expansion_available: bool) -> tuple[str, ...]:
        """Fooocus's defaults (V2, Enhance, Sharp) when installed, else our own equivalents.

        'Fooocus V2' is included only when the expansion assets are present (spec §0: NC licence).
        """
        head = (FOOOCUS_V2_STYLE,) if expansion_available else ()
        if "Fooocus Enhance" in self and "Fooocus Sharp" in self:
            return (*head, "Fooocus Enhance", "Fooocus Sharp")
        return (*head, *(n for n in ("Hooocus Enhance", "Hooocus Sharp") if n in self))
