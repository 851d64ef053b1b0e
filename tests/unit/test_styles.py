"""StyleLibrary: name normalisation, Fooocus load order, our own style set (spec §2.3, §2.4)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from engine.core.errors import UnknownStyle
from engine.prompts.styles import StyleLibrary, builtin_style_text, normalize_style_name


def _write(folder: Path, name: str, entries: list[dict[str, str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(entries), encoding="utf-8")


@pytest.mark.parametrize(("raw", "normalised"), [
    ("sai-3d-model", "SAI 3D Model"),               # spec §2.3 examples
    ("mre-cinematic-dynamic", "MRE Cinematic Dynamic"),
    ("MK Chromolithography", "Mk Chromolithography"),
    ("artstyle-(steampunk)", "Artstyle (Steampunk)"),
    ("a  b", "A  B"),                                # split on single spaces: a double space survives
])
def test_normalize_style_name(raw: str, normalised: str) -> None:
    assert normalize_style_name(raw) == normalised


def test_fooocus_load_order_and_overwrite(tmp_path: Path) -> None:
    folder = tmp_path / "sdxl_styles"
    _write(folder, "sdxl_styles_sai.json", [{"name": "sai-x", "prompt": "sai {prompt}"}])
    _write(folder, "sdxl_styles_fooocus.json", [{"name": "Shared", "prompt": "fooocus {prompt}"}])
    _write(folder, "Zeta.json", [{"name": "zeta", "negative_prompt": "z"}])
    _write(folder, "alpha.json", [{"name": "shared", "prompt": "user {prompt}"}, {"name": "only-user"}])
    library = StyleLibrary.load([folder], builtin=False)
    # user files first (case-insensitive sort), then Fooocus's built-ins in their fixed order;
    # a later file overwrites an earlier entry but the name keeps its first position.
    assert library.names() == ["Shared", "Only User", "Zeta", "SAI X"]
    assert library.get("Shared").prompt == "fooocus {prompt}"
    assert library.get("Only User").prompt == "" and library.get("Zeta").negative_prompt == "z"


def test_apply_style_lines() -> None:
    library = StyleLibrary.load([], builtin=True)
    positive, negative = library.apply_style("Hooocus Cinematic", "a fox")
    assert len(positive) == 1 and positive[0].startswith("film still of a fox,")
    assert negative == [library.get("Hooocus Cinematic").negative_prompt]
    positive, negative = library.apply_style("Hooocus Enhance", "a fox")
    assert positive == [] and len(negative) == 1  # negative-only style


def test_our_style_set_is_our_own() -> None:
    entries = json.loads(builtin_style_text())
    library = StyleLibrary.load([], builtin=True)
    assert len(entries) >= 10 and len(library) == len(entries)
    for entry in entries:
        assert entry["name"].startswith("Hooocus ") and normalize_style_name(entry["name"]) == entry["name"]
        assert "fooocus" not in json.dumps(entry).lower()
    assert not library.get("Hooocus Enhance").has_placeholder
    assert all(library.get(n).has_placeholder for n in library.names() if n != "Hooocus Enhance")


def test_bad_files_are_reported_not_fatal(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text("{nope", encoding="utf-8")
    _write(tmp_path, "mixed.json", [{"prompt": "no name"}, {"name": "ok", "prompt": "{prompt}"}])
    library = StyleLibrary.load([tmp_path, tmp_path / "missing"], builtin=False)
    assert library.names() == ["Ok"]
    assert len(library.load_errors) == 3


def test_canonical_and_check() -> None:
    library = StyleLibrary.load([], builtin=True)
    assert library.canonical("hooocus-sharp") == "Hooocus Sharp"
    assert library.canonical("HOOOCUS 3D RENDER") == "Hooocus 3D Render"
    assert library.canonical("fooocus v2") == "Fooocus V2"
    assert library.check(["random style", "Hooocus Anime"]) == ["Random Style", "Hooocus Anime"]
    with pytest.raises(UnknownStyle) as info:
        library.check(["Hooocus Anime", "No Such Style"])
    assert info.value.code == "unknown_style" and info.value.loc == ("styles", 1)


def test_random_style_draws_from_folder_styles(tmp_path: Path) -> None:
    _write(tmp_path, "mine.json", [{"name": f"s{i}", "prompt": "{prompt}"} for i in range(5)])
    with_ours = StyleLibrary.load([tmp_path])
    folder_only = StyleLibrary.load([tmp_path], builtin=False)
    for seed in range(20):  # same pick with or without our own set loaded
        assert with_ours.random_style(random.Random(seed)) == folder_only.random_style(random.Random(seed))
    ours_only = StyleLibrary.load([])
    assert ours_only.random_style(random.Random(0)) in ours_only.names()
    with pytest.raises(UnknownStyle):
        StyleLibrary([]).random_style(random.Random(0))


def test_default_styles(tmp_path: Path) -> None:
    ours = StyleLibrary.load([])
    assert ours.default_styles(expansion_available=False) == ("Hooocus Enhance", "Hooocus Sharp")
    _write(tmp_path, "f.json", [{"name": "Fooocus Enhance"}, {"name": "Fooocus Sharp", "prompt": "{prompt}"}])
    fooocus = StyleLibrary.load([tmp_path])
    assert fooocus.default_styles(expansion_available=True) == ("Fooocus V2", "Fooocus Enhance", "Fooocus Sharp")
