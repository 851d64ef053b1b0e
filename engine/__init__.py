"""Hooocus engine: Fooocus-exact SDXL generation behind a job queue with one GPU worker.

Public API::

    from engine import Engine, GenerationRequest

Importing this package has no side effects: no torch import, no threads, no file access.
"""

from __future__ import annotations

from engine.core.errors import HooocusError, JobCancelled
from engine.core.events import Cancelled, Done, Event, Failed, ImageReady, Preview, Progress, Queued, Started
from engine.core.jobs import CancelToken, Engine, Job, JobState, RunContext, Runner
from engine.core.request import FreeUSettings, GenerationRequest, LoraSpec

__all__ = [
    "Cancelled", "CancelToken", "Done", "Engine", "Event", "Failed", "FreeUSettings", "GenerationRequest",
    "HooocusError", "ImageReady", "Job", "JobCancelled", "JobState", "LoraSpec", "Preview", "Progress",
    "Queued", "RunContext", "Runner", "Started",
]
