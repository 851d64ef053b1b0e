"""FLUX.1 prompt encoding: CLIP-L's pooled vector and T5's token sequence, as FluxPipeline does.

Both encoders read the same text (FluxPipeline's ``prompt_2`` defaults to ``prompt``). CLIP pads to
its 77 tokens and truncates; T5 pads to ``max_sequence_length`` and truncates. A small cache keyed
by the text skips re-encoding a prompt that repeats across the images of a job.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch

from engine.flux.components import FluxComponents

#: Black Forest Labs' reference: schnell was trained with 256 T5 tokens, dev with 512.
T5_MAX_TOKENS = {"schnell": 256, "dev": 512}
#: Encoded prompts kept per model; a job re-encodes at most image_number texts.
MAX_CACHED_TEXTS = 32


@dataclass(frozen=True)
class FluxTextEmbedding:
    """One encoded prompt: T5 [1, T, D] sequence, CLIP [1, P] pooled vector."""

    sequence: torch.Tensor
    pooled: torch.Tensor


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module's weights are (its first parameter), CPU for a module without any."""
    for param in module.parameters():
        return param.device
    return torch.device("cpu")


def encode_clip_pooled(components: FluxComponents, text: str) -> torch.Tensor:
    tokenizer, encoder = components.tokenizer, components.text_encoder
    ids = tokenizer([text], padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    pooled = encoder(ids.to(module_device(encoder)), output_hidden_states=False).pooler_output
    return pooled.to(dtype=encoder.dtype)


def encode_t5(components: FluxComponents, text: str, max_sequence_length: int) -> torch.Tensor:
    tokenizer, encoder = components.tokenizer_2, components.text_encoder_2
    ids = tokenizer([text], padding="max_length", max_length=max_sequence_length, truncation=True,
                    return_tensors="pt").input_ids
    sequence = encoder(ids.to(module_device(encoder)), output_hidden_states=False)[0]
    return sequence.to(dtype=encoder.dtype)


class FluxTextCache:
    """Bounded LRU of encoded prompts for one loaded model (cleared when its weights change)."""

    def __init__(self, max_items: int = MAX_CACHED_TEXTS) -> None:
        self.max_items = max_items
        self._items: collections.OrderedDict[tuple[str, int], FluxTextEmbedding] = collections.OrderedDict()

    def get(self, key: tuple[str, int]) -> FluxTextEmbedding | None:
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
        return item

    def put(self, key: tuple[str, int], value: FluxTextEmbedding) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.max_items:
            self._items.popitem(last=False)

    def clear(self) -> None:
        self._items.clear()


def encode_prompt(components: FluxComponents, text: str, *, max_sequence_length: int,
                  device: torch.device | str, cache: FluxTextCache | None = None) -> FluxTextEmbedding:
    """The T5 sequence and CLIP pooled vector of ``text`` on ``device`` (encoders may sit elsewhere,
    e.g. T5 on the CPU in the low-VRAM mode)."""
    key = (text, max_sequence_length)
    if cache is not None and (hit := cache.get(key)) is not None:
        return hit
    pooled = encode_clip_pooled(components, text).to(device)
    sequence = encode_t5(components, text, max_sequence_length).to(device)
    embedding = FluxTextEmbedding(sequence=sequence, pooled=pooled)
    if cache is not None:
        cache.put(key, embedding)
    return embedding
