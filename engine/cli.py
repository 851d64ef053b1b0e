"""The ``hooocus`` command: generate, serve, mcp, setup, models, config.

Settings are built once here (defaults < hooocus.toml < HOOOCUS_* < flags) and passed down. Bad
arguments give a one-line error and exit code 2; no traceback reaches the terminal.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from engine.constants import OUTPUT_FORMATS, PERFORMANCE_NAMES, SAMPLER_NAMES, SCHEDULER_NAMES
from engine.errors import HooocusError

EXIT_USAGE = 2
EXIT_FAILED = 1


class CliError(Exception):
    """A usage problem: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + message
        raise CliError(f"{self.prog}: {message}")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="hooocus.toml to read (default: ./hooocus.toml)")
    parser.add_argument("--data-dir", type=Path, help="data folder (models, outputs, history)")
    parser.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def settings_from_args(args: argparse.Namespace, **extra: Any):
    """Build the one frozen Settings object from the parsed flags (None = not given)."""
    from engine.settings import load_settings

    cli = {"data_dir": getattr(args, "data_dir", None), "device": getattr(args, "device", None),
           "log_level": getattr(args, "log_level", None), **extra}
    return load_settings(cli=cli, toml_path=getattr(args, "config", None))


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# -- generate ------------------------------------------------------------------------------------

def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate images from a prompt and write them to disk")
    p.add_argument("prompt", nargs="?", default=None)
    p.add_argument("--negative", dest="negative_prompt")
    p.add_argument("--style", dest="styles", action="append", help="style name; repeat for several")
    p.add_argument("--performance", choices=PERFORMANCE_NAMES)
    p.add_argument("--aspect-ratio")
    p.add_argument("--model", help="model name, path, HF repo id, or 'demo'")
    p.add_argument("--refiner", dest="refiner_model")
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
    p.add_argument("--server", help="ws://host:port of a running 'hooocus serve' to generate on")
    p.add_argument("--token", help="token for --server (default: $HOOOCUS_TOKEN)")
    p.add_argument("--no-progress", action="store_true")
    _add_common(p)
    p.set_defaults(func=_cmd_generate)


def _parse_lora(text: str) -> dict[str, Any]:
    name, sep, weight = text.rpartition(":")
    if not sep:
        return {"name": text, "weight": 1.0}
    try:
        return {"name": name, "weight": float(weight)}
    except ValueError:
        raise CliError(f"--lora: bad weight in {text!r}; use NAME:WEIGHT") from None


def request_fields_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The GenerationRequest fields given on the command line (a start request may supply the rest)."""
    fields: dict[str, Any] = {}
    if args.from_image is not None or args.from_log is not None:
        fields.update(_start_request(args))
    if args.prompt is not None:
        fields["prompt"] = args.prompt
    for name in ("negative_prompt", "styles", "performance", "aspect_ratio", "refiner_model", "seed", "steps",
                 "width", "height", "sampler", "scheduler", "cfg", "sharpness", "image_number", "output_format"):
        value = getattr(args, name)
        if value is not None:
            fields[name] = value
    if args.model is not None:
        fields["base_model"] = args.model
    if args.lora:
        fields["loras"] = [_parse_lora(text) for text in args.lora]
    return fields


def _start_request(args: argparse.Namespace) -> dict[str, Any]:
    from engine import metadata

    if args.from_image is not None:
        request, warnings = metadata.request_from_image_file(args.from_image)
    else:
        request, warnings = metadata.request_from_log_file(args.from_log)
    for warning in warnings:
        print(f"note: {warning}", file=sys.stderr)
    return request.model_dump(exclude_unset=True)


def _cmd_generate(args: argparse.Namespace) -> int:
    from engine.outputs import write_image
    from engine.request import GenerationRequest

    fields = request_fields_from_args(args)
    model = fields.get("base_model")
    settings, _ = settings_from_args(args)
    _configure_logging(settings.log_level if args.log_level is None else args.log_level)
    request = GenerationRequest.parse(fields)
    out_dir = args.out or settings.resolved_output_dir
    if args.server:
        images = _generate_remote(args, request)
    else:
        images = _generate_local(settings, request, model=model, show_progress=not args.no_progress)
    for image in images:
        path = write_image(out_dir, image)
        if args.json:
            print(json.dumps({"path": str(path), "seed": str(image.seed), "width": image.width,
                              "height": image.height, "sha256": image.sha256}))
        else:
            print(path)
    return 0


def _generate_local(settings, request, *, model: str | None, show_progress: bool):
    from tqdm import tqdm

    from engine.events import Cancelled, Failed, ImageReady, Progress, Started, Warning_
    from engine.runtime import create_runtime

    runtime = create_runtime(settings, model=model).start()
    bar = None
    images: list[ImageReady] = []
    try:
        job = runtime.engine.submit(request, owner="cli")
        for event in job.iter_events():
            if isinstance(event, Started) and show_progress:
                bar = tqdm(total=event.total_steps, unit="step", file=sys.stderr, dynamic_ncols=True)
            elif isinstance(event, Progress) and bar is not None and event.stage in ("sample", "refine"):
                bar.update(1)
            elif isinstance(event, Warning_):
                print(f"warning: {event.message}", file=sys.stderr)
            elif isinstance(event, ImageReady):
                images.append(event)
            elif isinstance(event, Failed):
                raise HooocusError(event.message, code=event.code)
            elif isinstance(event, Cancelled):
                raise HooocusError(f"cancelled ({event.reason})", code="cancelled")
    except KeyboardInterrupt:
        runtime.engine.interrupt(reason="user")
        raise
    finally:
        if bar is not None:
            bar.close()
        runtime.close()
    return images


def _generate_remote(args: argparse.Namespace, request):
    import os

    from hooocus_ws.client import generate_images_sync

    token = args.token or os.environ.get("HOOOCUS_TOKEN")
    if not token:
        raise CliError("--server needs a token: --token or $HOOOCUS_TOKEN")
    return generate_images_sync(args.server, token, request.model_dump(mode="json", exclude_unset=True))


# -- models, config, setup -------------------------------------------------------------------------

def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list usable model files and why others are skipped")
    p.add_argument("--json", action="store_true")
    _add_common(p)
    p.set_defaults(func=_cmd_models)


def _cmd_models(args: argparse.Namespace) -> int:
    from engine.models.registry import registry_from_settings

    settings, _ = settings_from_args(args)
    registry = registry_from_settings(settings)
    rows = []
    for kind in ("checkpoints", "loras", "vae", "embeddings"):
        for entry in registry.list(kind):
            row = {"kind": kind, "name": entry.name, "path": str(entry.path), "size_bytes": entry.size_bytes,
                   "usable": entry.usable, "reason": entry.reason,
                   "sha256": registry.sha256(entry.path) if entry.usable else None}
            rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            status = "ok" if row["usable"] else f"skipped: {row['reason']}"
            sha = (row["sha256"] or "")[:10]
            print(f"{row['kind']:<12} {row['name']:<50} {row['size_bytes'] / 2**20:9.1f} MiB  {sha:<10}  {status}")
        if not rows:
            print("no model files found; run 'hooocus setup' or point --config at your model folders",
                  file=sys.stderr)
    return 0


def _add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("config", help="show the effective configuration")
    p.add_argument("action", choices=["show"])
    p.add_argument("--json", action="store_true")
    _add_common(p)
    p.set_defaults(func=_cmd_config)


def _cmd_config(args: argparse.Namespace) -> int:
    settings, sources = settings_from_args(args)
    values = settings.masked_dump()
    if args.json:
        print(json.dumps({k: {"value": v, "source": sources[k]} for k, v in values.items()}, indent=2))
    else:
        for key, value in values.items():
            print(f"{key} = {json.dumps(value)}    # {sources[key]}")
    return 0


def _add_setup(sub: argparse._SubParsersAction) -> None:
    from engine import setup_assets

    p = sub.add_parser("setup", help="download models and Fooocus data files (pinned, checksummed)")
    setup_assets.add_arguments(p)
    _add_common(p)
    p.set_defaults(func=_cmd_setup)


def _cmd_setup(args: argparse.Namespace) -> int:
    from engine import setup_assets

    settings, _ = settings_from_args(args)
    _configure_logging(settings.log_level)
    return setup_assets.cli_setup(args, settings)


# -- entry point ---------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hooocus", description="Fooocus-quality SDXL generation as a service.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_generate(sub)
    for module_name in ("hooocus_ws.cli", "hooocus_mcp.cli"):
        module = __import__(module_name, fromlist=["register"])
        module.register(sub)
    _add_setup(sub)
    _add_models(sub)
    _add_config(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except CliError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    except HooocusError as exc:
        print(f"hooocus: error [{exc.code}]: {exc.message}", file=sys.stderr)
        return EXIT_USAGE if exc.code in ("invalid_request", "unknown_model", "unknown_style", "unknown_lora",
                                          "unknown_preset", "unsafe_file", "model_invalid") else EXIT_FAILED
    except KeyboardInterrupt:
        print("hooocus: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
