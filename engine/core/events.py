"""Typed job events, shared by every front door.

A job's events form one ordered stream with a per-job ``seq`` (1, 2, ...), assigned when the
event is recorded. Previews are the exception: they are not kept in the replay log (only the
latest one is), because a slow client must only ever see the newest preview.

Events are small frozen dataclasses, not pydantic models: the worker creates one per step.
``to_dict()`` gives the JSON-safe form (seeds as strings, no image bytes).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from engine.core.formats import extension_for_mime


@dataclass(frozen=True)
class Event:
    kind: ClassVar[str] = "event"
    job_id: str
    seq: int = 0  # assigned by Job.emit

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.kind}
        for f in dataclasses.fields(self):
            out[f.name] = getattr(self, f.name)
        return out


@dataclass(frozen=True)
class Queued(Event):
    kind: ClassVar[str] = "queued"
    position: int = 0  # 0 = next to run


@dataclass(frozen=True)
class Started(Event):
    kind: ClassVar[str] = "started"
    #: Every resolved parameter (JSON-safe; seeds as strings).
    params: dict[str, Any] = field(default_factory=dict)
    seeds: tuple[int, ...] = ()
    total_steps: int = 0  # over all images

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["seeds"] = [str(s) for s in self.seeds]
        return out


@dataclass(frozen=True)
class Progress(Event):
    kind: ClassVar[str] = "progress"
    step: int = 0  # 1-based, within the current image
    total_steps: int = 0  # steps of the current image
    stage: str = "sample"  # encode | sample | refine | decode | save
    image_index: int = 0
    image_count: int = 1


@dataclass(frozen=True)
class Preview(Event):
    kind: ClassVar[str] = "preview"
    image_index: int = 0
    step: int = 0
    #: uint8 RGB array [H, W, 3]; front doors resize and encode it as they wish.
    rgb: np.ndarray | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        height, width = (self.rgb.shape[:2] if self.rgb is not None else (0, 0))
        return {"type": self.kind, "job_id": self.job_id, "seq": self.seq, "image_index": self.image_index,
                "step": self.step, "width": int(width), "height": int(height)}


@dataclass(frozen=True)
class ImageReady(Event):
    kind: ClassVar[str] = "image"
    index: int = 0
    seed: int = 0
    data: bytes = field(default=b"", compare=False, repr=False)  # the encoded file
    mime: str = "image/png"
    width: int = 0
    height: int = 0
    sha256: str = ""
    #: Parameters as written into the file (fooocus scheme dict), for history and clients.
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def extension(self) -> str:
        return extension_for_mime(self.mime)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.kind, "job_id": self.job_id, "seq": self.seq, "index": self.index,
                "seed": str(self.seed), "mime": self.mime, "width": self.width, "height": self.height,
                "sha256": self.sha256, "size_bytes": len(self.data)}


@dataclass(frozen=True)
class Done(Event):
    kind: ClassVar[str] = "done"
    images_done: int = 0


@dataclass(frozen=True)
class Cancelled(Event):
    kind: ClassVar[str] = "cancelled"
    images_done: int = 0
    reason: str = "user"  # user | admin | disconnect | shutting_down


@dataclass(frozen=True)
class Failed(Event):
    kind: ClassVar[str] = "failed"
    code: str = "internal_error"
    message: str = ""
    error_id: str = ""  # opaque id that also appears in the server log
    images_done: int = 0


@dataclass(frozen=True)
class Warning_(Event):
    """Something the caller should know that does not stop the job (e.g. expansion assets missing)."""

    kind: ClassVar[str] = "warning"
    code: str = ""
    message: str = ""


TERMINAL_EVENTS: tuple[type[Event], ...] = (Done, Cancelled, Failed)
