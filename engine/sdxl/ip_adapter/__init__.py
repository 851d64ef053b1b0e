"""Image Prompt for SDXL with Fooocus's own IP-Adapter attention (spec §12.3, §12.4).

- :mod:`engine.sdxl.ip_adapter.attention`: the pure attention math (one softmax over text + image tokens).
- :mod:`engine.sdxl.ip_adapter.hook`: diffusers attention processors on the UNet's attn2 layers in
  Fooocus's order, gated by progress < stop_at, removable (refiner swap, job end).
- :mod:`engine.sdxl.ip_adapter.model`: CLIP vision → resampler → per-layer k/v, and a tiny random
  adapter built from config for tests.

Nothing is imported here, so importing the package pulls in no torch or diffusers.
"""
