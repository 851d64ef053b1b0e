"""Moved to :mod:`engine.io.registry` (the model folders serve both families: the Flux runner lists and
resolves LoRAs through it too, and engine.flux may not import engine.sdxl). Kept so code written against
the old path still imports."""

from engine.io.registry import (  # noqa: F401
    KINDS,
    CheckpointKind,
    ModelEntry,
    ModelKind,
    ModelRegistry,
    detect_checkpoint_kind,
    has_component,
    is_plain_name,
    registry_from_settings,
)
