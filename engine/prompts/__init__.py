"""Text-level prompt features that do not depend on the model family: styles, wildcards, arrays,
inline LoRA references, the Fooocus V2 expansion, and prompt assembly per image."""
