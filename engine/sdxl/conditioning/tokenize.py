"""Word-wise CLIP tokenization into 77-token chunks, as Fooocus does it (spec §3.2).

Unlike diffusers (whole string, truncated to 77), Fooocus:

- splits each weighted piece into words on ``' '`` (after ``\\n`` -> space) and BPE-tokenizes every
  word on its own, so a word's tokens all carry the piece's weight;
- keeps every chunk: ``[BOS, <= 75 tokens, EOS, pad...]``, 77 slots each, a word never split across
  chunks unless it has >= 8 tokens;
- pads CLIP-L with its EOS id and CLIP-G with id 0.

The reference tokenizer was transformers' *slow* ``CLIPTokenizer`` without ``ftfy``, whose text
clean-up is BERT's ``BasicTokenizer``. transformers 5 only ships the fast tokenizer (different
clean-up: no CJK splitting, no control-character removal), so :func:`basic_clean` redoes the slow
clean-up first; the fast tokenizer's own normaliser (NFC, whitespace, lower case) is then a no-op.

``embedding:NAME`` words are textual-inversion lookups; a missing one is dropped (Fooocus behaviour).

No torch import at module level: tokenization is pure Python.
"""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.sdxl.conditioning.emphasis import parse_emphasis

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

#: Slots per chunk: BOS + 75 tokens + EOS (spec §3.2 step 4).
CHUNK_LENGTH = 77
#: A word with at least this many tokens may be split across chunks (spec §3.2 step 4).
SPLITTABLE_WORD_TOKENS = 8
#: Prefix of a textual-inversion word (spec §3.2 step 2).
EMBEDDING_PREFIX = "embedding:"

#: ``(name, encoder_key) -> [n_vectors, dim]`` or None when there is no such embedding. The key is
#: ``"clip_l"`` or ``"clip_g"``: SDXL embedding files hold one tensor per encoder.
EmbeddingLookup = Callable[[str, str], "torch.Tensor | None"]


@dataclass(frozen=True)
class TokenChunk:
    """One 77-slot encoder input.

    ``token_ids[i]`` is the vocabulary id, ``weights[i]`` the emphasis weight (1.0 for BOS/EOS/pad),
    ``word_ids[i]`` the 1-based index of the word it came from (0 for BOS/EOS/pad).
    ``embeddings`` maps a slot to a textual-inversion vector that replaces the token embedding of
    that slot; such slots hold the BOS id as a placeholder.
    """

    token_ids: tuple[int, ...]
    weights: tuple[float, ...]
    word_ids: tuple[int, ...]
    embeddings: tuple[tuple[int, Any], ...] = ()

    @property
    def has_weights(self) -> bool:
        return any(w != 1.0 for w in self.weights)


# --- the slow CLIPTokenizer clean-up (BERT BasicTokenizer, strip_accents=False, no punct. split) ---
# Adapted from transformers (Apache-2.0) BasicTokenizer._clean_text / _tokenize_chinese_chars /
# _is_whitespace / _is_control, the path transformers 4.x CLIPTokenizer takes when ftfy is absent.

_CJK_RANGES = (
    (0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
    (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F),
)


def _is_cjk(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in _CJK_RANGES)


def basic_clean(text: str) -> str:
    """The text the reference tokenizer actually BPE-encodes.

    Drops NUL, U+FFFD and control/format characters (category C*, e.g. zero-width joiners), turns
    whitespace into spaces, puts spaces around CJK ideographs (each becomes its own BPE word),
    NFC-normalises and lower-cases.
    """
    chars: list[str] = []
    for char in text:
        cp = ord(char)
        if char in "\t\n\r" or unicodedata.category(char) == "Zs":
            chars.append(" ")
        elif cp == 0 or cp == 0xFFFD or unicodedata.category(char).startswith("C"):
            continue
        elif _is_cjk(cp):
            chars.extend((" ", char, " "))
        else:
            chars.append(char)
    normalized = unicodedata.normalize("NFC", "".join(chars))
    return " ".join(token.lower() for token in normalized.split())


def _bpe_words(tokenizer: Any, words: Sequence[str]) -> list[list[int]]:
    """BPE ids of each word on its own, without BOS/EOS (``tokenizer(word)[1:-1]`` in Fooocus)."""
    if not words:
        return []
    encoded = tokenizer([basic_clean(w) for w in words], add_special_tokens=False)["input_ids"]
    return [list(ids) for ids in encoded]


def split_words(piece: str) -> list[str]:
    """spec §3.2 step 1: ``\\n`` -> space, split on ``' '`` only, drop empty strings."""
    return [word for word in piece.replace("\n", " ").split(" ") if word]


# A group is the list of (token id or embedding vector, weight) of one word.
_Group = list[tuple[Any, float]]


def _word_groups(
    tokenizer: Any,
    pieces: Sequence[tuple[str, float]],
    embeddings: EmbeddingLookup | None,
    embedding_key: str,
) -> list[_Group]:
    """spec §3.2 steps 1-3: one token group per word (and per found embedding)."""
    # (text or vector, weight, is_vector); BPE for all text words is done in one batch call.
    items: list[tuple[Any, float, bool]] = []
    for piece, weight in pieces:
        for word in split_words(piece):
            if word.startswith(EMBEDDING_PREFIX):
                vectors, leftover = _lookup_embedding(word[len(EMBEDDING_PREFIX):], embeddings, embedding_key)
                if vectors is not None:
                    items.append((vectors, weight, True))
                if not leftover:
                    continue
                word = leftover
            items.append((word, weight, False))

    bpe = iter(_bpe_words(tokenizer, [text for text, _, is_vec in items if not is_vec]))
    groups: list[_Group] = []
    for value, weight, is_vec in items:
        if is_vec:
            rows = value if value.ndim == 2 else value.reshape(1, -1)
            groups.append([(rows[i], weight) for i in range(rows.shape[0])])
        else:
            groups.append([(tok, weight) for tok in next(bpe)])
    return groups


def _lookup_embedding(name: str, embeddings: EmbeddingLookup | None, key: str) -> tuple[Any, str]:
    """Find a textual inversion; ``(vectors or None, leftover text to tokenize as a word)``.

    As in Fooocus (ComfyUI ``_try_get_embedding``): when ``NAME`` is not found, trailing/leading
    commas are stripped and the lookup retried; the comma tail is then tokenized as its own word,
    so ``embedding:foo,`` still contributes its ``,``.
    """
    name = name.strip("\n")
    vectors = embeddings(name, key) if (embeddings is not None and name) else None
    leftover = ""
    if vectors is None:
        stripped = name.strip(",")
        if len(stripped) < len(name):
            vectors = embeddings(stripped, key) if (embeddings is not None and stripped) else None
            leftover = name[len(stripped):]
    if vectors is None:
        log.debug("embedding %r not found, ignored (as Fooocus)", name)
    return vectors, leftover


def _chunk(groups: Sequence[_Group], bos_id: int, eos_id: int, pad_id: int) -> list[TokenChunk]:
    """spec §3.2 step 4: pack word groups into 77-slot chunks, keeping short words together."""
    chunks: list[list[tuple[Any, float, int]]] = []
    current: list[tuple[Any, float, int]] = [(bos_id, 1.0, 0)]
    capacity = CHUNK_LENGTH - 1  # slots before the closing EOS

    def close(chunk: list[tuple[Any, float, int]]) -> None:
        chunk.append((eos_id, 1.0, 0))
        chunk.extend([(pad_id, 1.0, 0)] * (CHUNK_LENGTH - len(chunk)))
        chunks.append(chunk)

    for word_index, group in enumerate(groups, start=1):
        splittable = len(group) >= SPLITTABLE_WORD_TOKENS
        rest = group
        while rest:
            if len(current) + len(rest) <= capacity:
                current.extend((tok, w, word_index) for tok, w in rest)
                rest = []
                continue
            if splittable:
                room = capacity - len(current)
                current.extend((tok, w, word_index) for tok, w in rest[:room])
                rest = rest[room:]
            close(current)
            current = [(bos_id, 1.0, 0)]
    close(current)

    out: list[TokenChunk] = []
    for chunk in chunks:
        ids: list[int] = []
        vectors: list[tuple[int, Any]] = []
        for slot, (tok, _, _) in enumerate(chunk):
            if isinstance(tok, int):
                ids.append(tok)
            else:
                ids.append(bos_id)
                vectors.append((slot, tok))
        out.append(TokenChunk(
            token_ids=tuple(ids),
            weights=tuple(float(w) for _, w, _ in chunk),
            word_ids=tuple(wid for _, _, wid in chunk),
            embeddings=tuple(vectors),
        ))
    return out


def special_ids(tokenizer: Any) -> tuple[int, int]:
    """``(bos_id, eos_id)`` read from the tokenizer (the demo model's tiny tokenizer uses other ids)."""
    bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos_id is None or eos_id is None:
        raise ValueError("CLIP tokenizer without BOS/EOS tokens")
    return int(bos_id), int(eos_id)


def pad_id_for(tokenizer: Any, *, pad_with_end: bool) -> int:
    """CLIP-L pads with its EOS id, CLIP-G with 0 (spec §3.2 step 5)."""
    return special_ids(tokenizer)[1] if pad_with_end else 0


def empty_chunk(tokenizer: Any, *, pad_with_end: bool) -> TokenChunk:
    """``[BOS, EOS, pad...]``: the chunk of an empty prompt, the reference for emphasis (spec §3.3 step 1)."""
    bos_id, eos_id = special_ids(tokenizer)
    return _chunk([], bos_id, eos_id, pad_id_for(tokenizer, pad_with_end=pad_with_end))[0]


def tokenize_pieces(
    tokenizer: Any,
    pieces: Sequence[tuple[str, float]],
    *,
    pad_with_end: bool,
    embeddings: EmbeddingLookup | None = None,
    embedding_key: str = "clip_l",
) -> list[TokenChunk]:
    """Weighted pieces (from :func:`parse_emphasis`) -> 77-slot chunks for one encoder."""
    bos_id, eos_id = special_ids(tokenizer)
    groups = _word_groups(tokenizer, pieces, embeddings, embedding_key)
    return _chunk(groups, bos_id, eos_id, pad_id_for(tokenizer, pad_with_end=pad_with_end))


def tokenize_prompt(
    tokenizer: Any,
    text: str,
    *,
    pad_with_end: bool,
    embeddings: EmbeddingLookup | None = None,
    embedding_key: str = "clip_l",
) -> list[TokenChunk]:
    """One prompt text -> 77-slot chunks for one encoder (spec §3.1 + §3.2)."""
    return tokenize_pieces(tokenizer, parse_emphasis(text), pad_with_end=pad_with_end,
                           embeddings=embeddings, embedding_key=embedding_key)


def tokenize_sdxl(
    tok_l: Any | None,
    tok_g: Any,
    text: str,
    *,
    embeddings: EmbeddingLookup | None = None,
) -> dict[str, list[TokenChunk]]:
    """``{"l": chunks, "g": chunks}`` for SDXL's two encoders (spec §3.2 step 6).

    Both get the same tokens; L pads with EOS, G with 0. ``tok_l=None`` (the refiner, which has no
    CLIP-L) leaves out the ``"l"`` entry.
    """
    pieces = parse_emphasis(text)
    out = {"g": tokenize_pieces(tok_g, pieces, pad_with_end=False, embeddings=embeddings, embedding_key="clip_g")}
    if tok_l is not None:
        out["l"] = tokenize_pieces(tok_l, pieces, pad_with_end=True, embeddings=embeddings, embedding_key="clip_l")
    return out
