"""process_prompt, wildcards and inline LoRAs: behaviour the golden cases do not reach (spec §2)."""

from __future__ import annotations

import random
from pathlib import Path

from engine.prompts.assembly import process_prompt
from engine.prompts.inline_loras import parse_lora_references
from engine.prompts.styles import StyleLibrary
from engine.prompts.wildcards import MAX_WILDCARD_DEPTH, WildcardLibrary, apply_arrays, apply_wildcards

LIBRARY = StyleLibrary.load([])


def test_wildcard_folders_first_wins_and_refresh(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b" / "nested"
    first.mkdir()
    second.mkdir(parents=True)
    (first / "animal.txt").write_text("cat\n\n", encoding="utf-8")
    (second / "animal.txt").write_text("dog\n", encoding="utf-8")
    (second / "plant.txt").write_text(" fern \n", encoding="utf-8")
    library = WildcardLibrary([first, tmp_path / "b"])
    assert library.names() == ["animal", "plant"]
    assert apply_wildcards("__animal__ and __plant__", random.Random(0), 0, False, library) == "cat and  fern "
    (first / "bird.txt").write_text("owl\n", encoding="utf-8")
    assert apply_wildcards("__bird__", random.Random(0), 0, True, library) == "bird"  # index is cached
    library.refresh()
    assert apply_wildcards("__bird__", random.Random(0), 0, True, library) == "owl"


def test_missing_wildcard_replaces_all_and_draws_nothing() -> None:
    rng = random.Random(5)
    assert apply_wildcards("__x__ __x__ __y-z__", rng, 0, False, None) == "x x y-z"
    assert rng.random() == random.Random(5).random()


def test_wildcard_depth_is_bounded(tmp_path: Path) -> None:
    (tmp_path / "loop.txt").write_text("a __loop__\n", encoding="utf-8")
    out = apply_wildcards("__loop__", random.Random(0), 0, True, WildcardLibrary([tmp_path]))
    assert out == "a " * MAX_WILDCARD_DEPTH + "__loop__"


def test_arrays_mixed_radix_without_strip() -> None:
    picks = [apply_arrays("[[a,b]]-[[x, y,z]]", i) for i in range(7)]
    assert picks == ["a-x", "b-x", "a- y", "b- y", "a-z", "b-z", "a-x"]
    assert apply_arrays("[[a|b]]", 1) == "a|b"  # '|' is not a separator in Fooocus


def test_extra_lines_and_order() -> None:
    plan = process_prompt("main\nextra one\n\nextra two", "neg\nneg extra", styles=["Hooocus Sharp"], seed=3,
                          style_library=LIBRARY)
    task = plan.tasks[0]
    sharp = LIBRARY.get("Hooocus Sharp")
    assert task.positive == [sharp.prompt.replace("{prompt}", "main"), "extra one", "extra two"]
    assert task.negative == [sharp.negative_prompt, "neg", "neg extra"]
    assert (task.positive_top_k, task.negative_top_k) == (3, 3)
    assert task.log_positive_prompt == "main\nextra one\nextra two"
    assert task.log_negative_prompt == "neg\nneg extra"


def test_expansion_skipped_without_callable_and_off_for_empty_prompt() -> None:
    plan = process_prompt("a cat", styles=["Fooocus V2"], seed=1, style_library=LIBRARY, expansion=None)
    assert plan.expansion_skipped and not plan.use_expansion and plan.tasks[0].positive == ["a cat"]
    calls: list[tuple[str, int]] = []

    def fake(prompt: str, seed: int) -> str:
        calls.append((prompt, seed))
        return f"{prompt}, more"

    empty = process_prompt("", styles=["Fooocus V2"], seed=1, style_library=LIBRARY, expansion=fake)
    assert not empty.use_expansion and not empty.expansion_skipped and calls == []
    plan = process_prompt("a cat", styles=["Fooocus V2"], seed=2**63 - 1, image_number=2, style_library=LIBRARY,
                          expansion=fake)
    assert calls == [("a cat", 2**63 - 1), ("a cat", 0)]
    assert plan.tasks[1].positive == ["a cat", "a cat, more"] and plan.tasks[1].positive_top_k == 1


def test_random_style_uses_the_shared_rng_after_wildcards(tmp_path: Path) -> None:
    (tmp_path / "w.txt").write_text("p\nq\nr\n", encoding="utf-8")
    wildcards = WildcardLibrary([tmp_path])
    plan = process_prompt("__w__", "__w__", styles=["Random Style"], seed=11, style_library=LIBRARY,
                          wildcards=wildcards)
    rng = random.Random(11)
    first, second = rng.choice(["p", "q", "r"]), rng.choice(["p", "q", "r"])
    assert (plan.tasks[0].task_prompt, plan.tasks[0].task_negative_prompt) == (first, second)
    assert plan.tasks[0].styles == [rng.choice(LIBRARY.names())]


def test_inline_loras_limit_and_none_slots() -> None:
    existing = [("None", 1.0), ("a.safetensors", 0.1), ("b.safetensors", 0.2), ("c.safetensors", 0.3),
                ("d.safetensors", 0.4)]
    loras, prompt = parse_lora_references("x <lora:e:1>, <lora:f:2>", existing, max_loras=5,
                                          available_names=["e.safetensors", "f.safetensors"])
    assert loras == existing[1:] + [("e.safetensors", 1.0)] and prompt == "x"
    unchanged, _ = parse_lora_references("x", existing, available_names=[])
    assert unchanged == existing  # nothing found: the list comes back as given, 'None' slots included
    skipped, _ = parse_lora_references("<lora:lcm:1>", [], available_names=["lcm.safetensors"],
                                       skip_names=["lcm.safetensors"])
    assert skipped == []
