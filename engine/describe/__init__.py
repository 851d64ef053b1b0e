"""Describe: image → prompt (Fooocus's "Describe" tab, spec §12.5).

Family-neutral, so its own package rather than engine/sdxl (any family's prompt box can use it) and
not engine/imaging (that holds pixel operations only; this holds two models and their text rules):

- :mod:`engine.describe.text`: the pure rules (tag thresholds, clean-up, style sets, joining);
- :mod:`engine.describe.blip`: Photograph, BLIP base captioning through transformers;
- :mod:`engine.describe.tagger`: Art/Anime, the WD14 tagger through onnxruntime (ONNX is not pickle);
- :mod:`engine.describe.service`: :class:`~engine.describe.service.Describer`, the bounded,
  cancellable executor the front doors call, serialised with generation by the engine's device lock.

Nothing is imported here: torch / onnxruntime load only when a describe runs.
"""
