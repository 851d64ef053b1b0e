"""The FLUX.1 model family (issue 17)."""
