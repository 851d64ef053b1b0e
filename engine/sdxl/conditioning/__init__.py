"""SDXL text conditioning: prompts, styles, emphasis, encoding, ADM."""
