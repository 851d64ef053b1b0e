"""Image Prompt's Control-LoRA side for SDXL: PyraCanny and CPDS (spec §12.3).

- :mod:`engine.sdxl.control.softness`: the per-output softness factors, strength, the
  positive-branch-only rows and the σ gate.
- :mod:`engine.sdxl.control.control_lora`: a Control-LoRA file merged into a diffusers
  ``ControlNetModel`` copied from the UNet; the hint tensor; the residuals for the positive rows.

Nothing is imported here, so importing the package pulls in no torch or diffusers.
"""
