"""Wildcards (``__name__``) and arrays (``[[a,b,c]]``), as Fooocus 2.5.5 expands them (spec §2.2).

Pure text functions. The only state is :class:`WildcardLibrary`, an explicit object over one or
more folders of ``NAME.txt`` files (one choice per line) that caches what it has read.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger("hooocus.wildcards")

#: spec §2.2.3: a placeholder is ``__`` + word characters or '-' + ``__``.
WILDCARD_RE = re.compile(r"__([\w-]+)__")
#: spec §2.2.3 / config ``wildcards_max_bfs_depth``: rounds of replacement (nesting depth).
MAX_WILDCARD_DEPTH = 64
#: spec §2.2.4: arrays, non-greedy, one line.
ARRAY_RE = re.compile(r"\[\[(.*?)\]\]")


class WildcardLibrary:
    """``NAME.txt`` files found (recursively) in ``folders``.

    Folders are searched in the given order and the first file whose stem is NAME wins; within a
    folder, files are taken in case-insensitive path order. Word lists are read on first use.
    """

    def __init__(self, folders: Iterable[Path | str] = ()) -> None:
        self.folders: tuple[Path, ...] = tuple(Path(f) for f in folders)
        self._paths: dict[str, Path] | None = None
        self._words: dict[str, list[str]] = {}

    def refresh(self) -> None:
        """Forget the file index and cached words (after files were added or edited)."""
        self._paths = None
        self._words.clear()

    def _index(self) -> dict[str, Path]:
        if self._paths is None:
            paths: dict[str, Path] = {}
            for folder in self.folders:
                if not folder.is_dir():
                    continue
                files = sorted((p for p in folder.rglob("*.txt") if p.is_file()),
                               key=lambda p: p.relative_to(folder).as_posix().lower())
                for path in files:
                    paths.setdefault(path.stem, path)
            self._paths = paths
        return self._paths

    def names(self) -> list[str]:
        return sorted(self._index())

    def words(self, name: str) -> list[str]:
        """The non-empty lines of NAME.txt, unstripped; [] when the file is missing or unreadable."""
        if name not in self._words:
            path = self._index().get(name)
            words: list[str] = []
            if path is not None:
                try:
                    words = [line for line in path.read_text(encoding="utf-8").splitlines() if line != ""]
                except (OSError, UnicodeDecodeError) as exc:
                    log.warning("wildcard file %s unreadable: %s", path, exc)
            self._words[name] = words
        return self._words[name]


def apply_wildcards(text: str, rng: random.Random, index: int, in_order: bool,
                    library: WildcardLibrary | None) -> str:
    """spec §2.2.3: up to 64 rounds; each placeholder, in order of appearance, replaces its first
    occurrence with ``words[index % n]`` (in-order) or ``rng.choice(words)``.

    A missing or empty list replaces *every* occurrence of the placeholder with its bare name and
    draws nothing from ``rng`` (Fooocus's fallback path).
    """
    for _ in range(MAX_WILDCARD_DEPTH):
        placeholders = WILDCARD_RE.findall(text)
        if not placeholders:
            return text
        for name in placeholders:
            words = library.words(name) if library is not None else []
            if not words:
                log.debug("wildcard %r missing or empty; using the bare name", name)
                text = text.replace(f"__{name}__", name)
            elif in_order:
                text = text.replace(f"__{name}__", words[index % len(words)], 1)
            else:
                text = text.replace(f"__{name}__", rng.choice(words), 1)
    log.warning("wildcards nested deeper than %d rounds; left as is", MAX_WILDCARD_DEPTH)
    return text


def apply_arrays(text: str, index: int) -> str:
    """spec §2.2.4: ``[[a,b,c]]`` picks by ``index`` in mixed radix (first array fastest).

    Elements are split on ',' without stripping; ``index`` wraps at the product of the sizes.
    Each array is replaced once, left to right.
    """
    arrays = ARRAY_RE.findall(text)
    if not arrays:
        return text
    choices = [body.split(",") for body in arrays]
    combinations = 1
    for words in choices:
        combinations *= len(words)
    remainder = index % combinations
    picked = []
    for words in choices:
        picked.append(words[remainder % len(words)])
        remainder //= len(words)
    for body, word in zip(arrays, picked, strict=True):
        text = text.replace(f"[[{body}]]", word, 1)
    return text
