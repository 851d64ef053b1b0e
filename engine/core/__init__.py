"""The family-neutral core: requests, events, errors, the job queue and its worker, settings, the
runtime a process shares between its front doors, image storage, output files and job history.
Nothing here imports a model family (engine.sdxl) or torch."""
