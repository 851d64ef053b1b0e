"""Fast Fooocus-expansion decode: GPT-2 ``generate`` with a static KV cache (same tokens)."""

from __future__ import annotations

from typing import Any


class StaticCacheGenerator:
    """Wraps a GPT-2 LM for :class:`engine.prompts.expansion.FooocusExpansion`: ``generate``
    runs with a static KV cache (fixed shapes: prompt + expansion always fill 75·k tokens, spec
    §2.5), which on CUDA makes transformers compile the one-token decode step (CUDA graphs).
    Everything else is forwarded to the model."""

    def __init__(self, model: Any, *, compile_config: Any = None) -> None:
        self.model = model
        self.compile_config = compile_config

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("cache_implementation", "static")
        if self.compile_config is not None:
            kwargs.setdefault("compile_config", self.compile_config)
        return self.model.generate(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


def fast_expansion(expansion: Any, *, compile_config: Any = None) -> Any:
    """Give a ``FooocusExpansion`` the static-cache decode (in place); returns it."""
    if expansion is not None and not isinstance(expansion.model, StaticCacheGenerator):
        expansion.model = StaticCacheGenerator(expansion.model, compile_config=compile_config)
    return expansion
