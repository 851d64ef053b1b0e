"""Golden: prompt emphasis, word-wise tokenization and A1111 reweighting (spec §3) against
refdata/emphasis/ — every case of every file, parametrised from the data at collection time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from engine.sdxl.conditioning.emphasis import parse_emphasis
from engine.sdxl.conditioning.encode import encode_token_chunks, normalize_token_weights
from engine.sdxl.conditioning.tokenize import TokenChunk, empty_chunk, split_words, tokenize_prompt, tokenize_sdxl
from tests.paths import refdata_dir

# refdata/README.md: float32 CPU results, compare with atol/rtol ~1e-5.
ATOL = RTOL = 1e-5


def _emphasis_dir() -> Path:
    return refdata_dir() / "emphasis"


def _load_cases(name: str) -> list[dict[str, Any]]:
    path = _emphasis_dir() / name
    return json.loads(path.read_text(encoding="utf-8"))["cases"] if path.is_file() else []


_PROMPT_CASES = _load_cases("emphasis_cases.json")
_NORM_DATA_PATH = _emphasis_dir() / "token_weight_normalization.json"
_NORM_DATA: dict[str, Any] = json.loads(_NORM_DATA_PATH.read_text()) if _NORM_DATA_PATH.is_file() else {}
_NORM_CASES = _NORM_DATA.get("cases", [])
_STUB_PARAMS: dict[str, Any] = _NORM_DATA.get("stub_encoder_params", {})


def _ids(cases: list[dict[str, Any]], key: str) -> list[str]:
    return [f"{i}:{str(c[key])[:40]!r}" for i, c in enumerate(cases)]


@pytest.fixture(scope="module")
def tokenizer(clip_tokenizer_dir: Path) -> Any:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir))


@pytest.fixture(scope="module")
def norm_tensors() -> dict[str, torch.Tensor]:
    return load_file(str(_emphasis_dir() / "token_weight_normalization.safetensors"))


def _as_json(chunk: TokenChunk) -> dict[str, list[Any]]:
    return {"tokens": list(chunk.token_ids), "weights": list(chunk.weights), "word_ids": list(chunk.word_ids)}


def test_golden_files_present() -> None:
    assert _PROMPT_CASES, f"no cases in {_emphasis_dir() / 'emphasis_cases.json'}"
    assert _NORM_CASES, f"no cases in {_NORM_DATA_PATH}"


@pytest.mark.parametrize("case", _PROMPT_CASES, ids=_ids(_PROMPT_CASES, "prompt"))
def test_segments_and_words(case: dict[str, Any]) -> None:
    pieces = parse_emphasis(case["prompt"])
    # Exact equality: weights are float64 as Fooocus computes them (1.1 * 1.1 = 1.2100000000000002).
    assert pieces == [(s["text"], s["weight"]) for s in case["segments"]]
    assert [split_words(text) for text, _ in pieces] == [s["words"] for s in case["segments"]]


@pytest.mark.parametrize("case", _PROMPT_CASES, ids=_ids(_PROMPT_CASES, "prompt"))
def test_sdxl_tokens(case: dict[str, Any], tokenizer: Any) -> None:
    # The golden folder has no embeddings, so every embedding:NAME word is dropped.
    chunks = tokenize_sdxl(tokenizer, tokenizer, case["prompt"])
    for encoder in ("l", "g"):
        assert [_as_json(c) for c in chunks[encoder]] == case["sdxl_tokens"][encoder], encoder


@pytest.mark.parametrize("case", _NORM_CASES, ids=_ids(_NORM_CASES, "prompt"))
def test_normalization_tokens(case: dict[str, Any], tokenizer: Any) -> None:
    chunks = tokenize_prompt(tokenizer, case["prompt"], pad_with_end=True)
    assert [[[t, w] for t, w in zip(c.token_ids, c.weights)] for c in chunks] == case["token_weight_pairs"]


@pytest.mark.parametrize("case", _NORM_CASES, ids=_ids(_NORM_CASES, "prompt"))
def test_normalize_token_weights(case: dict[str, Any], norm_tensors: dict[str, torch.Tensor]) -> None:
    i = case["case"]
    encoder_out = norm_tensors[f"case{i}_encoder_out"]
    chunks = len(case["token_weight_pairs"])
    weights = [[w for _, w in chunk] for chunk in case["token_weight_pairs"]]
    z_empty = encoder_out[-1] if case["has_weights"] else None
    result = normalize_token_weights(encoder_out[:chunks], z_empty, weights)
    expected = norm_tensors[f"case{i}_result"]
    torch.testing.assert_close(result.reshape(expected.shape), expected, atol=ATOL, rtol=RTOL)


def _stub_encoder_rows(token_rows: list[list[int]], params: dict[str, Any]) -> torch.Tensor:
    """The stub encoder documented in token_weight_normalization.json (``stub_encoder``), with its
    constants from the machine-readable ``stub_encoder_params``."""
    table = torch.randn((params["vocab_rows"], params["dim"]), generator=torch.Generator().manual_seed(params["seed"]))
    ids = torch.tensor(token_rows)
    emb = table[ids]
    counts = torch.arange(1, ids.shape[1] + 1, dtype=emb.dtype).view(1, -1, 1)
    return emb + params["prefix_mean_weight"] * emb.cumsum(dim=1) / counts


@pytest.mark.parametrize("case", _NORM_CASES, ids=_ids(_NORM_CASES, "prompt"))
def test_encode_token_chunks_with_stub_encoder(case: dict[str, Any], tokenizer: Any,
                                               norm_tensors: dict[str, torch.Tensor]) -> None:
    """The whole per-encoder routine: which rows go to the encoder, reweighting, pooled of chunk 0."""
    i = case["case"]
    encoder_out = norm_tensors[f"case{i}_encoder_out"]
    chunks = tokenize_prompt(tokenizer, case["prompt"], pad_with_end=True)
    empty = empty_chunk(tokenizer, pad_with_end=True)
    seen_rows: list[list[int]] = []

    def run_encoder(rows: Any) -> tuple[torch.Tensor, torch.Tensor]:
        seen_rows.extend(list(r.token_ids) for r in rows)
        # The rows we ask for must be exactly the rows Fooocus fed (checked through the stub formula,
        # which makes the empty row's padding visible), then we hand back Fooocus's recorded output.
        assert len(rows) == case["encoder_rows"]
        torch.testing.assert_close(_stub_encoder_rows(seen_rows, _STUB_PARAMS),
                                   encoder_out, atol=ATOL, rtol=RTOL)
        eos = tokenizer.eos_token_id
        first_eos = [r.token_ids.index(eos) for r in rows]
        pooled = torch.stack([encoder_out[b, j] for b, j in enumerate(first_eos)])
        return encoder_out.clone(), pooled

    cond, pooled = encode_token_chunks(run_encoder, chunks, empty)
    torch.testing.assert_close(cond, norm_tensors[f"case{i}_result"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(pooled, norm_tensors[f"case{i}_pooled"], atol=ATOL, rtol=RTOL)
