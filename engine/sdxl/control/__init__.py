"""Image Prompt's Control-LoRA side for SDXL: PyraCanny and CPDS (spec §12.3).

- :mod:`engine.sdxl.control.softness`: the per-output softness factors, strength, the
  positive-branch-only rows and the σ gate.

Nothing is imported here, so importing the package pulls in no torch or diffusers.
"""
