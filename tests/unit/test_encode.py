"""SDXL text encoding (spec §3.3-§3.5) with tiny random CLIP encoders and an independent manual forward."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from engine.core.errors import InvalidRequest
from engine.sdxl.conditioning.encode import (
    TextEncoders,
    TextEncodingCache,
    encode_text,
    encode_texts,
    normalize_token_weights,
)
from engine.sdxl.conditioning.tokenize import tokenize_prompt, tokenize_sdxl

LAYERS = 3
ATOL = 1e-5
LONG_PROMPT = "a photo of a red cat " * 20  # 120 tokens -> 2 chunks


def _config(tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    return CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=LAYERS, num_attention_heads=4,
                          vocab_size=len(tokenizer), projection_dim=32, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id)


def _models(tokenizer: CLIPTokenizer,
            dtype: torch.dtype = torch.float32) -> tuple[CLIPTextModel, CLIPTextModelWithProjection]:
    torch.manual_seed(1234)
    clip_l = CLIPTextModel(_config(tokenizer)).eval().to(dtype)
    torch.manual_seed(5678)
    clip_g = CLIPTextModelWithProjection(_config(tokenizer)).eval().to(dtype)
    return clip_l, clip_g


@pytest.fixture(scope="module")
def tokenizer(clip_tokenizer_dir: Path) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir))


@pytest.fixture(scope="module")
def encoders(tokenizer: CLIPTokenizer) -> TextEncoders:
    clip_l, clip_g = _models(tokenizer)
    return TextEncoders(clip_l=clip_l, clip_g=clip_g, tokenizer_l=tokenizer, tokenizer_g=tokenizer)


# --- an independent CLIP text forward: embeddings + pre-LN causal transformer, no final LN -----------

def _manual_hidden_states(text_model: CLIPTextModel, ids: torch.Tensor,
                          vectors: dict[tuple[int, int], torch.Tensor] | None = None) -> list[torch.Tensor]:
    """[embeddings, layer 1, ..., layer N] outputs, computed from the weights by hand."""
    emb = text_model.embeddings
    tokens = emb.token_embedding.weight[ids].clone()
    for (row, slot), vec in (vectors or {}).items():
        tokens[row, slot] = vec
    x = tokens + emb.position_embedding.weight[: ids.shape[1]]
    seq = ids.shape[1]
    causal = torch.full((seq, seq), float("-inf")).triu(1)
    states = [x]
    for layer in text_model.encoder.layers:
        attn = layer.self_attn
        h = layer.layer_norm1(x)
        heads, head_dim = attn.num_heads, attn.head_dim

        def split(t: torch.Tensor, heads: int = heads, head_dim: int = head_dim) -> torch.Tensor:
            return t.view(t.shape[0], seq, heads, head_dim).transpose(1, 2)

        q, k, v = split(attn.q_proj(h)), split(attn.k_proj(h)), split(attn.v_proj(h))
        scores = (q @ k.transpose(-1, -2)) * head_dim**-0.5 + causal
        mixed = (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape)
        x = x + attn.out_proj(mixed)
        h = layer.mlp.fc1(layer.layer_norm2(x))
        x = x + layer.mlp.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu
        states.append(x)
    return states


def _ids(chunks: Any) -> torch.Tensor:
    return torch.tensor([list(c.token_ids) for c in chunks])


def _manual_encode(encoders: TextEncoders, text: str, clip_skip: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Manual reference of encode_text for prompts whose weights are all 1."""
    chunks = tokenize_sdxl(encoders.tokenizer_l, encoders.tokenizer_g, text)
    with torch.no_grad():
        parts = []
        for key, model in (("l", encoders.clip_l), ("g", encoders.clip_g.text_model)):
            states = _manual_hidden_states(model, _ids(chunks[key]))
            z = states[-clip_skip] if clip_skip <= LAYERS else model.final_layer_norm(states[-1])
            parts.append(z.reshape(1, -1, z.shape[-1]))
        g_states = _manual_hidden_states(encoders.clip_g.text_model, _ids(chunks["g"][:1]))
        final = encoders.clip_g.text_model.final_layer_norm(g_states[-1])
        eos_slot = list(chunks["g"][0].token_ids).index(encoders.tokenizer_g.eos_token_id)
        pooled = encoders.clip_g.text_projection(final[:, eos_slot])
    return torch.cat(parts, dim=-1), pooled


def _batch_sizes(model: torch.nn.Module) -> tuple[list[int], Any]:
    sizes: list[int] = []
    handle = model.register_forward_pre_hook(lambda _m, _a, kw: sizes.append(kw["input_ids"].shape[0]),
                                             with_kwargs=True)
    return sizes, handle


# --- tests ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("clip_skip", [1, 2, 3])
def test_clip_skip_selects_hidden_state_without_final_ln(encoders: TextEncoders, clip_skip: int) -> None:
    cond, pooled = encode_text(encoders, "a red cat on a mat", clip_skip=clip_skip)
    expected_cond, expected_pooled = _manual_encode(encoders, "a red cat on a mat", clip_skip)
    assert cond.shape == (1, 77, 64) and cond.dtype == torch.float32
    torch.testing.assert_close(cond, expected_cond, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(pooled, expected_pooled, atol=ATOL, rtol=ATOL)


def test_clip_skip_layers_differ_and_default_is_penultimate(encoders: TextEncoders) -> None:
    conds = {n: encode_text(encoders, "a red cat", clip_skip=n)[0] for n in (1, 2, 3)}
    assert not torch.allclose(conds[1], conds[2]) and not torch.allclose(conds[2], conds[3])
    torch.testing.assert_close(encode_text(encoders, "a red cat")[0], conds[2], atol=0, rtol=0)
    # No final LayerNorm: a LayerNorm output has per-token mean ~0 and std ~1; the raw state does not.
    l_part = conds[2][0, :, :32]
    with torch.no_grad():
        normed = encoders.clip_l.final_layer_norm(l_part)
    assert not torch.allclose(l_part, normed, atol=1e-3)


def test_clip_skip_beyond_depth_uses_last_output_with_final_ln(encoders: TextEncoders) -> None:
    cond, _ = encode_text(encoders, "a red cat", clip_skip=LAYERS + 1)
    expected, _ = _manual_encode(encoders, "a red cat", LAYERS + 1)
    torch.testing.assert_close(cond, expected, atol=ATOL, rtol=ATOL)


def test_clip_skip_below_one_is_rejected(encoders: TextEncoders) -> None:
    with pytest.raises(InvalidRequest) as info:
        encode_text(encoders, "a cat", clip_skip=0)
    assert info.value.code == "invalid_request"


def test_long_prompt_chunks_are_concatenated_and_pooled_from_first_chunk(encoders: TextEncoders) -> None:
    chunks = tokenize_sdxl(encoders.tokenizer_l, encoders.tokenizer_g, LONG_PROMPT)
    assert len(chunks["g"]) == 2
    cond, pooled = encode_text(encoders, LONG_PROMPT)
    assert cond.shape == (1, 154, 64)
    expected_cond, expected_pooled = _manual_encode(encoders, LONG_PROMPT, 2)
    torch.testing.assert_close(cond, expected_cond, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(pooled, expected_pooled, atol=ATOL, rtol=ATOL)
    # Changing only the second chunk leaves pooled alone and changes only the second half of cond.
    other_cond, other_pooled = encode_text(encoders, LONG_PROMPT + " dog")
    torch.testing.assert_close(other_pooled, pooled, atol=0, rtol=0)
    torch.testing.assert_close(other_cond[:, :77], cond[:, :77], atol=0, rtol=0)
    assert not torch.allclose(other_cond[:, 77:], cond[:, 77:])


def test_empty_chunk_encoded_only_when_a_weight_differs_from_one(encoders: TextEncoders) -> None:
    sizes_l, handle_l = _batch_sizes(encoders.clip_l)
    sizes_g, handle_g = _batch_sizes(encoders.clip_g)
    try:
        encode_text(encoders, "a red cat")
        encode_text(encoders, "a (red:1.5) cat")
        encode_text(encoders, LONG_PROMPT)
        encode_text(encoders, "(a:1.2) " + LONG_PROMPT)
    finally:
        handle_l.remove()
        handle_g.remove()
    assert sizes_l == sizes_g == [1, 2, 2, 3]


def test_weighted_prompt_uses_empty_chunk_normalisation(encoders: TextEncoders) -> None:
    text = "a (red:1.5) cat ((sitting)) (on:0.5) a mat"
    cond, pooled = encode_text(encoders, text)
    plain_cond, plain_pooled = encode_text(encoders, "a red cat sitting on a mat")
    # Weights never touch pooled (the extra empty row in the batch may move the last bits); they do
    # change cond.
    torch.testing.assert_close(pooled, plain_pooled, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(cond, plain_cond)

    expected = []
    for key, model in (("l", encoders.clip_l), ("g", encoders.clip_g.text_model)):
        tok = encoders.tokenizer_l if key == "l" else encoders.tokenizer_g
        chunks = tokenize_prompt(tok, text, pad_with_end=(key == "l"))
        empty = tokenize_prompt(tok, "", pad_with_end=(key == "l"))
        with torch.no_grad():
            z = _manual_hidden_states(model, _ids(chunks))[-2]
            z_empty = _manual_hidden_states(model, _ids(empty))[-2][0]
        # Formula of spec §3.3 step 3, written out by hand here.
        w = torch.tensor([list(c.weights) for c in chunks]).unsqueeze(-1)
        moved = torch.where(w != 1, z_empty + w * (z - z_empty), z)
        expected.append((moved * (z.mean() / moved.mean())).reshape(1, -1, z.shape[-1]))
        # The original scalar mean of each chunk is restored.
        part = cond[..., :32] if key == "l" else cond[..., 32:]
        torch.testing.assert_close(part.mean(), z.mean(), atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(cond, torch.cat(expected, dim=-1), atol=ATOL, rtol=ATOL)


def test_normalize_token_weights_is_identity_without_empty_state() -> None:
    z = torch.randn(2, 77, 8, generator=torch.Generator().manual_seed(0))
    assert normalize_token_weights(z, None, [[1.0] * 77] * 2) is z
    z_empty = torch.randn(77, 8, generator=torch.Generator().manual_seed(1))
    out = normalize_token_weights(z, z_empty, [[1.0] * 77] * 2)
    torch.testing.assert_close(out, z, atol=0, rtol=0)


def test_encode_texts_concatenates_and_sums_top_k_pooled(encoders: TextEncoders) -> None:
    texts = ["a red cat", "(blue:1.3) dog", "green tree " * 40]
    singles = [encode_text(encoders, t) for t in texts]
    cond, pooled = encode_texts(encoders, texts, pool_top_k=2)
    torch.testing.assert_close(cond, torch.cat([c for c, _ in singles], dim=1), atol=0, rtol=0)
    assert cond.shape == (1, 77 * 4, 64)
    torch.testing.assert_close(pooled, singles[0][1] + singles[1][1], atol=ATOL, rtol=ATOL)
    _, all_pooled = encode_texts(encoders, texts, pool_top_k=3)
    torch.testing.assert_close(all_pooled, singles[0][1] + singles[1][1] + singles[2][1], atol=ATOL, rtol=ATOL)
    _, none_pooled = encode_texts(encoders, texts, pool_top_k=0)
    assert not none_pooled.any()
    with pytest.raises(ValueError):
        encode_texts(encoders, [], pool_top_k=1)


def test_cache_hits_misses_bounds_and_isolation(encoders: TextEncoders) -> None:
    cache = TextEncodingCache(max_entries=2)
    sizes, handle = _batch_sizes(encoders.clip_g)
    try:
        cond1, pooled1 = encode_texts(encoders, ["a cat", "a dog"], pool_top_k=1, cache=cache)
        calls_after_first = len(sizes)
        cond1.add_(1.0)  # callers may modify their results without corrupting the cache
        pooled1.add_(1.0)
        cond2, pooled2 = encode_texts(encoders, ["a cat", "a dog"], pool_top_k=1, cache=cache)
        assert len(sizes) == calls_after_first == 2  # second call: no encoder run at all
        assert (cache.hits, cache.misses) == (2, 2)
        torch.testing.assert_close(cond2, cond1 - 1.0, atol=1e-6, rtol=0)
        encode_texts(encoders, ["a cat"], pool_top_k=1, clip_skip=1, cache=cache)  # other clip skip: miss
        assert len(sizes) == 3 and cache.misses == 3
    finally:
        handle.remove()
    assert len(cache) == 2 and ("a dog", 2) in cache and ("a cat", 1) in cache and ("a cat", 2) not in cache
    cache.clear()
    assert len(cache) == 0


def test_refiner_without_clip_l_gives_g_channels_only(encoders: TextEncoders) -> None:
    refiner = TextEncoders(clip_l=None, clip_g=encoders.clip_g, tokenizer_l=None, tokenizer_g=encoders.tokenizer_g)
    cond, pooled = encode_text(refiner, "a (red:1.2) cat")
    full_cond, full_pooled = encode_text(encoders, "a (red:1.2) cat")
    assert cond.shape == (1, 77, 32)
    torch.testing.assert_close(cond, full_cond[..., 32:], atol=0, rtol=0)
    torch.testing.assert_close(pooled, full_pooled, atol=0, rtol=0)


def test_textual_inversion_vectors_replace_token_embeddings(encoders: TextEncoders) -> None:
    vectors = {"clip_l": torch.randn(2, 32, generator=torch.Generator().manual_seed(3)),
               "clip_g": torch.randn(2, 32, generator=torch.Generator().manual_seed(4))}
    lookups: list[tuple[str, str]] = []

    def lookup(name: str, key: str) -> torch.Tensor | None:
        lookups.append((name, key))
        return vectors[key] if name == "style" else None

    with_ti = TextEncoders(clip_l=encoders.clip_l, clip_g=encoders.clip_g, tokenizer_l=encoders.tokenizer_l,
                           tokenizer_g=encoders.tokenizer_g, embeddings=lookup)
    cond, _ = encode_text(with_ti, "a cat embedding:style embedding:missing dog")
    assert ("style", "clip_l") in lookups and ("style", "clip_g") in lookups
    # Missing embeddings are dropped: same as not writing them at all.
    plain, _ = encode_text(with_ti, "a cat embedding:style dog")
    torch.testing.assert_close(cond, plain, atol=0, rtol=0)

    chunks = tokenize_sdxl(with_ti.tokenizer_l, with_ti.tokenizer_g, "a cat embedding:style dog", embeddings=lookup)
    assert [slot for slot, _ in chunks["g"][0].embeddings] == [3, 4]  # BOS, a, cat, <2 vectors>, dog
    assert chunks["g"][0].word_ids[:7] == (0, 1, 2, 3, 3, 4, 0)
    with torch.no_grad():
        z_l = _manual_hidden_states(encoders.clip_l, _ids(chunks["l"]),
                                    {(0, 3): vectors["clip_l"][0], (0, 4): vectors["clip_l"][1]})[-2]
    torch.testing.assert_close(cond[..., :32], z_l, atol=ATOL, rtol=ATOL)
    # The shared token table was not modified.
    assert encoders.clip_l.get_input_embeddings().weight.shape[0] == len(encoders.tokenizer_l)


def test_embedding_trailing_comma_is_kept_as_a_word(tokenizer: CLIPTokenizer) -> None:
    plain = tokenize_prompt(tokenizer, "a ,", pad_with_end=True)
    dropped = tokenize_prompt(tokenizer, "a embedding:missing,", pad_with_end=True)
    assert dropped[0].token_ids == plain[0].token_ids


def test_half_precision_encoders_compute_in_their_dtype_and_return_float32(tokenizer: CLIPTokenizer) -> None:
    clip_l, clip_g = _models(tokenizer, torch.bfloat16)
    enc = TextEncoders(clip_l=clip_l, clip_g=clip_g, tokenizer_l=tokenizer, tokenizer_g=tokenizer)
    cond, pooled = encode_text(enc, "a (red:1.3) cat")
    ref_l, ref_g = _models(tokenizer)
    ref_cond, ref_pooled = encode_text(TextEncoders(ref_l, ref_g, tokenizer, tokenizer), "a (red:1.3) cat")
    assert cond.dtype == pooled.dtype == torch.float32
    torch.testing.assert_close(cond, ref_cond, atol=0.1, rtol=0.05)
    torch.testing.assert_close(pooled, ref_pooled, atol=0.1, rtol=0.05)


# --- a tiny tokenizer with other special ids (like the demo model's) -----------------------------------

def _byte_symbols() -> list[str]:
    """GPT-2 style printable stand-ins for the 256 bytes (transformers 5 no longer exports them)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = 0
    symbols = []
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


@pytest.fixture(scope="module")
def tiny_tokenizer() -> CLIPTokenizer:
    symbols = _byte_symbols()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in symbols:
        vocab[symbol] = len(vocab)
    for symbol in symbols:
        vocab[symbol + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def test_special_ids_come_from_the_tokenizer(tiny_tokenizer: CLIPTokenizer) -> None:
    bos, eos = tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id
    assert (bos, eos) == (0, 1)
    chunks = tokenize_sdxl(tiny_tokenizer, tiny_tokenizer, "ab (c:1.5)")
    a, b_end, c_end = (tiny_tokenizer.convert_tokens_to_ids(t) for t in ("a", "b</w>", "c</w>"))
    assert chunks["l"][0].token_ids[:6] == (bos, a, b_end, c_end, eos, eos)
    assert chunks["g"][0].token_ids[:6] == (bos, a, b_end, c_end, eos, 0)
    assert chunks["l"][0].weights[:5] == (1.0, 1.0, 1.0, 1.5, 1.0)
    assert chunks["l"][0].word_ids[:5] == (0, 1, 1, 2, 0)


def test_pooled_is_read_at_first_eos_not_at_largest_id(tiny_tokenizer: CLIPTokenizer) -> None:
    clip_l, clip_g = _models(tiny_tokenizer)
    enc = TextEncoders(clip_l=clip_l, clip_g=clip_g, tokenizer_l=tiny_tokenizer, tokenizer_g=tiny_tokenizer)
    _, pooled = encode_text(enc, "zz top")
    chunk = tokenize_sdxl(None, tiny_tokenizer, "zz top")["g"][0]
    eos_slot = chunk.token_ids.index(tiny_tokenizer.eos_token_id)
    assert eos_slot == 6  # BOS z z</w> t o p</w> EOS
    assert max(chunk.token_ids) != tiny_tokenizer.eos_token_id  # "argmax of ids" would read elsewhere
    with torch.no_grad():
        final = clip_g.text_model.final_layer_norm(_manual_hidden_states(clip_g.text_model, _ids([chunk]))[-1])
        expected = clip_g.text_projection(final[:, eos_slot])
    torch.testing.assert_close(pooled, expected, atol=ATOL, rtol=ATOL)
