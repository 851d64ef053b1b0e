"""The ``hooocus`` product command, above the engine and both front doors (``hooocus.cli``)."""
