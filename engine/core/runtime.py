"""The objects one Hooocus process shares between its front doors, built once at the entry point."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.core.jobs import Engine, Runner
from engine.core.settings import Settings
from engine.core.store import ImageStore


@dataclass
class Runtime:
    """One engine (one GPU worker), one image store, one settings object."""

    settings: Settings
    engine: Engine
    images: ImageStore

    def start(self) -> Runtime:
        self.engine.start()
        return self

    def close(self, *, grace_s: float = 0.0) -> None:
        self.engine.close(grace_s=grace_s)


def create_runtime(settings: Settings, *, runner: Runner | None = None, model: str | None = None,
                   image_folder: Path | None = None) -> Runtime:
    """Build (not start) the runtime. Without ``runner`` the SDXL runner is created for ``model``
    (a name, path, repo id or "demo"; None = settings.default_model). Loading weights happens
    lazily on the worker thread, so this returns quickly. ``image_folder`` keeps the image store
    on disk too (``hooocus mcp``: the next process reads images by hash)."""
    if runner is None:
        from engine.sdxl.pipeline import SDXLRunner  # torch is imported only here

        runner = SDXLRunner(settings, model=model)
    from engine.io.presets import PresetBook  # the composition root wires the io layer into the core

    images = ImageStore(folder=image_folder)
    engine = Engine(runner, max_queue=settings.queue_size, max_queued_per_owner=settings.max_queued_per_principal,
                    image_sink=images.put, apply_preset=PresetBook.from_settings(settings).apply)
    return Runtime(settings=settings, engine=engine, images=images)
