"""Family-neutral pixel operations for the image-input features (spec §12.1–12.2).

Every function here is pure: numpy HWC ``uint8`` images and 2-D ``uint8`` masks in, new arrays out,
inputs never modified. Each module cites the spec section it implements and is checked against
``refdata/image_ops/`` by ``tests/golden/test_image_ops.py``.

- :mod:`engine.imaging.sizes`: shape ceil, ``set_image_shape_ceil``, Vary/Upscale sizes, VAE crop.
- :mod:`engine.imaging.convert`: ``HWC3`` normalisation of decoded images and masks.
- :mod:`engine.imaging.resize`: LANCZOS resampling and ``resize_image`` modes 0/1/2.
- :mod:`engine.imaging.masks`: mask merge, erode/dilate, invert, ``morphological_open``, outpaint padding.
- :mod:`engine.imaging.inpaint`: ``fooocus_fill``, the crop box, paste-back, ``color_correction``.
- :mod:`engine.imaging.latent_mask`: the torch side of ``encode_vae_inpaint`` (grey fill, latent mask).

Nothing is imported here, so importing one module does not pull in the others (cv2, torch).
"""
