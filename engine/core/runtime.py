"""The objects one Hooocus process shares between its front doors, built once at the entry point.

:func:`create_runtime` is the one place that decides how a process records its work, so
``hooocus serve``, ``hooocus mcp`` and ``hooocus generate`` do it the same way: every job goes into
the job history (``<data_dir>/history.sqlite3``, engine.core.history), every finished image is
written to the output folder (dated folders, engine.core.outputs, via the history) and kept by
content hash in ``<data_dir>/images`` (the image store's folder), so a later process can still
answer for an earlier one's jobs and images. ``record_history=False`` keeps everything in memory
(tests, benchmarks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.core.history import JobHistory
from engine.core.inputs import InputResolver, UploadStore
from engine.core.jobs import Engine, Runner
from engine.core.settings import Settings
from engine.core.store import ImageStore

IMAGE_STORE_DIR_NAME = "images"
UPLOADS_DIR_NAME = "uploads"


@dataclass
class Runtime:
    """One engine (one worker per device), one image store, one settings object, and the job
    history when this process records its work."""

    settings: Settings
    engine: Engine
    images: ImageStore
    #: Attached to ``engine`` (records every job submitted); closed by :meth:`close`. None = not recording.
    history: JobHistory | None = None
    #: Images uploaded by principals (issue 14), resolved with the generated images at submit.
    uploads: UploadStore | None = None
    #: Describe (image -> prompt, engine/describe), sharing the engine's device lock and the uploads.
    describer: Any = None
    #: Called by :meth:`close` after the engine stops (the Ray backend deletes its application).
    on_close: Callable[[], None] | None = None

    def start(self) -> Runtime:
        self.engine.start()
        return self

    def close(self, *, grace_s: float = 0.0) -> None:
        """Stop the engine (the running job gets ``grace_s``), then close the history, which
        records those last events (cancelled / done) first."""
        try:
            if self.describer is not None:
                self.describer.close()
            self.engine.close(grace_s=grace_s)
        finally:
            try:
                if self.history is not None:
                    self.history.close()
            finally:
                # Once: the server's drain and its lifespan both close the runtime, and a second
                # Ray undeploy after disconnecting would start a fresh local Ray to delete from.
                on_close, self.on_close = self.on_close, None
                if on_close is not None:
                    on_close()


def image_store_folder(settings: Settings) -> Path:
    """Where a recording runtime keeps full images by content hash (``<data_dir>/images``)."""
    return Path(settings.data_dir) / IMAGE_STORE_DIR_NAME


def create_runtime(settings: Settings, *, runner: Runner | None = None, runners: Sequence[Runner] | None = None,
                   model: str | None = None, record_history: bool = True) -> Runtime:
    """Build (not start) the runtime. Without ``runner``/``runners``, the runners are created: one :class:`engine.core.families.FamilyRunner` per entry of ``settings.devices``
    (auto: every visible GPU, else the CPU), each with its own models of both families (SDXL and
    FLUX.1, picked per job by the model the request names), ``model`` (a name, path, repo id, "demo"
    or "demo-flux"; None = settings.default_model) being the default for requests that name none;
    with ``backend = "ray"``, one RayRunner per job slot of the cluster. Loading weights happens lazily on the worker threads, so this returns quickly.

    ``record_history`` (the default for every command) opens the job history from ``settings``
    (which marks jobs a crashed earlier process left unfinished as interrupted), attaches it before
    any job can be submitted, writes images to ``settings.resolved_output_dir`` and keeps the image
    store's folder. False: nothing is written to disk."""
    if runner is not None and runners is not None:
        raise TypeError("give runner or runners, not both")
    on_ray = runner is None and runners is None and settings.backend == "ray"
    if runner is not None:
        all_runners: list[Runner] = [runner]
    elif runners is not None:
        all_runners = list(runners)
    elif on_ray:
        from engine.distributed.ray_serve import RayRunner  # ray only with this backend

        # One front-door worker per job slot of the cluster (replicas × max ongoing requests); a
        # RayRunner keeps no per-call state, so each worker gets its own.
        all_runners = [RayRunner.from_settings(settings) for _ in range(settings.ray_job_slots)]
    else:
        from engine.core.families import FamilyRunner
        from engine.sdxl.models.loading import expand_devices  # torch is imported only here

        # Each device serves both families (issue 17): its runner routes a job to the SDXL or the
        # FLUX.1 runner by the model it names; each runner sees its own device in its settings.
        all_runners = [FamilyRunner(settings.model_copy(update={"device": device}), model=model)
                       for device in expand_devices(settings.devices, settings.device)]
    from engine.io.presets import PresetBook  # the composition root wires the io layer into the core

    history = JobHistory.from_settings(settings) if record_history else None
    images = ImageStore(folder=image_store_folder(settings) if record_history else None,
                        max_folder_bytes=settings.images_max_disk_bytes)
    uploads = UploadStore(max_bytes=settings.uploads_max_bytes, max_upload_bytes=settings.max_upload_bytes,
                          max_pixels=settings.max_input_pixels,
                          max_bytes_per_owner=settings.uploads_max_bytes_per_principal,
                          folder=Path(settings.data_dir) / UPLOADS_DIR_NAME if record_history else None)
    # sha256 references find the caller's uploads, then images the caller's jobs generated.
    resolver = InputResolver(uploads, images=images, history=history, max_pixels=settings.max_input_pixels,
                             max_upload_bytes=settings.max_upload_bytes)
    engine = Engine(all_runners, max_queue=settings.queue_size,
                    max_queued_per_owner=settings.max_queued_per_principal,
                    image_sink=images.put, apply_preset=PresetBook.from_settings(settings).apply,
                    resolve_inputs=resolver, max_batch=settings.max_batch, batch_window_ms=settings.batch_window_ms)
    on_close = None
    if on_ray:  # last, so that nothing before it can fail and leave the application deployed
        from engine.distributed.ray_serve import attach, deploy

        try:
            on_close = deploy(settings, model=model) if settings.ray_deploy else attach(settings)
        except BaseException:
            if history is not None:
                history.close()
            raise
    if history is not None:
        history.attach(engine)
    from engine.describe.service import Describer  # torch-free; its models load on first use

    describer = Describer(settings, resolve_image=resolver.resolve_one, device_lock=engine.device_lock)
    return Runtime(settings=settings, engine=engine, images=images, history=history, uploads=uploads,
                   describer=describer, on_close=on_close)
