"""Prompt emphasis: ``(word)``, ``(word:1.5)`` and ``\\(`` escapes, exactly as Fooocus parses them.

Fooocus uses the ComfyUI parser, not A1111's (spec §3.1):

- ``(x)`` multiplies the weight by 1.1; ``((x))`` gives ``1.1 * 1.1 = 1.2100000000000002``.
- ``(x:1.5)`` sets an *absolute* weight: ``((x:1.5))`` is 1.5, not 1.65.
- The weight is what follows the **last** colon (at a position > 0), if Python's ``float()``
  accepts it (spaces, ``1e1``, ``-1``, ``inf`` and ``nan`` included); otherwise the colon stays text.
- A stray ``)`` makes the depth negative, and while it is negative a ``(`` opens no group.
- ``[x]``, ``BREAK``, ``AND`` and ``::`` are ordinary text.

Pure string code; no imports beyond the standard library.
"""

from __future__ import annotations

# spec §3.1 step 1: escaped brackets are hidden behind placeholders while parsing, then restored.
# The same two-character placeholders Fooocus uses, so a prompt behaves identically even if it
# contains them (NUL characters are dropped by the tokenizer clean-up anyway).
_ESCAPED_CLOSE = "\0\1"
_ESCAPED_OPEN = "\0\2"

#: spec §3.1 step 3: the factor of one bracket level.
EMPHASIS_FACTOR = 1.1


def _escape(text: str) -> str:
    return text.replace("\\)", _ESCAPED_CLOSE).replace("\\(", _ESCAPED_OPEN)


def _unescape(text: str) -> str:
    return text.replace(_ESCAPED_CLOSE, ")").replace(_ESCAPED_OPEN, "(")


def split_top_level(text: str) -> list[str]:
    """Split ``text`` into plain pieces and top-level ``(...)`` groups (spec §3.1 step 2).

    A ``(`` at depth 0 flushes the text so far and starts a group; the ``)`` that brings the depth
    back to 0 closes it. A stray ``)`` drives the depth negative, and a ``(`` seen at a negative
    depth is plain text. An unclosed group is returned as plain text, ``(`` included.
    """
    pieces: list[str] = []
    current: list[str] = []
    depth = 0
    for char in text:
        if char == "(":
            if depth == 0 and current:
                pieces.append("".join(current))
                current = []
            current.append(char)
            depth += 1
        elif char == ")":
            depth -= 1
            current.append(char)
            if depth == 0:
                pieces.append("".join(current))
                current = []
        else:
            current.append(char)
    if current:
        pieces.append("".join(current))
    return pieces


def _group_weight(inner: str, weight: float) -> tuple[str, float]:
    """The text and weight inside one ``(...)`` group (spec §3.1 step 3)."""
    colon = inner.rfind(":")
    if colon > 0:
        try:
            # Absolute weight: replaces weight * 1.1 instead of multiplying the outer weight.
            return inner[:colon], float(inner[colon + 1:])
        except ValueError:
            pass
    return inner, weight * EMPHASIS_FACTOR


def parse_emphasis(text: str) -> list[tuple[str, float]]:
    """``text`` -> ``[(piece, weight), ...]`` in prompt order (spec §3.1).

    Pieces keep their spaces (``" dog"``); pieces that are only spaces are kept too, because the
    word split of the tokenizer drops them. An empty prompt gives ``[]``.
    """
    out: list[tuple[str, float]] = []
    # Explicit stack instead of recursion: deeply nested brackets cannot hit the recursion limit.
    # Entries are (text, weight, is_group_body); popping in LIFO order with reversed pushes keeps
    # the left-to-right output order of a depth-first walk.
    stack: list[tuple[str, float, bool]] = [(_escape(text), 1.0, True)]
    while stack:
        piece, weight, needs_split = stack.pop()
        if not needs_split:
            out.append((_unescape(piece), weight))
            continue
        todo: list[tuple[str, float, bool]] = []
        for part in split_top_level(piece):
            # Checked on the string, as Fooocus does: an unclosed tail such as "((a)" also counts.
            if len(part) >= 2 and part[0] == "(" and part[-1] == ")":
                todo.append((*_group_weight(part[1:-1], weight), True))
            else:
                todo.append((part, weight, False))
        stack.extend(reversed(todo))
    return out
