"""Image inputs at the MCP door (issue 14).

An agent names an input image by the link an earlier call gave it (``hooocus://images/<sha256>``),
by ``sha256:<sha256>``, or by a data URI; :func:`image_ref_from_mcp` maps the link to the engine's
reference form (engine/core/inputs.py), which then checks ownership and decodes at submit. The
focused ``edit_image`` tool is still to come (it needs the submit/follow/render helpers that the
tools.py split exposes).
"""

from __future__ import annotations

import re

from engine.core.errors import InvalidRequest

_LINK_RE = re.compile(r"^hooocus://images/([0-9a-fA-F]{64})(?:\.[a-z]{3,4})?$")


def image_ref_from_mcp(value: str | None, *, field: str) -> str | None:
    """``hooocus://images/<sha>`` → ``sha256:<sha>``; other strings pass through to the engine,
    which validates them; a malformed hooocus:// link is ``invalid_request`` at ``field``."""
    if value is None:
        return None
    match = _LINK_RE.match(value)
    if match:
        return f"sha256:{match.group(1).lower()}"
    if value.startswith("hooocus://"):
        raise InvalidRequest(f"{field}: not an image link: use hooocus://images/<sha256> from an earlier result",
                             loc=(field,))
    return value
