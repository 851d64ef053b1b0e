"""``hooocus setup``: the command line. Prints the plan, confirms, installs; returns an EXIT_* code."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from engine.core.errors import EXIT_OK, EXIT_USAGE, HooocusError, InvalidRequest, exit_code_for
from engine.io.setup import catalogue
from engine.io.setup.catalogue import Asset, select_assets
from engine.io.setup.install import _human, plan_setup, run_setup

# -- command line -------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``hooocus setup`` flags (``--data-dir`` comes from the common flags)."""
    groups = ", ".join(sorted({a.group for a in catalogue.DEFAULT_ASSETS}))
    optional = ", ".join(sorted({a.group for a in catalogue.OPTIONAL_ASSETS}))
    parser.add_argument("--only", action="append", metavar="NAME",
                        help=f"an asset or group ({groups}; optional: {optional}); repeat")
    parser.add_argument("--all", action="store_true", help=f"also install the optional groups ({optional})")
    parser.add_argument("--fooocus-dir", action="append", type=Path, default=[], metavar="PATH",
                        help="link files from an existing Fooocus (or ComfyUI / A1111) folder instead of downloading")
    parser.add_argument("--yes", action="store_true", help="download without asking")
    parser.add_argument("--list", action="store_true", help="show what is present and missing; download nothing")
    parser.add_argument("--verify", action="store_true", help="re-hash large files that are already present")
    parser.add_argument("--mirror", metavar="URL", help="fetch every file from this base URL instead (same paths)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--trust-sha256", action="append", default=[], metavar="[NAME=]HEX",
                        help="pin an asset that has no published sha256 (e.g. upscale/...) to the sha256 you "
                             "checked; its pickle is converted only if the download has exactly these bytes")


def trust_pins(assets: Sequence[Asset], values: Sequence[str]) -> list[Asset]:
    """``assets`` with each ``--trust-sha256 [NAME=]HEX`` applied to an unpinned asset.

    NAME may be left out when exactly one selected asset is unpinned. A pinned asset cannot be
    re-pinned (its published pin wins), and HEX must be a full sha256: an InvalidRequest otherwise.
    """
    pins: dict[str, str] = {}
    unpinned = [a.name for a in assets if a.sha256 is None]
    for value in values:
        name, sep, digest = value.rpartition("=")
        digest = digest.strip().lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise InvalidRequest(f"--trust-sha256 {value!r}: expected 64 hex digits", loc=("trust_sha256",))
        if not sep:
            if len(unpinned) != 1:
                raise InvalidRequest(f"--trust-sha256 without NAME= needs exactly one unpinned asset selected; "
                                     f"unpinned: {', '.join(unpinned) or 'none'}", loc=("trust_sha256",))
            name = unpinned[0]
        known = {a.name: a for a in assets}
        if name not in known:
            raise InvalidRequest(f"--trust-sha256: {name!r} is not a selected asset", loc=("trust_sha256",))
        if known[name].sha256 is not None:
            raise InvalidRequest(f"--trust-sha256: {name} already has a published pin", loc=("trust_sha256",))
        pins[name] = digest
    return [replace(a, sha256=pins[a.name]) if a.name in pins else a for a in assets]


def _with_mirror(asset: Asset, base: str) -> Asset:
    mirror, original = urlsplit(base), urlsplit(asset.url)
    path = mirror.path.rstrip("/") + original.path
    return replace(asset, url=urlunsplit((mirror.scheme, mirror.netloc, path, original.query, "")))


def cli_setup(args: argparse.Namespace | Sequence[str], settings: Any = None) -> int:
    """``hooocus setup``: print the plan, confirm, install. Returns an EXIT_* code: EXIT_OK, EXIT_USAGE
    (bad flags, or not confirmed), or what :func:`exit_code_for` gives for the error that stopped it
    (EXIT_FAILED for files still missing). Errors are one message, never a traceback."""
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(prog="hooocus setup")
        parser.add_argument("--data-dir", type=Path)
        add_arguments(parser)
        args = parser.parse_args(list(args))
    if settings is not None:
        data_dir = Path(settings.data_dir)
    else:
        from engine.core.settings import default_data_dir

        data_dir = Path(getattr(args, "data_dir", None) or default_data_dir())
    try:
        assets = select_assets(catalogue.ALL_ASSETS, args.only, include_optional=args.all)
        assets = trust_pins(assets, args.trust_sha256)
    except HooocusError as exc:
        print(f"hooocus setup: {exc.message}", file=sys.stderr)
        return exit_code_for(exc)
    if args.mirror:
        assets = [_with_mirror(a, args.mirror) for a in assets]
    plan = plan_setup(data_dir, assets=assets, verify=args.verify)
    print(f"data folder: {data_dir}")
    for status in plan:
        extra = f" ({status.bytes_present} bytes so far)" if status.state == "partial" else ""
        print(f"  {status.state:<8} {status.asset.name:<55} {_human(status.asset.size_bytes):>10}{extra}")
    todo = [s for s in plan if s.state != "present"]
    chosen = {a.name for a in assets}
    left_out = sorted({a.group for a in catalogue.ALL_ASSETS if a.optional and a.name not in chosen})
    if left_out:
        print(f"  optional, not selected: {', '.join(left_out)} (add --only GROUP or --all)")
    if args.list or not todo:
        print("everything is in place" if not todo else f"{len(todo)} files to install")
        return EXIT_OK
    total = sum((s.asset.size_bytes or 0) - s.bytes_present for s in todo)
    if not args.yes:
        if not sys.stdin.isatty():
            print(f"hooocus setup: {len(todo)} files ({_human(total)}) to install; re-run with --yes", file=sys.stderr)
            return EXIT_USAGE
        if input(f"Install {len(todo)} files ({_human(total)}) into {data_dir}? [y/N] ").strip().lower() not in (
                "y", "yes"):
            return EXIT_USAGE
    try:
        run_setup(data_dir, assets=assets, link_from=args.fooocus_dir, progress=not args.no_progress,
                  verify=args.verify, echo=print)
    except HooocusError as exc:
        print(f"hooocus setup: {exc.message}", file=sys.stderr)
        return exit_code_for(exc)
    print("set-up complete")
    for root in args.fooocus_dir:
        print(f"to use every model in {root}, add to hooocus.toml:\n"
              f"  checkpoint_dirs = [\"{Path(root) / 'models' / 'checkpoints'}\"]\n"
              f"  lora_dirs = [\"{Path(root) / 'models' / 'loras'}\"]")
    return EXIT_OK

