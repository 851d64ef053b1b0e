"""Image Prompt for SDXL with Fooocus's own IP-Adapter attention (spec §12.3, §12.4).

- :mod:`engine.sdxl.ip_adapter.attention`: the pure attention math (one softmax over text + image tokens).

Nothing is imported here, so importing the package pulls in no torch or diffusers.
"""
