"""Model files: safety checks, registry, loading, LoRA, demo model."""
