"""Golden: prompt assembly, wildcards, arrays, inline LoRAs and Fooocus V2 internals (spec §2)
against refdata/prompts/ — every case in every file, parametrised from the data.

The recorded expansion words come from a stub GPT-2 ``generate`` that appends the allowed tokens
in ascending id order (refdata/README.md). :class:`AscendingStubGPT2` does the same through our
logits processor, so these tests prove the tokenization, length rule, decoding, cleaning and
placement of the expansion, not real model output.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
import torch

from engine.core.constants import FOOOCUS_V2_STYLE
from engine.prompts.assembly import process_prompt, remove_empty_str, safe_str
from engine.prompts.expansion import (
    COMMA_TOKEN_ID,
    NEG_INF,
    SEED_LIMIT,
    TOP_K,
    FooocusExpansion,
    allowed_token_ids,
    load_positive_words,
)
from engine.prompts.inline_loras import cleanup_prompt, parse_lora_references
from engine.prompts.styles import StyleLibrary
from engine.prompts.wildcards import MAX_WILDCARD_DEPTH, WildcardLibrary, apply_arrays, apply_wildcards
from engine.sdxl.modes import PERFORMANCE_MODES
from tests.paths import (
    STAND_IN_POSITIVE_WORDS,
    external_refdata_file,
    fooocus_data_dir,
    positive_words_file,
    refdata_dir,
    require_positive_words_file,
)

TASK_FIELDS = ("task_seed", "task_prompt", "task_negative_prompt", "positive", "negative", "expansion",
               "positive_top_k", "negative_top_k", "log_positive_prompt", "log_negative_prompt", "styles")


def _load(name: str) -> dict[str, Any]:
    path = refdata_dir() / "prompts" / name
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


_ASSEMBLY = _load("style_and_prompt_assembly.json")
_WILDCARDS = _load("wildcards_arrays.json")
_INLINE = _load("inline_lora_parsing.json")
_EXPANSION = _load("expansion_internals.json")

_PROCESS_CASES = [("assembly", i, c) for i, c in enumerate(_ASSEMBLY.get("cases", []))] + \
    [("wildcards", i, c) for i, c in enumerate(_WILDCARDS.get("process_prompt_cases", []))]


def _short(text: str, limit: int = 24) -> str:
    return text.replace("\n", "/")[:limit]


def _need_fooocus_words(*, refdata_ids: bool) -> None:
    """Skip, with one reason, a comparison that needs Fooocus's own allowed words: positive.txt is
    CC BY-NC 4.0 and never in the repository, and the in-repo refdata copy leaves out its token list."""
    require_positive_words_file()
    if refdata_ids and "allowed_token_ids" not in _EXPANSION:
        complete = external_refdata_file("prompts/expansion_internals.json")
        if complete is None:
            pytest.skip(_EXPANSION.get("allowed_tokens_removed", "refdata has no allowed_token_ids"))
        full = json.loads(complete.read_text(encoding="utf-8"))
        if full.get("cases") != _EXPANSION.get("cases"):
            pytest.fail(f"{complete} is not the complete copy of this refdata's expansion_internals.json")
        _EXPANSION.update({key: full[key] for key in ("allowed_tokens", "allowed_token_ids")})


def test_golden_files_present() -> None:
    for name, data in (("style_and_prompt_assembly.json", _ASSEMBLY), ("wildcards_arrays.json", _WILDCARDS),
                       ("inline_lora_parsing.json", _INLINE), ("expansion_internals.json", _EXPANSION)):
        assert data, f"refdata/prompts/{name} missing or empty"


class AscendingStubGPT2:
    """Stands in for GPT2LMHeadModel.generate like the golden harness: each new token is the
    lowest id our logits processor leaves open, ',' aside. Records the generate kwargs."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device("cpu")
        self.config = type("Config", (), {"pad_token_id": 50256})()
        self.calls: list[dict[str, Any]] = []

    def generate(self, *, input_ids: torch.Tensor, max_new_tokens: int, logits_processor: Any,
                 **kwargs: Any) -> torch.Tensor:
        self.calls.append({"max_new_tokens": max_new_tokens, **kwargs})
        ids = input_ids
        for _ in range(max_new_tokens):
            scores = logits_processor(ids, torch.zeros(1, self.vocab_size))
            scores[0, COMMA_TOKEN_ID] = NEG_INF
            next_id = torch.argmax(scores[0])  # the first (lowest) open id
            assert scores[0, next_id] == 0.0, "stub ran out of allowed tokens"
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
        return ids


@pytest.fixture(scope="module")
def style_library() -> StyleLibrary:
    return StyleLibrary.load([fooocus_data_dir() / "sdxl_styles"])  # our own set included


@pytest.fixture(scope="module")
def wildcards() -> WildcardLibrary:
    return WildcardLibrary([fooocus_data_dir() / "wildcards"])


@pytest.fixture(scope="module")
def gpt2_tokenizer() -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(fooocus_data_dir() / "gpt2_tokenizer", local_files_only=True)


@pytest.fixture(scope="module")
def stub_expansion(gpt2_tokenizer: Any) -> FooocusExpansion:
    real = positive_words_file()  # else made-up words: only cases without "Fooocus V2" use the stub then
    words = load_positive_words(real) if real is not None else list(STAND_IN_POSITIVE_WORDS)
    return FooocusExpansion.from_components(gpt2_tokenizer, AscendingStubGPT2(len(gpt2_tokenizer.get_vocab())),
                                            words)


# -- process_prompt ------------------------------------------------------------------------------

@pytest.mark.parametrize(("source", "index", "case"), _PROCESS_CASES,
                         ids=[f"{s}{i}-{_short(c['input']['prompt'])}-{'+'.join(c['input']['style_selections'])}"
                              for s, i, c in _PROCESS_CASES])
def test_process_prompt_matches_fooocus(source: str, index: int, case: dict[str, Any],
                                        style_library: StyleLibrary, wildcards: WildcardLibrary,
                                        stub_expansion: FooocusExpansion) -> None:
    given = case["input"]
    if FOOOCUS_V2_STYLE in given["style_selections"]:
        _need_fooocus_words(refdata_ids=False)
    mode = PERFORMANCE_MODES[given["performance"]]
    available = list(_INLINE.get("lora_filenames_available", [])) + [name for name, _ in given["loras"]]
    plan = process_prompt(
        given["prompt"], given["negative_prompt"], styles=given["style_selections"], seed=given["seed"],
        image_number=given["image_number"], style_library=style_library, wildcards=wildcards,
        expansion=stub_expansion, loras=[(name, weight) for name, weight in given["loras"]],
        performance_loras=[mode.lora] if mode.lora else [], available_loras=available,
        disable_seed_increment=given["disable_seed_increment"],
        read_wildcards_in_order=given["read_wildcards_in_order"], cfg=given["cfg_scale"])

    assert plan.use_expansion == case["use_expansion"]
    assert [[name, weight] for name, weight in plan.loras] == case["loras_after_prompt_parsing"]
    assert len(plan.tasks) == len(case["tasks"])
    for task, expected in zip(plan.tasks, case["tasks"], strict=True):
        for name in TASK_FIELDS:
            assert getattr(task, name) == expected[name], name
        # What clip_encode received (the harness's stub returns its inputs).
        assert expected["c"] == {"texts_encoded_and_concatenated": task.positive,
                                 "pooled_from_first_k": task.positive_top_k}
        negative_cond = expected["c"] if task.negative_is_positive else \
            {"texts_encoded_and_concatenated": task.negative, "pooled_from_first_k": task.negative_top_k}
        assert expected["uc"] == negative_cond


def test_style_count_matches_recorded(style_library: StyleLibrary) -> None:
    folder_only = StyleLibrary.load([fooocus_data_dir() / "sdxl_styles"], builtin=False)
    assert len(folder_only) == _ASSEMBLY["style_count_loaded"]
    assert set(folder_only.names()) <= set(style_library.names())


# -- wildcards and arrays ------------------------------------------------------------------------

_DIRECT_WILDCARDS = _WILDCARDS.get("direct_wildcards", {}).get("cases", [])
_DIRECT_ARRAYS = _WILDCARDS.get("direct_arrays", [])


def _wildcard_id(case: dict[str, Any]) -> str:
    order = "ord" if case["read_wildcards_in_order"] else "rnd"
    return f"{case['text']}-s{case['rng_seed']}-i{case['i']}-{order}"


@pytest.mark.parametrize("case", _DIRECT_WILDCARDS, ids=[_wildcard_id(c) for c in _DIRECT_WILDCARDS])
def test_apply_wildcards(case: dict[str, Any], wildcards: WildcardLibrary) -> None:
    out = apply_wildcards(case["text"], random.Random(case["rng_seed"]), case["i"],
                          case["read_wildcards_in_order"], wildcards)
    assert out == case["output"]


@pytest.mark.parametrize("case", _DIRECT_ARRAYS, ids=[f"{c['text']}-{c['index']}" for c in _DIRECT_ARRAYS])
def test_apply_arrays(case: dict[str, Any]) -> None:
    assert apply_arrays(case["text"], case["index"]) == case["output"]


def test_wildcard_depth() -> None:
    assert MAX_WILDCARD_DEPTH == _WILDCARDS["max_bfs_depth"]


# -- inline LoRAs --------------------------------------------------------------------------------

_INLINE_CASES = _INLINE.get("cases", [])
_CLEANUP_CASES = _INLINE.get("cleanup_prompt_cases", [])


@pytest.mark.parametrize("case", _INLINE_CASES,
                         ids=[f"{i}-{c['prompt']}-{len(c['existing_loras'])}" for i, c in enumerate(_INLINE_CASES)])
def test_parse_lora_references(case: dict[str, Any]) -> None:
    loras, prompt = parse_lora_references(case["prompt"], [(n, w) for n, w in case["existing_loras"]], max_loras=5,
                                          available_names=_INLINE["lora_filenames_available"])
    assert [[name, weight] for name, weight in loras] == case["loras_out"]
    assert prompt == case["prompt_out"]


@pytest.mark.parametrize("case", _CLEANUP_CASES, ids=[c["in"] for c in _CLEANUP_CASES])
def test_cleanup_prompt(case: dict[str, str]) -> None:
    assert cleanup_prompt(case["in"]) == case["out"]


# -- Fooocus V2 internals -------------------------------------------------------------------------

def test_expansion_vocabulary(gpt2_tokenizer: Any, stub_expansion: FooocusExpansion) -> None:
    _need_fooocus_words(refdata_ids=True)
    words = load_positive_words(require_positive_words_file())
    assert len(words) == _EXPANSION["positive_txt_lines"]
    vocab = gpt2_tokenizer.get_vocab()
    assert len(vocab) == _EXPANSION["vocab_size"]
    ids = allowed_token_ids(vocab, words)
    assert ids == _EXPANSION["allowed_token_ids"]
    assert len(ids) == _EXPANSION["allowed_token_count"]
    by_id = {token_id: token for token, token_id in vocab.items()}
    assert [by_id[i] for i in ids] == _EXPANSION["allowed_tokens"]
    bias = stub_expansion.bias
    assert bias.shape == (1, _EXPANSION["vocab_size"]) and bias.dtype == torch.float32
    assert NEG_INF == _EXPANSION["neg_inf"]
    assert torch.nonzero(bias[0] == 0.0).flatten().tolist() == ids
    assert bool((bias[0][bias[0] != 0.0] == _EXPANSION["neg_inf"]).all())


def test_expansion_settings() -> None:
    settings = _EXPANSION["generation_settings"]
    assert SEED_LIMIT == _EXPANSION["seed_limit_numpy"]
    assert TOP_K == settings["top_k"]
    assert settings["do_sample"] is True


_EXPANSION_CASES = _EXPANSION.get("cases", [])


@pytest.mark.parametrize("case", _EXPANSION_CASES, ids=[_short(c["prompt"], 40) or "empty" for c in _EXPANSION_CASES])
def test_expansion_case(case: dict[str, Any], stub_expansion: FooocusExpansion) -> None:
    _need_fooocus_words(refdata_ids=True)
    prepared = stub_expansion.prepare(case["prompt"])
    if case["safe_str_plus_comma"] is not None:
        assert prepared.text == case["safe_str_plus_comma"]
    assert prepared.input_ids == case["gpt2_input_ids"]
    assert len(prepared.input_ids) == case["current_token_length"]
    assert prepared.max_new_tokens == case["max_new_tokens"]
    assert prepared.max_new_tokens + len(prepared.input_ids) == case["max_token_length"]

    # What the logits processor leaves open for this input.
    scores = stub_expansion.processor(torch.tensor([prepared.input_ids]), torch.zeros(1, _EXPANSION["vocab_size"]))
    open_ids = set(torch.nonzero(scores[0] > NEG_INF / 2).flatten().tolist())
    allowed = set(_EXPANSION["allowed_token_ids"])
    assert len(open_ids) == case["logits_processor_open_ids_count"]
    assert sorted(allowed & set(prepared.input_ids)) == case["banned_because_in_input"]
    assert (COMMA_TOKEN_ID in open_ids) == case["comma_id_11_open"]
    assert open_ids == (allowed - set(prepared.input_ids)) | {COMMA_TOKEN_ID}

    model = stub_expansion.model
    calls_before = len(model.calls)
    assert stub_expansion(case["prompt"], 12345) == case["stub_output"]
    if case["prompt"] == "" or case["max_new_tokens"] == 0:
        assert len(model.calls) == calls_before  # Fooocus returns before generate
    else:
        call = model.calls[-1]
        assert len(model.calls) == calls_before + 1
        assert (call["max_new_tokens"], call["top_k"], call["do_sample"]) == (case["max_new_tokens"], TOP_K, True)


# -- small helpers whose behaviour the cases above rely on ---------------------------------------

@pytest.mark.parametrize(("text", "cleaned"),
                         [("  a  b ,. ", "a b"), ("a" + " " * 40 + "b", "a b"), ("\r\n,x.\n", "x")])
def test_safe_str(text: str, cleaned: str) -> None:
    assert safe_str(text) == cleaned


def test_remove_empty_str() -> None:
    assert remove_empty_str(["", "a", ""]) == ["a"]
    assert remove_empty_str(["", ""], default="d") == ["d"]
    assert remove_empty_str([], default=None) == []
