"""Golden: the tokens Fooocus produced for real (styled) prompts in every end-to-end parity run.

Reads ``$HOOOCUS_PARITY/runs/*/`` (default ../shared/parity): ``params.json`` gives the texts that
were encoded (``derived.positive_texts`` / ``negative_texts`` and their pool top-k), ``tokens.json``
the ``[[id, weight], ...]`` 77-token chunks per text and encoder (spec §3.2, §3.5).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from engine.sdxl.conditioning.tokenize import tokenize_sdxl
from tests.paths import parity_dir, parity_skip_reason

if parity_skip_reason() is not None:  # the runs live outside the repository: one reason, this module
    pytest.skip(parity_skip_reason(), allow_module_level=True)

# tokens.json holds one clip_encode call per list entry: the positive texts first, then the negative.
_CALLS = (("positive_texts", "positive_pool_top_k"), ("negative_texts", "negative_pool_top_k"))


def _runs() -> list[Path]:
    root = parity_dir() / "runs"
    return sorted(p for p in root.glob("*") if (p / "tokens.json").is_file()) if root.is_dir() else []


def _cases() -> list[Any]:
    cases = []
    for run in _runs():
        calls = json.loads((run / "tokens.json").read_text(encoding="utf-8"))
        for call_index, call in enumerate(calls):
            for text_index, entry in enumerate(call["texts"]):
                cases.append(pytest.param(run, call_index, text_index, entry,
                                          id=f"{run.name}-call{call_index}-text{text_index}"))
    return cases


_RUNS = _runs()
_CASES = _cases()


def test_parity_runs_present() -> None:
    assert _RUNS, f"no parity runs with tokens.json under {parity_dir() / 'runs'}; set HOOOCUS_PARITY"


@pytest.mark.parametrize("run", _RUNS, ids=[r.name for r in _RUNS])
def test_calls_match_params(run: Path) -> None:
    """tokens.json records exactly the texts and pool top-k that params.json says were encoded."""
    calls = json.loads((run / "tokens.json").read_text(encoding="utf-8"))
    derived = json.loads((run / "params.json").read_text(encoding="utf-8"))["derived"]
    assert len(calls) == len(_CALLS)
    for call, (texts_key, top_k_key) in zip(calls, _CALLS):
        assert [entry["text"] for entry in call["texts"]] == derived[texts_key]
        assert call["pool_top_k"] == derived[top_k_key]


@pytest.fixture(scope="module")
def tokenizer(clip_tokenizer_dir: Path) -> Any:
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(clip_tokenizer_dir))


@pytest.mark.parametrize(("run", "call_index", "text_index", "entry"), _CASES)
def test_tokens(run: Path, call_index: int, text_index: int, entry: dict[str, Any], tokenizer: Any) -> None:
    derived = json.loads((run / "params.json").read_text(encoding="utf-8"))["derived"]
    text = derived[_CALLS[call_index][0]][text_index]  # re-tokenize the text params.json records
    chunks = tokenize_sdxl(tokenizer, tokenizer, text)
    for encoder in ("l", "g"):
        got = [[[tok, weight] for tok, weight in zip(c.token_ids, c.weights)] for c in chunks[encoder]]
        assert got == entry[encoder], encoder
