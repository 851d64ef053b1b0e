"""Masks from images for Enhance (issue 16, spec §12.6): family-neutral, like engine/describe.

- :mod:`engine.masking.regions`: pure pixel rules (remove small holes and islands, grow boxes, union).
- :mod:`engine.masking.detect`: GroundingDINO boxes from a detection text, then SAM masks in those
  boxes, both through transformers (safetensors weights).
- :mod:`engine.masking.rembg`: the rembg models (u2net family, ISNet) through onnxruntime.
- :mod:`engine.masking.service`: :class:`MaskGenerator`, what a runner calls: the files' places, the
  bounded model cache and ``model_missing`` naming the file and the set-up command.

Nothing is imported (torch, transformers, onnxruntime) until a mask is made.
"""
