"""Where the tests find their data (issue 11, "a new user's first hour"): a clean clone with no
../shared beside it has everything the fast suite needs in tests/data/, the environment variables
still override each folder, the parity tests skip with one reason naming $HOOOCUS_PARITY, and the
repository never carries Fooocus's CC BY-NC positive word list."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import paths


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in paths.TEST_DATA_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_defaults_are_inside_the_repository(clean_env: pytest.MonkeyPatch) -> None:
    data = paths.REPO_ROOT / "tests" / "data"
    assert paths.refdata_dir() == data / "refdata"
    assert paths.fooocus_data_dir() == data / "fooocus-data"
    assert paths.sdxl_configs_dir() == data / "sdxl-configs"
    for folder, inside in ((paths.refdata_dir(), "README.md"), (paths.fooocus_data_dir(), "clip_tokenizer/vocab.json"),
                           (paths.sdxl_configs_dir(), "base/unet/config.json")):
        assert (folder / inside).is_file(), folder
    assert paths.sdxl_base_keys_file().is_file()
    assert paths.parity_dir() == paths.REPO_ROOT.parent / "shared" / "parity"  # large: stays outside


def test_environment_variables_override_each_folder(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for variable, function in (("HOOOCUS_REFDATA", paths.refdata_dir), ("HOOOCUS_FOOOCUS_DATA", paths.fooocus_data_dir),
                               ("HOOOCUS_SDXL_CONFIGS", paths.sdxl_configs_dir), ("HOOOCUS_PARITY", paths.parity_dir)):
        clean_env.setenv(variable, str(tmp_path / variable))
        assert function() == tmp_path / variable


def test_parity_skips_with_one_reason_only_when_the_default_is_absent(clean_env: pytest.MonkeyPatch,
                                                                       tmp_path: Path) -> None:
    clean_env.setattr(paths, "REPO_ROOT", tmp_path / "hooocus")  # a clone with nothing beside it
    reason = paths.parity_skip_reason()
    assert reason is not None and "HOOOCUS_PARITY" in reason and str(tmp_path / "shared" / "parity") in reason
    assert "\n" not in reason
    (tmp_path / "shared" / "parity").mkdir(parents=True)
    assert paths.parity_skip_reason() is None
    clean_env.setenv("HOOOCUS_PARITY", str(tmp_path / "typo"))  # named but missing: the tests run and fail
    assert paths.parity_skip_reason() is None


def test_positive_words_come_only_from_outside(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setattr(paths, "REPO_ROOT", tmp_path / "clone" / "hooocus")  # nothing beside this clone
    assert paths.positive_words_file() is None
    assert paths.external_refdata_file("prompts/expansion_internals.json") is None
    with pytest.raises(pytest.skip.Exception, match="HOOOCUS_FOOOCUS_DATA"):
        paths.require_positive_words_file()
    outside = tmp_path / "prompt_expansion" / "positive.txt"
    outside.parent.mkdir()
    outside.write_text("word\n", encoding="utf-8")
    clean_env.setenv("HOOOCUS_FOOOCUS_DATA", str(tmp_path))
    assert paths.require_positive_words_file() == outside


def test_the_repository_carries_no_positive_word_list() -> None:
    """positive.txt is CC BY-NC 4.0 (never vendored); the refdata copy drops the 642 allowed tokens
    derived from it, which are the same list in GPT-2 spelling."""
    data = paths.REPO_ROOT / "tests" / "data"
    assert not [p for p in data.rglob("positive.txt")]
    internals = json.loads((data / "refdata" / "prompts" / "expansion_internals.json").read_text(encoding="utf-8"))
    assert "allowed_tokens" not in internals and "allowed_token_ids" not in internals
    assert "CC BY-NC" in internals["allowed_tokens_removed"]


def test_a_shared_folder_beside_the_checkout_supplies_the_non_redistributable_parts(
        clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setattr(paths, "REPO_ROOT", tmp_path / "hooocus")
    words = tmp_path / "shared" / "fooocus-data" / "prompt_expansion" / "positive.txt"
    words.parent.mkdir(parents=True)
    words.write_text("word\n", encoding="utf-8")
    internals = tmp_path / "shared" / "refdata" / "prompts" / "expansion_internals.json"
    internals.parent.mkdir(parents=True)
    internals.write_text("{}", encoding="utf-8")
    assert paths.positive_words_file() == words
    assert paths.external_refdata_file("prompts/expansion_internals.json") == internals
