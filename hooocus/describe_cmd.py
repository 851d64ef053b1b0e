"""``hooocus describe IMG [--mode photo|anime|both]``: image → prompt (issue 16, spec §12.5).

Locally the file is read and decoded with the input-image limits (engine/core/inputs.py) and the
engine's Describer runs the models from the data folder (``hooocus setup --only describe``); with
``--server`` the file is uploaded to a running ``hooocus serve`` and described there
(``POST /v1/uploads`` then ``POST /v1/describe``). Prints the prompt, then the styles on a second
line (``--json``: one object). Ctrl-C cancels the describe.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.core.errors import HooocusError, NotFound, UsageError

if TYPE_CHECKING:
    from engine.core.settings import Settings

#: The remote HTTP calls: the server cancels its own describe at 300 s (engine/describe/service.py).
REMOTE_TIMEOUT_S = 330.0


def add_parser(sub: argparse._SubParsersAction, add_common: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("describe", help="describe an image as a prompt (Fooocus's Describe)")
    p.add_argument("image", type=Path, help="the image file (PNG, JPEG, WebP, ...)")
    p.add_argument("--mode", choices=["photo", "anime", "both"], default="photo",
                   help="photo: a BLIP caption (default); anime: WD14 tags; both")
    p.add_argument("--json", action="store_true", help="print {prompt, styles, mode, elapsed_s}")
    p.add_argument("--server", help="ws://host:port of a running 'hooocus serve' to describe on")
    p.add_argument("--token", help="token for --server (default: $HOOOCUS_TOKEN)")
    add_common(p)
    p.set_defaults(func=run)
    return p


def _read(path: Path, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise UsageError(f"{path}: {size} bytes, over the {max_bytes}-byte input image limit")
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None


def describe_local(data: bytes, mode: str, settings: Settings) -> dict[str, Any]:
    from engine.core.inputs import decode_image
    from engine.describe.service import IMAGE_LOC, Describer

    rgb = decode_image(data, max_pixels=settings.max_input_pixels, loc=IMAGE_LOC, kind="image")
    ref = "sha256:" + hashlib.sha256(data).hexdigest()

    def resolve(text: str, owner: str) -> Any:  # the one image this command decoded
        if text != ref:
            raise NotFound("no such image", loc=IMAGE_LOC)
        return rgb

    describer = Describer(settings, resolve_image=resolve)
    try:
        return describer.describe({"image": ref, "mode": mode}).to_dict()
    finally:
        describer.close()


def describe_remote(data: bytes, mode: str, server: str, token: str) -> dict[str, Any]:
    import httpx

    base = re.sub(r"^ws", "http", server.split("/v1/ws", 1)[0].rstrip("/"))
    headers = {"Authorization": f"Bearer {token}"}

    def checked(response: httpx.Response, ok: int) -> dict[str, Any]:
        body = response.json()
        if response.status_code != ok:
            error = body.get("error", {}) if isinstance(body, dict) else {}
            raise HooocusError(error.get("message", f"HTTP {response.status_code}"),
                               code=error.get("code", "internal_error"))
        return dict(body)

    try:
        with httpx.Client(timeout=REMOTE_TIMEOUT_S) as http:
            upload = checked(http.post(f"{base}/v1/uploads", content=data,
                                       headers={**headers, "Content-Type": "application/octet-stream"}), 201)
            return checked(http.post(f"{base}/v1/describe", json={"image": f"sha256:{upload['sha256']}", "mode": mode},
                                     headers=headers), 200)
    except httpx.HTTPError as exc:
        raise HooocusError(f"cannot reach the hooocus server: {exc}", code="connection_lost") from None


def run(args: argparse.Namespace, settings: Settings) -> int:
    data = _read(args.image, settings.max_upload_bytes)
    if args.server:
        if not re.match(r"^wss?://", args.server):
            raise UsageError(f"--server: expected ws://host:port or wss://host:port, got {args.server!r}")
        token = args.token or os.environ.get("HOOOCUS_TOKEN")
        if not token:
            raise UsageError("--server needs a token: --token or $HOOOCUS_TOKEN")
        result = describe_remote(data, args.mode, args.server, token)
    else:
        result = describe_local(data, args.mode, settings)
    if args.json:
        print(json.dumps(result))
    else:
        print(result["prompt"])
        print("styles: " + ", ".join(result["styles"]))
    return 0
