"""The ``hooocus`` command: generate, serve, mcp, setup, describe, models, config.

This module sits above the engine and both front doors and is the only place that joins them:
``serve`` gets the ``/mcp`` mount built by ``hooocus_mcp``, ``mcp --connect`` gets the websocket
client of ``hooocus_ws``; the doors never import each other nor this module.

For every command, :func:`main` builds the settings once (defaults < hooocus.toml < HOOOCUS_* <
flags; :func:`engine.core.settings.settings_from_args`), sets up logging once (to stderr, secrets
masked; :func:`engine.core.logging_setup.configure_logging`) and passes both down. Bad arguments
give a one-line error and exit code 2 (exit codes: :mod:`engine.core.errors`); no traceback reaches
the terminal.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from engine.core.constants import (
    DEMO_FLUX_MODELS,
    DEMO_MODEL,
    DEMO_REFINER,
    OUTPUT_FORMATS,
    PERFORMANCE_NAMES,
    SAMPLER_NAMES,
    SCHEDULER_NAMES,
)
from engine.core.errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    HooocusError,
    UnknownModel,
    UsageError,
    exit_code_for,
)
from engine.core.logging_setup import configure_logging
from engine.core.settings import settings_from_args
from hooocus import describe_cmd, enhance_flags, image_flags

if TYPE_CHECKING:
    from engine.core.runtime import Runtime
    from engine.core.settings import Settings

DEMO_MODELS: tuple[str, ...] = (DEMO_MODEL, DEMO_REFINER, *DEMO_FLUX_MODELS)
BUILTIN_MODEL_NOTE = "tiny random-weight demo: paints abstract noise; 'hooocus setup' installs a real model"




class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + message
        raise UsageError(f"{self.prog}: {message}")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="hooocus.toml to read (default: ./hooocus.toml)")
    parser.add_argument("--data-dir", type=Path, help="data folder (models, outputs, history)")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


# -- generate ------------------------------------------------------------------------------------

def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate images from a prompt and write them to disk")
    p.add_argument("prompt", nargs="?", default=None)
    p.add_argument("--negative", dest="negative_prompt")
    p.add_argument("--style", dest="styles", action="append", help="style name; repeat for several")
    p.add_argument("--performance", choices=PERFORMANCE_NAMES)
    p.add_argument("--aspect-ratio")
    p.add_argument("--model", help="model name, path, HF repo id, 'demo' or 'demo-flux'")
    p.add_argument("--refiner", dest="refiner_model")
    p.add_argument("--preset", help="Fooocus preset name (presets/<name>.json); flags given here override it")
    p.add_argument("--seed", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--sampler", choices=SAMPLER_NAMES)
    p.add_argument("--scheduler", choices=SCHEDULER_NAMES)
    p.add_argument("--cfg", type=float)
    p.add_argument("--sharpness", type=float)
    p.add_argument("--image-number", type=int)
    p.add_argument("--lora", action="append", default=None, metavar="NAME[:WEIGHT]")
    p.add_argument("--format", dest="output_format", choices=OUTPUT_FORMATS)
    p.add_argument("--out", type=Path, help="output folder (default: the data folder's outputs/)")
    p.add_argument("--json", action="store_true", help="print one JSON object per image")
    p.add_argument("--from-image", type=Path, help="start from the parameters stored in an image")
    p.add_argument("--from-log", type=Path, help="start from a Fooocus log.html or a copied parameter block")
    p.add_argument("--log-index", type=int, default=0, metavar="N",
                   help="with --from-log on a log.html: which entry (0 = newest, as Fooocus lists them)")
    p.add_argument("--model-memory-gb", type=float, metavar="GB",
                   help="memory each device may keep loaded models in, least recently used out first (default: GPU total minus max(4 GiB, 25%%); CPU: half the RAM)")
    p.add_argument("--server", help="ws://host:port of a running 'hooocus serve' to generate on")
    p.add_argument("--token", help="token for --server (default: $HOOOCUS_TOKEN)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--low-vram", dest="low_vram", action="store_const", const=True,
                   help="keep weights in CPU memory and stream them to the GPU as used (SDXL and FLUX.1 on small cards)")
    image_flags.add_arguments(p)
    enhance_flags.add_arguments(p)
    _add_common(p)
    p.set_defaults(func=_cmd_generate)


def _parse_lora(text: str) -> dict[str, Any]:
    name, sep, weight = text.rpartition(":")
    if not sep:
        return {"name": text, "weight": 1.0}
    try:
        return {"name": name, "weight": float(weight)}
    except ValueError:
        raise UsageError(f"--lora: bad weight in {text!r}; use NAME:WEIGHT") from None


def request_fields_from_args(args: argparse.Namespace, settings: Settings,
                             uploads: dict[str, bytes] | None = None) -> dict[str, Any]:
    """The GenerationRequest fields: the start file's (``--from-image``/``--from-log``), then the
    flags on top (a flag always wins). ``base_model`` is set only when ``--model`` is a name; a
    path is the operator's own model and goes to the runner instead (see :func:`_operator_model`).
    Input files (``--image``/``--mask``) become references; with ``--server`` their bytes go into
    ``uploads`` (field -> bytes) for the caller to upload first (hooocus/image_flags.py)."""
    fields: dict[str, Any] = {}
    if args.from_image is not None or args.from_log is not None:
        fields.update(_start_request(args, settings))
    if args.prompt is not None:
        fields["prompt"] = args.prompt
    for name in ("preset", "negative_prompt", "styles", "performance", "aspect_ratio", "refiner_model", "seed", "steps",
                 "width", "height", "sampler", "scheduler", "cfg", "sharpness", "image_number", "output_format"):
        value = getattr(args, name)
        if value is not None:
            fields[name] = value
    if args.model is not None and not _is_path(args.model):
        fields["base_model"] = args.model
    if args.lora:
        fields["loras"] = [_parse_lora(text) for text in args.lora]
    fields.update(image_flags.task_fields(args))
    enhance = enhance_flags.enhance_field(args)
    if enhance is not None:
        fields["enhance"] = enhance
    image_flags.check_task(args, fields)
    refs, files = image_flags.file_fields(args, max_bytes=settings.max_upload_bytes,
                                          max_pixels=settings.max_input_pixels)
    fields.update(refs)
    slots, slot_files = image_flags.image_prompt_fields(args, max_bytes=settings.max_upload_bytes,
                                                        max_pixels=settings.max_input_pixels)
    if slots:
        fields["image_prompts"] = slots
    if uploads is not None:
        uploads.update(files)
        uploads.update(slot_files)
    return fields


def _style_folders(settings: Settings) -> list[Path]:
    """The style folders the runner reads (engine.sdxl.pipeline): the configured ones, else the set-up
    folder ``data_dir/sdxl_styles`` when it exists."""
    if settings.style_dirs:
        return list(settings.style_dirs)
    default = settings.data_dir / "sdxl_styles"
    return [default] if default.is_dir() else []


def _start_request(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """What a Fooocus image / log.html / pasted block asks for, as request fields (spec §13.6).

    Names that are not installed here (models, LoRAs, VAE, styles) are dropped with a printed note,
    as Fooocus keeps its current choice, so the request is still valid. With ``--server`` the
    names are kept: the server, not this machine, knows what it has installed.
    """
    from engine.io import metadata
    from engine.io.registry import ModelRegistry
    from engine.prompts.styles import StyleLibrary

    styles = StyleLibrary.load(_style_folders(settings))
    context: dict[str, Any] = {"styles": styles}
    if not args.server:
        registry = ModelRegistry.from_settings(settings)
        context.update(known_styles=styles.legal_names(), known_models=[*registry.names("checkpoints"), *DEMO_MODELS],
                       known_loras=registry.names("loras"), known_vaes=registry.names("vae"))
    if args.from_image is not None:
        request, notes = metadata.request_from_image_file(args.from_image, **context)
    else:
        request, notes = metadata.request_from_log_file(args.from_log, index=args.log_index, **context)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return request.model_dump(exclude_unset=True)


def _is_path(spec: str) -> bool:
    return Path(spec).expanduser().exists()


def _operator_model(settings: Settings, spec: str | None) -> str | None:
    """Check ``--model`` before anything loads: 'demo', an existing weight file or diffusers
    folder, an installed model name, or a repo id in the Hugging Face cache. Returns the spec for
    the runner; raises UnknownModel / UnsafeFile / ModelInvalid (exit code 2) otherwise."""
    if spec is None or spec in DEMO_MODELS:
        return spec
    if _is_path(spec):
        path = Path(spec).expanduser()
        if path.is_file():
            from engine.io.safety import check_weight_file

            check_weight_file(path)  # a pickle or a corrupt file is refused here, not on the worker
        return str(path)
    if spec.startswith((".", "/", "~")):  # meant as a path, and nothing is there
        raise UnknownModel(f"no model file at {spec}")
    from engine.io.registry import ModelRegistry
    from engine.sdxl.models.loading import find_in_hf_cache

    try:
        ModelRegistry.from_settings(settings).resolve("checkpoints", spec)
    except UnknownModel:
        if find_in_hf_cache(spec, cache_dir=settings.hf_cache_dir) is None:
            raise
    return spec


def _flux_model_for(settings: Settings, name: str) -> str | None:
    """The model a local run must load when the request names a FLUX.1 model without ``--model``
    (``--from-image`` of a Flux image): the runtime picks its runner from the operator's model, so a
    Flux name must become it; None for anything else (the SDXL runner resolves it as before)."""
    from engine.io.model_family import is_flux_spec
    from engine.io.registry import ModelRegistry

    if is_flux_spec(name):
        return name
    try:
        path = ModelRegistry.from_settings(settings).resolve("checkpoints", name)
    except HooocusError:
        return None
    return str(path) if is_flux_spec(path) else None


def _cmd_generate(args: argparse.Namespace, settings: Settings) -> int:
    from engine.core.outputs import write_image
    from engine.core.request import GenerationRequest

    if args.server and args.model:
        raise UsageError("hooocus generate: --model and --server exclude each other (the server owns the model)")
    model = None if args.server else _operator_model(settings, args.model)
    uploads: dict[str, bytes] = {}
    request = GenerationRequest.parse(request_fields_from_args(args, settings, uploads))
    if model is None and not args.server and request.base_model is not None:
        model = _flux_model_for(settings, request.base_model)
    if args.out is not None:  # the runtime's history writes the images there (local mode)
        settings = settings.model_copy(update={"output_dir": args.out})
    out_dir = settings.resolved_output_dir
    if args.server:
        written = [(image, None) for image in _generate_remote(args, request, uploads=uploads,
                                                               show_progress=not args.no_progress)]
    else:
        written = _generate_local(settings, request, model=model, show_progress=not args.no_progress)
    for image, recorded_path in written:
        path = recorded_path or write_image(out_dir, image)
        if args.json:
            print(json.dumps({"path": str(path), "seed": str(image.seed), "width": image.width,
                              "height": image.height, "sha256": image.sha256}))
        else:
            print(path)
    return 0


class _ProgressBar:
    """The tqdm bar on stderr over all sampling steps of a job (sample and refine stages)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bar: Any = None

    def start(self, total_steps: int) -> None:
        if self.enabled and self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, unit="step", file=sys.stderr, dynamic_ncols=True)

    def step(self, stage: str) -> None:
        if self._bar is not None and stage in ("sample", "refine"):
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _generate_local(settings: Settings, request: Any, *, model: str | None,
                    show_progress: bool) -> list[tuple[Any, Path | None]]:
    """Run the job in this process; each image with the file the runtime's history wrote for it
    (None if writing failed: the caller writes it then). The job is in the history like a served one."""
    from engine.core.events import Cancelled, Failed, ImageReady, JobWarning, Progress, Started
    from engine.core.runtime import create_runtime

    runtime = create_runtime(settings, model=model)
    bar = _ProgressBar(show_progress)
    images: list[ImageReady] = []
    try:
        # Submit before the worker starts: the runner's checks (styles, LoRAs, models) fail here,
        # as one line, before any model is loaded.
        job = runtime.engine.submit(request, owner="cli")
        runtime.start()
        for event in job.iter_events():
            if isinstance(event, Started):
                bar.start(event.total_steps)
            elif isinstance(event, Progress):
                bar.step(event.stage)
            elif isinstance(event, JobWarning):
                print(f"warning: {event.message}", file=sys.stderr)
            elif isinstance(event, ImageReady):
                images.append(event)
            elif isinstance(event, Failed):
                raise HooocusError(event.message, code=event.code)
            elif isinstance(event, Cancelled):
                raise HooocusError(f"cancelled ({event.reason})", code="cancelled")
        # The files the history wrote, read before close() closes it.
        record = runtime.history.get_job(job.job_id) if runtime.history is not None else None
    except KeyboardInterrupt:
        runtime.engine.interrupt(reason="user")
        raise
    finally:
        bar.close()
        runtime.close()
    paths = {img["index"]: img.get("path") for img in (record or {}).get("images", [])}
    return [(image, Path(paths[image.index]) if paths.get(image.index) else None) for image in images]


def _ws_url(server: str) -> str:
    """``ws://host:port`` -> ``ws://host:port/v1/ws`` (a full endpoint URL is kept)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(server)
    if parts.scheme not in ("ws", "wss"):
        raise UsageError(f"--server: expected ws://host:port or wss://host:port, got {server!r}")
    path = parts.path if parts.path not in ("", "/") else "/v1/ws"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def _generate_remote(args: argparse.Namespace, request: Any, *, uploads: dict[str, bytes],
                     show_progress: bool) -> list[Any]:
    """Run the job on a ``hooocus serve`` over hooocus.v1; the images come back as ImageReady events.
    ``uploads`` (the input files) are uploaded on the same connection first. Refusals and failures
    arrive as HooocusError with the server's code (hooocus_ws.client)."""
    import os

    from hooocus_ws.client import generate_images_sync

    token = args.token or os.environ.get("HOOOCUS_TOKEN")
    if not token:
        raise UsageError("--server needs a token: --token or $HOOOCUS_TOKEN")
    bar = _ProgressBar(show_progress)

    def on_event(event: dict[str, Any]) -> None:  # called on the client's loop thread
        if event["type"] == "started":
            bar.start(int(event.get("total_steps", 0)))
        elif event["type"] == "progress":
            bar.step(str(event.get("stage", "")))
        elif event["type"] == "warning":
            print(f"warning: {event.get('message', '')}", file=sys.stderr)

    try:
        return generate_images_sync(_ws_url(args.server), token, request.model_dump(mode="json", exclude_unset=True),
                                    on_event=on_event, uploads=list(uploads.values()))
    finally:
        bar.close()


# -- models, config, setup -------------------------------------------------------------------------

def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list usable model files and why others are skipped")
    p.add_argument("--json", action="store_true")
    _add_common(p)
    p.set_defaults(func=_cmd_models)


def _refused_weight_files(folders: Sequence[Path]) -> list[tuple[str, Path, str]]:
    """Pickle-format weight files (.ckpt, .pt, .bin ...) in ``folders``: the registry lists only
    .safetensors, so without this an A1111/ComfyUI user would not learn why a model is missing.
    Diffusers folders (with model_index.json) are one model and are not looked into. Never opened."""
    import os

    from engine.core.errors import UnsafeFile
    from engine.io.safety import PICKLE_SUFFIXES, check_weight_file

    found: dict[str, tuple[str, Path, str]] = {}
    for folder in folders:
        if not folder.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(folder):
            if "model_index.json" in filenames:
                dirnames[:] = []
                continue
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for filename in sorted(filenames):
                path = Path(dirpath) / filename
                if filename.startswith(".") or path.suffix.lower() not in PICKLE_SUFFIXES:
                    continue
                name = path.relative_to(folder).as_posix()
                try:
                    check_weight_file(path)  # refuses by suffix before reading a byte
                except UnsafeFile as exc:
                    found.setdefault(name, (name, path, exc.message))
    return list(found.values())


def _cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    from engine.io.registry import KINDS, registry_from_settings

    registry = registry_from_settings(settings)
    rows = []
    for kind in KINDS:
        for entry in registry.list(kind):  # type: ignore[arg-type]
            rows.append({"kind": kind, "name": entry.name, "path": str(entry.path), "size_bytes": entry.size_bytes,
                         "usable": entry.usable, "reason": entry.reason,
                         "sha256": registry.sha256(entry.path) if entry.usable else None})
        for name, path, reason in _refused_weight_files(settings.search_dirs(kind)):  # type: ignore[arg-type]
            rows.append({"kind": kind, "name": name, "path": str(path), "size_bytes": path.stat().st_size,
                         "usable": False, "reason": reason, "sha256": None})
    files_found = bool(rows)
    # The built-in models need no file; listing them tells a new user what runs right now, and that
    # it is not a real model (random weights paint abstract noise).
    # Each built-in model says its family (issue 17): demo-flux / demo-flux-dev are FLUX.1.
    rows += [{"kind": "checkpoints", "name": name, "path": None, "size_bytes": None, "usable": True,
              "reason": None, "sha256": None, "builtin": True, "note": BUILTIN_MODEL_NOTE,
              "family": "flux" if name in DEMO_FLUX_MODELS else "sdxl"} for name in DEMO_MODELS]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            if row.get("builtin"):
                print(f"{row['kind']:<12} {row['name']:<50} {'built in':>13}  {'':<10}  ok ({row['note']})")
                continue
            status = "ok" if row["usable"] else f"skipped: {row['reason']}"
            sha = (row["sha256"] or "")[:10]
            print(f"{row['kind']:<12} {row['name']:<50} {row['size_bytes'] / 2**20:9.1f} MiB  {sha:<10}  {status}")
        if not files_found:
            print("no model files found; run 'hooocus setup' or point --config at your model folders",
                  file=sys.stderr)
    return 0


def _add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show the effective configuration")
    p.add_argument("action", choices=["show"])
    p.add_argument("--json", action="store_true")
    _add_common(p)
    p.set_defaults(func=_cmd_config)


def _cmd_config(args: argparse.Namespace, settings: Settings) -> int:
    _, sources = settings_from_args(args)
    values = settings.masked_dump()
    if args.json:
        print(json.dumps({k: {"value": v, "source": sources[k]} for k, v in values.items()}, indent=2))
    else:
        for key, value in values.items():
            print(f"{key} = {json.dumps(value)}    # {sources[key]}")
    return 0


def _add_setup(sub: argparse._SubParsersAction) -> None:
    from engine.io.setup import command as setup_command

    p = sub.add_parser("setup", help="download models and Fooocus data files (pinned, checksummed)")
    setup_command.add_arguments(p)
    _add_common(p)
    p.set_defaults(func=_cmd_setup)


def _cmd_setup(args: argparse.Namespace, settings: Settings) -> int:
    from engine.io.setup import command as setup_command

    return setup_command.cli_setup(args, settings)


# -- serve and mcp: the front doors, joined here ----------------------------------------------------

def mcp_mount_factory() -> Any:
    """``hooocus_mcp.http.create_mcp_mount`` for ``serve``'s ``/mcp``; None (and a warning) when the
    MCP SDK is not installed, so the websocket and HTTP API still serve."""
    try:
        from hooocus_mcp.http import create_mcp_mount
    except ImportError as exc:
        logging.getLogger("hooocus.serve").warning("MCP endpoint disabled: %s", exc)
        return None
    return create_mcp_mount


def run_serve(args: argparse.Namespace, settings: Settings, *, runtime: Runtime | None = None) -> int:
    """``hooocus serve``: the websocket door's command, with the MCP door mounted at ``/mcp``."""
    from hooocus_ws import cli as ws_cli

    return ws_cli.run(args, settings, runtime=runtime, mcp_mount_factory=mcp_mount_factory())


async def connect_ws_client(url: str, token: str, *, timeout_s: float) -> Any:
    """The websocket door's client, for ``hooocus mcp --connect`` (proxy mode)."""
    from hooocus_ws.client import HooocusClient

    return await HooocusClient.connect(url, token, timeout_s=timeout_s)


def run_mcp(args: argparse.Namespace, settings: Settings) -> int:
    """``hooocus mcp``: the MCP door's command, with the websocket client for ``--connect``."""
    from hooocus_mcp import cli as mcp_cli

    return mcp_cli.run(args, settings, connect_client=connect_ws_client)


# -- entry point ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    from hooocus_mcp import cli as mcp_cli
    from hooocus_ws import cli as ws_cli

    parser = _Parser(prog="hooocus", description="Fooocus-quality SDXL generation as a service.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_generate(sub)
    ws_cli.add_parser(sub).set_defaults(func=run_serve)
    mcp_cli.add_parser(sub).set_defaults(func=run_mcp)
    _add_setup(sub)
    describe_cmd.add_parser(sub, _add_common)
    _add_models(sub)
    _add_config(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        settings, _ = settings_from_args(args)
        # Every command logs to stderr through the one masking handler (stdout carries results,
        # and for 'mcp' the protocol).
        configure_logging(settings.log_level, stream=sys.stderr)
        return int(args.func(args, settings) or 0)
    except UsageError as exc:
        print(exc.message, file=sys.stderr)
        return exit_code_for(exc)
    except HooocusError as exc:
        print(f"hooocus: error [{exc.code}]: {exc.message}", file=sys.stderr)
        return exit_code_for(exc)
    except TimeoutError:  # e.g. waiting on a --server job for longer than the client's limit
        print("hooocus: error [timeout]: gave up waiting", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("hooocus: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
