"""Every error class in engine/core/errors.py is raised somewhere and has an HTTP status (issue 13.6:
no error class that nothing raises)."""

from __future__ import annotations

import re
from pathlib import Path

from engine.core import errors

REPO = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("engine", "hooocus", "hooocus_ws", "hooocus_mcp")


def _error_classes() -> list[type[errors.HooocusError]]:
    return [value for value in vars(errors).values()
            if isinstance(value, type) and issubclass(value, errors.HooocusError) and value is not errors.HooocusError]


def test_every_error_class_is_raised_and_mapped() -> None:
    sources = "\n".join(path.read_text(encoding="utf-8") for folder in SOURCE_DIRS
                        for path in sorted((REPO / folder).rglob("*.py")) if path.name != "errors.py")
    never_raised = [cls.__name__ for cls in _error_classes()
                    if not re.search(rf"raise\s+(errors\.)?{cls.__name__}\(", sources)]
    assert never_raised == []
    assert [cls.code for cls in _error_classes() if cls.code not in errors.HTTP_STATUS_BY_CODE] == []
