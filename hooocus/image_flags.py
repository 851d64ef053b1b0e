"""The image-task flags of ``hooocus generate`` (issue 14): ``--image``, ``--vary``, ``--upscale``,
``--mask``, ``--outpaint``, ``--inpaint-mode``, ``--inpaint-engine``, as contract14's request fields;
and ``--image-prompt PATH[:TYPE[:WEIGHT[:STOP]]]`` (issue 16, repeatable up to 4 times: the
request's ``image_prompts``).

An input file becomes an image reference: in local mode a ``data:`` URI (the engine decodes it
with its usual caps); with ``--server`` the reference is ``sha256:<hash of the file>``, the key the
server's upload store gives the same bytes, and the file is uploaded over the websocket before the
job is submitted (:func:`uploads_for`), so the request is complete and checked before anything is sent.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
from pathlib import Path
from typing import Any

from engine.core.errors import ImageTooLarge, UsageError

VARY = {"subtle": "Vary (Subtle)", "strong": "Vary (Strong)"}
UPSCALE = {"1.5x": "Upscale (1.5x)", "2x": "Upscale (2x)", "fast-2x": "Upscale (Fast 2x)"}
INPAINT_MODES = {"default": "Inpaint or Outpaint (default)",
                 "detail": "Improve Detail (face, hand, eyes, etc.)",
                 "modify": "Modify Content (add objects, change background, etc.)"}
INPAINT_ENGINES = ("None", "v1", "v2.5", "v2.6")
SIDES = ("left", "right", "top", "bottom")
#: MIME types a data URI may carry (engine.core.inputs); other formats are re-encoded as PNG.
_DATA_URI_MIMES = ("image/png", "image/jpeg", "image/webp")
#: flag -> request field of each input file
FILE_FIELDS = {"image": "input_image", "mask": "inpaint_mask"}
#: --image-prompt TYPE spellings (lower case) -> the request's Image Prompt type (Fooocus's names).
IMAGE_PROMPT_TYPES = {"imageprompt": "ImagePrompt", "ip": "ImagePrompt", "pyracanny": "PyraCanny",
                      "canny": "PyraCanny", "cpds": "CPDS", "faceswap": "FaceSwap"}
MAX_IMAGE_PROMPT_FLAGS = 4  # engine.core.request.MAX_IMAGE_PROMPTS (Fooocus's 4 slots)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("image input (vary, upscale, inpaint, outpaint)")
    g.add_argument("--image", type=Path, metavar="PATH", help="input image file")
    g.add_argument("--vary", choices=sorted(VARY), help="a variation of --image")
    g.add_argument("--upscale", choices=list(UPSCALE), help="upscale --image (fast-2x: without re-detailing)")
    g.add_argument("--mask", type=Path, metavar="PATH", help="inpaint --image where this mask is white")
    g.add_argument("--outpaint", type=_sides, metavar="SIDES", help="extend --image: comma list of left,right,top,bottom")
    g.add_argument("--inpaint-mode", choices=list(INPAINT_MODES), help="Fooocus's inpaint mode (default: default)")
    g.add_argument("--inpaint-engine", choices=INPAINT_ENGINES, help="inpaint patch version (default: the mode's)")
    g.add_argument("--image-prompt", dest="image_prompts", action="append", type=parse_image_prompt, default=None,
                   metavar="PATH[:TYPE[:WEIGHT[:STOP]]]",
                   help="a reference image (repeat up to 4 times); TYPE: ImagePrompt (default), FaceSwap, PyraCanny, CPDS; "
                        "WEIGHT 0..2 and STOP 0..1 default per type")


def parse_image_prompt(text: str) -> dict[str, Any]:
    """``PATH[:TYPE[:WEIGHT[:STOP]]]`` -> {path, type, weight?, stop_at?}. The path ends where a known
    TYPE follows a colon, so a path holding a colon (``C:\\x.png``) still parses."""
    tokens = text.split(":")
    cut = next((i for i in range(1, len(tokens)) if tokens[i].strip().lower() in IMAGE_PROMPT_TYPES), len(tokens))
    path, rest = ":".join(tokens[:cut]), tokens[cut:]
    if not path or len(rest) > 3:
        raise argparse.ArgumentTypeError(f"expected PATH[:TYPE[:WEIGHT[:STOP]]], got {text!r}")
    slot: dict[str, Any] = {"path": Path(path), "type": IMAGE_PROMPT_TYPES[rest[0].strip().lower()] if rest else
                            "ImagePrompt"}
    for name, value in zip(("weight", "stop_at"), rest[1:], strict=False):
        if value.strip() == "":
            continue  # PATH:TYPE::STOP keeps the type's default weight
        try:
            slot[name] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad {name} {value!r} in {text!r}: expected a number") from None
    return slot


def _sides(text: str) -> list[str]:
    sides = [s.strip().lower() for s in text.split(",") if s.strip()]
    bad = [s for s in sides if s not in SIDES]
    if bad or not sides:
        raise argparse.ArgumentTypeError(f"expected a comma list of {', '.join(SIDES)}, got {text!r}")
    return [s.title() for s in SIDES if s in sides]  # Fooocus's order and spelling, each side once


def task_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The task fields the flags ask for (no file read yet). Fooocus runs Vary/Upscale whenever it
    is set and ignores any mask or outpaint then, so those combinations are refused, not dropped."""
    if args.vary and args.upscale:
        raise UsageError("--vary and --upscale exclude each other (Fooocus runs one of them)")
    uov = VARY.get(args.vary or "") or UPSCALE.get(args.upscale or "")
    if uov and (args.mask is not None or args.outpaint):
        flag = "--mask" if args.mask is not None else "--outpaint"
        raise UsageError(f"{flag} is not used with --vary/--upscale (Fooocus then ignores it); give one task")
    fields: dict[str, Any] = {}
    if uov:
        fields["uov_method"] = uov
    if args.outpaint:
        fields["outpaint_selections"] = args.outpaint
    if args.inpaint_mode:
        fields["inpaint_mode"] = INPAINT_MODES[args.inpaint_mode]
    if args.inpaint_engine:
        fields["inpaint_engine"] = args.inpaint_engine
    return fields


def needs_input_image(fields: dict[str, Any]) -> str | None:
    """What in ``fields`` (e.g. from --from-image) works on an input image, or None."""
    if fields.get("uov_method", "Disabled") != "Disabled":
        return str(fields["uov_method"])
    if fields.get("outpaint_selections"):
        return "outpaint " + ",".join(fields["outpaint_selections"]).lower()
    if fields.get("inpaint_mask") or fields.get("inpaint_mask_upload"):
        return "inpaint"
    return None


def check_task(args: argparse.Namespace, fields: dict[str, Any]) -> None:
    """Flags and start file together: a task needs --image; --image needs a task."""
    task = needs_input_image({**fields, **({"inpaint_mask": "x"} if args.mask is not None else {})})
    if task and args.image is None:
        if args.from_image is not None and not (args.vary or args.upscale or args.outpaint or args.mask):
            raise UsageError(f"--from-image: {args.from_image} was made with {task} from an input image, which its "
                             "metadata does not hold: give that image with --image PATH")
        raise UsageError(f"--image PATH is required for {task}")
    if args.image is not None and not task and fields.get("enhance") is None:
        raise UsageError("--image: nothing to do with the image: add --vary, --upscale, --mask, --outpaint or "
                         "--enhance")


def read_file(path: Path, *, flag: str, max_bytes: int, loc: tuple[str | int, ...] | None = None) -> bytes:
    """The file's bytes, refusing a missing file or one over the upload cap before reading it."""
    try:
        size = path.stat().st_size
    except OSError:
        raise UsageError(f"--{flag}: no file at {path}") from None
    if size > max_bytes:
        raise ImageTooLarge(f"--{flag}: {path} is {size} bytes, over the {max_bytes}-byte input cap",
                            loc=loc or (FILE_FIELDS[flag],))
    return path.read_bytes()


def data_uri(data: bytes, *, flag: str, max_pixels: int, loc: tuple[str | int, ...] | None = None) -> str:
    """``data:image/...;base64,...`` of a file; formats a data URI cannot name become PNG."""
    from engine.core.inputs import probe_image

    _w, _h, mime = probe_image(data, max_pixels=max_pixels, loc=loc or (FILE_FIELDS[flag],))
    if mime not in _DATA_URI_MIMES:
        from PIL import Image

        buf = io.BytesIO()
        with Image.open(io.BytesIO(data)) as image:
            image.save(buf, format="PNG")
        data, mime = buf.getvalue(), "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def file_fields(args: argparse.Namespace, *, max_bytes: int, max_pixels: int) -> tuple[dict[str, str], dict[str, bytes]]:
    """(request fields, uploads): each input file as a reference; ``uploads`` (field -> bytes) is
    what ``--server`` mode must upload before it submits (empty in local mode)."""
    fields: dict[str, str] = {}
    uploads: dict[str, bytes] = {}
    for flag, field in FILE_FIELDS.items():
        path = getattr(args, flag)
        if path is None:
            continue
        data = read_file(path, flag=flag, max_bytes=max_bytes)
        if args.server:
            fields[field] = "sha256:" + hashlib.sha256(data).hexdigest()
            uploads[field] = data
        else:
            fields[field] = data_uri(data, flag=flag, max_pixels=max_pixels)
    return fields, uploads


def image_prompt_fields(args: argparse.Namespace, *, max_bytes: int,
                        max_pixels: int) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
    """(the request's ``image_prompts``, uploads) from ``--image-prompt`` flags, files as in
    :func:`file_fields`; uploads are keyed by the slot's field path (``image_prompts.<i>.image``)."""
    flags = getattr(args, "image_prompts", None) or []
    if len(flags) > MAX_IMAGE_PROMPT_FLAGS:
        raise UsageError(f"--image-prompt: at most {MAX_IMAGE_PROMPT_FLAGS}, got {len(flags)}")
    slots: list[dict[str, Any]] = []
    uploads: dict[str, bytes] = {}
    for index, flag in enumerate(flags):
        loc = ("image_prompts", index, "image")
        data = read_file(flag["path"], flag="image-prompt", max_bytes=max_bytes, loc=loc)
        if args.server:
            ref = "sha256:" + hashlib.sha256(data).hexdigest()
            uploads[".".join(map(str, loc))] = data
        else:
            ref = data_uri(data, flag="image-prompt", max_pixels=max_pixels, loc=loc)
        slots.append({"image": ref, **{k: v for k, v in flag.items() if k != "path"}})
    return slots, uploads
