"""Input/output formats shared by every family: image encoding with metadata (Fooocus and A1111
schemes, written and read back), presets, and set-up downloads of model files."""
