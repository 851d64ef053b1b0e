"""SDXL text encoding with Fooocus's A1111-style emphasis (spec §3.3-§3.5, §18 items 1-2).

Per text and per encoder, all 77-token chunks run as one batch (plus an "empty" chunk when any
weight is not 1). The cond is the hidden state ``hidden_states[-clip_skip]`` *without* the final
LayerNorm, reweighted against the empty chunk and mean-restored per chunk; chunks are concatenated
along tokens. The pooled vector is CLIP-G's final-layer (+ final LN) state at the first EOS of the
*first* chunk, times the text projection; weights never touch it.

Outputs are float32 on the encoders' device, whatever their dtype: Fooocus's encoder wrapper returns
``z.float()`` and does the reweighting in float32, so float16 encoders keep the same arithmetic.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from engine.core.errors import InvalidRequest
from engine.sdxl.conditioning.emphasis import parse_emphasis
from engine.sdxl.conditioning.tokenize import EmbeddingLookup, TokenChunk, empty_chunk, special_ids, tokenize_pieces

if TYPE_CHECKING:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

#: Fooocus's default clip skip: the penultimate layer, SDXL's normal setting (spec §3.3 step 6).
DEFAULT_CLIP_SKIP = 2


@dataclass
class TextEncoders:
    """The text side of an SDXL checkpoint. The refiner has no CLIP-L: ``clip_l``/``tokenizer_l`` None.

    ``embeddings`` resolves ``embedding:NAME`` words; None means no textual inversions are installed
    (every such word is then dropped, as Fooocus drops unknown names).
    """

    clip_l: CLIPTextModel | None
    clip_g: CLIPTextModelWithProjection
    tokenizer_l: CLIPTokenizer | None
    tokenizer_g: CLIPTokenizer
    embeddings: EmbeddingLookup | None = None


def normalize_token_weights(z: torch.Tensor, z_empty: torch.Tensor | None,
                            weights: torch.Tensor | Sequence[Sequence[float]]) -> torch.Tensor:
    """A1111-style emphasis with mean restoration (spec §3.3 step 3; Fooocus ``patch_clip``).

    ``z``: ``[chunks, 77, C]`` hidden states of one text's chunks; ``z_empty``: ``[77, C]`` of the
    empty chunk (None when every weight is 1: then ``z`` is returned unchanged); ``weights``:
    ``[chunks, 77]``. For each chunk, tokens with ``w != 1`` move away from the empty chunk's state at
    the same position, ``z_empty + w * (z - z_empty)``, then the chunk is rescaled so its scalar mean
    over all 77 x C values equals the mean it had before. Returns a new tensor.
    """
    if z_empty is None:
        return z
    w64 = torch.as_tensor(weights, dtype=torch.float64).to(z.device).unsqueeze(-1)
    w = w64.to(z.dtype)
    pushed = (z - z_empty) * w + z_empty  # Fooocus's operation order, for bit-level agreement
    # The "!= 1" test uses the exact (float64) weights, as Fooocus compares Python floats.
    reweighted = torch.where(w64 != 1.0, pushed, z)
    original_mean = z.mean(dim=(1, 2), keepdim=True)
    return reweighted * (original_mean / reweighted.mean(dim=(1, 2), keepdim=True))


#: ``chunks -> (hidden states [rows, 77, C] float32, pooled [rows, P] float32 or None)``.
ChunkEncoder = Callable[[Sequence[TokenChunk]], tuple[torch.Tensor, "torch.Tensor | None"]]


def encode_token_chunks(run_encoder: ChunkEncoder, chunks: Sequence[TokenChunk],
                        empty: TokenChunk) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One encoder, one text: ``(cond [1, 77 * chunks, C], pooled of chunk 0 [1, P] or None)``.

    spec §3.3 steps 1-4: one batch of all chunks, plus the empty chunk only when a weight is not 1.
    """
    has_weights = any(chunk.has_weights for chunk in chunks)
    rows = [*chunks, empty] if has_weights else list(chunks)
    hidden, pooled = run_encoder(rows)
    z = hidden[: len(chunks)]
    z = normalize_token_weights(z, hidden[-1] if has_weights else None, [c.weights for c in chunks])
    cond = z.reshape(1, -1, z.shape[-1])
    return cond, (pooled[0:1] if pooled is not None else None)


def _first_eos_slot(chunk: TokenChunk, eos_id: int) -> int:
    """Where the pooled state is read: the first EOS (Fooocus: argmax of ids, EOS being the largest id)."""
    vector_slots = {slot for slot, _ in chunk.embeddings}
    for slot, tok in enumerate(chunk.token_ids):
        if tok == eos_id and slot not in vector_slots:
            return slot
    raise ValueError("chunk without EOS")


def _transformers_chunk_encoder(model: Any, eos_id: int, *, clip_skip: int, pooled: bool) -> ChunkEncoder:
    """Run a transformers CLIP text model on chunks, in the model's own dtype and device."""

    def run(rows: Sequence[TokenChunk]) -> tuple[torch.Tensor, torch.Tensor | None]:
        table = model.get_input_embeddings()
        device = table.weight.device
        ids = torch.tensor([list(c.token_ids) for c in rows], dtype=torch.long, device=device)
        vectors = [(row, slot, vec) for row, c in enumerate(rows) for slot, vec in c.embeddings]
        handle = None
        if vectors:
            for _, _, vec in vectors:
                if vec.shape[-1] != table.weight.shape[1]:
                    raise InvalidRequest(f"textual-inversion embedding has {vec.shape[-1]} channels but this "
                                         f"text encoder expects {table.weight.shape[1]}")

            # Textual inversion: the vector replaces the token embedding of its slot (positions are
            # still added by the model), without touching the shared embedding table.
            def inject(_module: Any, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
                output = output.clone()
                for row, slot, vec in vectors:
                    output[row, slot] = vec.to(device=output.device, dtype=output.dtype)
                return output

            handle = table.register_forward_hook(inject)
        try:
            out = model(input_ids=ids, output_hidden_states=True)
        finally:
            if handle is not None:
                handle.remove()
        num_layers = len(out.hidden_states) - 1
        # spec §3.3 step 7: hidden_states[-n] (no final LN); n beyond the depth -> "last", which in
        # Fooocus is the final output *with* the final LayerNorm.
        hidden = out.last_hidden_state if clip_skip > num_layers else out.hidden_states[-clip_skip]
        pooled_rows = None
        if pooled:
            slots = torch.tensor([_first_eos_slot(c, eos_id) for c in rows], device=device)
            eos_states = out.last_hidden_state[torch.arange(len(rows), device=device), slots]
            pooled_rows = model.text_projection(eos_states).float()
        return hidden.float(), pooled_rows

    return run


def _encode_with(model: Any, tokenizer: Any, pieces: Sequence[tuple[str, float]], *, pad_with_end: bool,
                 embeddings: EmbeddingLookup | None, embedding_key: str, clip_skip: int,
                 pooled: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    chunks = tokenize_pieces(tokenizer, pieces, pad_with_end=pad_with_end, embeddings=embeddings,
                             embedding_key=embedding_key)
    empty = empty_chunk(tokenizer, pad_with_end=pad_with_end)
    run = _transformers_chunk_encoder(model, special_ids(tokenizer)[1], clip_skip=clip_skip, pooled=pooled)
    return encode_token_chunks(run, chunks, empty)


def encode_text(encoders: TextEncoders, text: str, *,
                clip_skip: int = DEFAULT_CLIP_SKIP) -> tuple[torch.Tensor, torch.Tensor]:
    """One text -> ``(cond [1, 77 * chunks, 768 + 1280], pooled [1, 1280])``, float32.

    Without CLIP-L (refiner) cond has only CLIP-G's channels. spec §3.3 step 5: ``cat(L, G)``.
    """
    if clip_skip < 1:
        raise InvalidRequest(f"clip_skip must be >= 1, got {clip_skip}", loc=("clip_skip",))
    pieces = parse_emphasis(text)
    with torch.inference_mode():
        cond_g, pooled = _encode_with(encoders.clip_g, encoders.tokenizer_g, pieces, pad_with_end=False,
                                      embeddings=encoders.embeddings, embedding_key="clip_g",
                                      clip_skip=clip_skip, pooled=True)
        if encoders.clip_l is None:
            cond = cond_g
        else:
            tokenizer_l = encoders.tokenizer_l if encoders.tokenizer_l is not None else encoders.tokenizer_g
            cond_l, _ = _encode_with(encoders.clip_l, tokenizer_l, pieces, pad_with_end=True,
                                     embeddings=encoders.embeddings, embedding_key="clip_l",
                                     clip_skip=clip_skip, pooled=False)
            cond = torch.cat([cond_l, cond_g.to(cond_l.device)], dim=-1)
    assert pooled is not None
    # Copies made outside inference mode: callers get ordinary tensors they may use anywhere.
    return cond.clone(), pooled.clone()


class TextEncodingCache:
    """Bounded LRU of ``(text, clip_skip) -> (cond, pooled)``, like Fooocus's per-text cache.

    The engine must :meth:`clear` it whenever the text encoders change (model or LoRA switch).
    Thread-safe; the cached tensors are never handed out for in-place use (see :func:`encode_texts`).
    """

    def __init__(self, max_entries: int = 64) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self._items: OrderedDict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[str, int]) -> tuple[torch.Tensor, torch.Tensor] | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: tuple[str, int], value: tuple[torch.Tensor, torch.Tensor]) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items


def encode_texts(encoders: TextEncoders, texts: Sequence[str], *, pool_top_k: int,
                 clip_skip: int = DEFAULT_CLIP_SKIP,
                 cache: TextEncodingCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Several texts (style lines, extra prompt lines, expansion) -> one ``(cond, pooled)`` (spec §3.5).

    ``cond`` concatenates every text's cond along tokens; ``pooled`` is the plain **sum** of the
    pooled vectors of the first ``pool_top_k`` texts (zeros when ``pool_top_k`` is 0). Both are new
    tensors, so callers may modify them without corrupting the cache.
    """
    if not texts:
        raise ValueError("encode_texts needs at least one text")
    conds: list[torch.Tensor] = []
    pooled_sum: torch.Tensor | None = None
    for index, text in enumerate(texts):
        key = (text, clip_skip)
        encoded = cache.get(key) if cache is not None else None
        if encoded is None:
            encoded = encode_text(encoders, text, clip_skip=clip_skip)
            if cache is not None:
                cache.put(key, encoded)
        cond, pooled = encoded
        conds.append(cond)
        if pooled_sum is None:
            pooled_sum = torch.zeros_like(pooled)
        if index < pool_top_k:
            pooled_sum = pooled_sum + pooled
    assert pooled_sum is not None
    return torch.cat(conds, dim=1), pooled_sum
