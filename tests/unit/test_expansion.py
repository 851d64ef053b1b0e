"""Fooocus V2 expansion with a tiny random GPT-2 saved as safetensors (spec §2.5).

A random model says nothing about word choice; these tests check the rules around it: the
prompt comes first, the length fills a 75-token block, only allowed words (and ',') are sampled,
no word repeats, the seed is taken mod 2^32, and the caller's RNG state is left alone.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from engine.core.errors import AssetsMissing, UnsafeFile
from engine.prompts.expansion import (
    COMMA_TOKEN_ID,
    NON_COMMERCIAL_NOTICE,
    SEED_LIMIT,
    FooocusExpansion,
    allowed_token_ids,
    is_available,
    load_expansion,
    load_positive_words,
    missing_assets,
)
from tests.paths import STAND_IN_POSITIVE_WORDS, fooocus_data_dir

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("fooocus_expansion")
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50257, n_positions=256, pad_token_id=50256)
    GPT2LMHeadModel(config).save_pretrained(folder)  # safetensors
    source = fooocus_data_dir()
    for name in TOKENIZER_FILES:
        shutil.copy(source / "gpt2_tokenizer" / name, folder / name)
    # A made-up word list: Fooocus's positive.txt is CC BY-NC 4.0 and never in the repository.
    (folder / "positive.txt").write_text("\n".join(STAND_IN_POSITIVE_WORDS) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def expansion(model_dir: Path) -> FooocusExpansion:
    return FooocusExpansion(model_dir)


def test_assets_check(model_dir: Path, tmp_path: Path) -> None:
    assert is_available(model_dir) and missing_assets(model_dir) == []
    assert not is_available(None) and not is_available(tmp_path / "nope")
    partial = tmp_path / "partial"
    shutil.copytree(model_dir, partial)
    (partial / "model.safetensors").unlink()
    assert missing_assets(partial) == ["model.safetensors"]
    with pytest.raises(AssetsMissing):
        FooocusExpansion(partial)
    (partial / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")  # never opened
    with pytest.raises(UnsafeFile):
        FooocusExpansion(partial)
    off, warning = load_expansion(partial)
    assert off is None and warning is not None and "off" in warning
    assert load_expansion(None)[0] is None


def test_expansion_rules(expansion: FooocusExpansion, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    words = load_positive_words(model_dir / "positive.txt")
    assert words == list(STAND_IN_POSITIVE_WORDS)
    allowed = set(allowed_token_ids(expansion.tokenizer.get_vocab(), words)) | {COMMA_TOKEN_ID}
    assert len(allowed) == len(words) + 1  # every stand-in word is one GPT-2 token
    outputs: list[torch.Tensor] = []
    real_generate = expansion.model.generate

    def recording_generate(**kwargs: object) -> torch.Tensor:
        outputs.append(real_generate(**kwargs))
        return outputs[-1]

    monkeypatch.setattr(expansion.model, "generate", recording_generate)
    prompt = "  a red  fox in snow.,"
    prepared = expansion.prepare(prompt)
    result = expansion(prompt, 42)
    assert prepared.text == "a red fox in snow,"
    sequence = outputs[0][0].tolist()
    assert sequence[:len(prepared.input_ids)] == prepared.input_ids
    assert len(sequence) == 75  # filled to one 75-token block
    generated = sequence[len(prepared.input_ids):]
    assert set(generated) <= allowed
    words_only = [i for i in generated if i != COMMA_TOKEN_ID]
    assert len(words_only) == len(set(words_only)) and not set(words_only) & set(prepared.input_ids)
    assert result == expansion.tokenizer.decode(sequence).strip(",. \r\n")
    assert result.startswith("a red fox in snow,")


def test_seed_rule_and_rng_isolation(expansion: FooocusExpansion) -> None:
    torch.manual_seed(999)
    before = torch.random.get_rng_state()
    first = expansion("a lighthouse", 7)
    assert torch.equal(torch.random.get_rng_state(), before)  # caller's RNG untouched
    assert expansion("a lighthouse", 7 + SEED_LIMIT) == first  # seed mod 2^32
    assert expansion("a lighthouse", 8) != first
    assert expansion("", 7) == ""


def test_notice_once(model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    fresh = FooocusExpansion(model_dir)
    with caplog.at_level("WARNING", logger="hooocus.expansion"):
        fresh("a cat", 1)
        fresh("a dog", 1)
    assert [r.getMessage() for r in caplog.records].count(NON_COMMERCIAL_NOTICE) == 1  # logged on first use
    assert fresh.take_notice() == NON_COMMERCIAL_NOTICE  # and handed to the pipeline once
    assert fresh.take_notice() is None


def test_full_block_returns_prompt(expansion: FooocusExpansion) -> None:
    # "a b" + 36 ", x" pairs + "," = 75 tokens: nothing to generate, the prompt comes back as is.
    prompt = "a b" + ", x" * 36
    prepared = expansion.prepare(prompt)
    assert len(prepared.input_ids) == 75 and prepared.max_new_tokens == 0
    assert expansion(prompt, 3) == prompt


# Expected strings below were worked out by hand from transformers 4.42's clean_up_tokenization
# rule list (issue 12), one replacement at a time in its order — not produced by our code.
CLEAN_UP_CASES = [
    ("a , b . c ? d ! e ' f g n't h 'm i 's j 've k 're", "a, b. c? d! e'f gn't h'm i's j've k're"),
    ("x ' 's", "x''s"),  # " ' " goes first; the reverse order would give "x ''s"
    ("dog , , cat", "dog,, cat"),  # both " ," occurrences go in the same pass
    ("no change here", "no change here"),
]


@pytest.mark.parametrize(("text", "expected"), CLEAN_UP_CASES)
def test_clean_up_tokenization_rules(text: str, expected: str) -> None:
    from engine.prompts.expansion import clean_up_tokenization

    assert clean_up_tokenization(text) == expected


def test_generate_path_cleans_up_decoded_text(expansion: FooocusExpansion, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fooocus (transformers 4.42 batch_decode) removes spaces before punctuation, then safe_str."""
    seen: dict[str, object] = {}

    def fake_batch_decode(features: object, **kwargs: object) -> list[str]:
        seen.update(kwargs)
        return ["a dog , very nice , good . "]

    monkeypatch.setattr(expansion.tokenizer, "batch_decode", fake_batch_decode)
    assert expansion("a dog", 1) == "a dog, very nice, good"  # hand-derived: clean-up, then strip ",. "
    assert seen.get("clean_up_tokenization_spaces") is False  # ours, once, not the library's variant


def test_zero_new_tokens_skips_the_clean_up(expansion: FooocusExpansion) -> None:
    # 75 tokens with a " ," inside: Fooocus returns the prompt before any decode, unchanged.
    prompt = "a ," + ", x" * 36
    prepared = expansion.prepare(prompt)
    assert prepared.max_new_tokens == 0
    assert expansion(prompt, 3) == prompt
