"""The Enhance flags of ``hooocus generate`` (issue 16, spec §12.6): the request's ``enhance`` field.

``--enhance DETECT`` starts a tab (repeat it for up to 5 tabs); the ``--enhance-*`` tab flags that
follow it set that tab's fields, so ``--enhance face --enhance-prompt "detailed face" --enhance hand
--enhance-prompt "detailed hand"`` gives two tabs. ``--enhance-mask-model u2net`` makes the tab use a
rembg model instead of GroundingDINO + SAM (then DETECT may be empty). The job flags
(``--enhance-uov``, ``--enhance-uov-after``, ``--enhance-uov-last-prompts``, ``--enhance-final-only``)
apply to all tabs. With ``--image`` and no other image task, the image itself is enhanced (no
generation). Values are checked by the request model, so a bad one names its field path.
"""

from __future__ import annotations

import argparse
from typing import Any

from engine.core.errors import UsageError

ENHANCE_UOV = {"vary-subtle": "Vary (Subtle)", "vary-strong": "Vary (Strong)", "upscale-1.5x": "Upscale (1.5x)",
               "upscale-2x": "Upscale (2x)", "upscale-fast-2x": "Upscale (Fast 2x)"}
#: tab flag -> (request field, argparse type); a flag with type None is a switch (True).
TAB_FLAGS: dict[str, tuple[str, Any]] = {
    "--enhance-prompt": ("prompt", str),
    "--enhance-negative": ("negative_prompt", str),
    "--enhance-mask-model": ("mask_model", str),
    "--enhance-cloth": ("cloth_category", str),
    "--enhance-sam-model": ("sam_model", str),
    "--enhance-box-threshold": ("box_threshold", float),
    "--enhance-text-threshold": ("text_threshold", float),
    "--enhance-max-detections": ("max_detections", int),
    "--enhance-engine": ("inpaint_engine", str),
    "--enhance-strength": ("strength", float),
    "--enhance-respective-field": ("respective_field", float),
    "--enhance-erode-dilate": ("erode_or_dilate", int),
    "--enhance-invert": ("invert", None),
    "--enhance-disable-initial-latent": ("disable_initial_latent", None),
}
DEST = "enhance_tabs"


class _NewTab(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        tabs = list(getattr(namespace, DEST, None) or [])
        tabs.append({"detection_prompt": values})
        setattr(namespace, DEST, tabs)


class _TabField(argparse.Action):
    """Sets one field of the tab the last ``--enhance`` started."""

    def __init__(self, option_strings: list[str], dest: str, field: str = "", **kw: Any) -> None:
        self.field = field
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        tabs = getattr(namespace, DEST, None)
        if not tabs:
            parser.error(f"{option_string} sets a field of an enhance tab: give --enhance DETECT before it")
        tabs[-1][self.field] = True if self.nargs == 0 else values


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("enhance (find regions and repaint them; spec §12.6)")
    g.add_argument("--enhance", dest=DEST, action=_NewTab, metavar="DETECT", default=None,
                   help="start an enhance tab that finds DETECT (e.g. face, hand, eyes); repeat for up to 5 tabs; "
                        "the --enhance-* tab flags after it set that tab")
    for flag, (field, kind) in TAB_FLAGS.items():
        if kind is None:
            g.add_argument(flag, action=_TabField, field=field, nargs=0, dest=f"_{field}",
                           help=f"the current tab's {field}")
        else:
            g.add_argument(flag, action=_TabField, field=field, type=kind, dest=f"_{field}", metavar=field.upper(),
                           help=f"the current tab's {field}")
    g.add_argument("--enhance-uov", choices=list(ENHANCE_UOV), help="upscale or vary before the first tab")
    g.add_argument("--enhance-uov-after", action="store_true", help="run --enhance-uov after the last tab instead")
    g.add_argument("--enhance-uov-last-prompts", action="store_true",
                   help="the after-pass uses the last filled tab prompts (default: the original prompts)")
    g.add_argument("--enhance-final-only", action="store_true", help="save only the final enhanced image")


def enhance_field(args: argparse.Namespace) -> dict[str, Any] | None:
    """The request's ``enhance`` value from the flags, or None when no enhance flag was given."""
    tabs = getattr(args, DEST, None) or []
    uov = getattr(args, "enhance_uov", None)
    extras = [name for name in ("enhance_uov_after", "enhance_uov_last_prompts", "enhance_final_only")
              if getattr(args, name, False)]
    if not tabs and uov is None:
        if extras:
            raise UsageError(f"--{extras[0].replace('_', '-')} needs --enhance DETECT or --enhance-uov")
        return None
    out: dict[str, Any] = {"tabs": tabs}
    if uov is not None:
        out["uov_method"] = ENHANCE_UOV[uov]
    if getattr(args, "enhance_uov_after", False):
        out["uov_processing_order"] = "After Last Enhancement"
    if getattr(args, "enhance_uov_last_prompts", False):
        out["uov_prompt_type"] = "Last Filled Enhancement Prompts"
    if getattr(args, "enhance_final_only", False):
        out["save_only_final"] = True
    return out
