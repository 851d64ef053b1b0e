"""The per-device model LRU (engine/core/model_cache.py) with fake objects: order, budget,
pinning, an entry bigger than the budget, release, and the byte measure."""

from __future__ import annotations

import gc
import logging
import weakref

import pytest

from engine.core.model_cache import ModelCache, default_budget_bytes, tensor_bytes


class Weights:
    """A stand-in for a loaded model (weakref-able, so a test can see it die)."""

    def __init__(self, name: str) -> None:
        self.name = name


def load(cache: ModelCache, key: str, size: int, *, hint: int = 0, loads: list[str] | None = None) -> Weights:
    def loader() -> Weights:
        if loads is not None:
            loads.append(key)
        return Weights(key)

    return cache.get_or_load(key, loader, size_of=lambda _v: size, size_hint_bytes=hint)


def test_lru_order_and_budget_evict_the_least_recently_used_first() -> None:
    loads: list[str] = []
    cache = ModelCache(100)
    load(cache, "a", 40, loads=loads)
    load(cache, "b", 40, loads=loads)
    load(cache, "a", 40, loads=loads)  # a hit: a is now the most recently used
    assert loads == ["a", "b"] and cache.keys() == ["b", "a"]
    load(cache, "c", 40, loads=loads)  # 120 > 100: b (least recently used) goes, a stays
    assert cache.keys() == ["a", "c"] and cache.used_bytes == 80
    load(cache, "a", 40, loads=loads)  # A -> C -> A within budget: no reload
    assert loads == ["a", "b", "c"]
    assert cache.stats().evictions == 1 and cache.stats().entries == 2


def test_the_size_hint_evicts_before_the_new_model_loads() -> None:
    cache = ModelCache(100)
    load(cache, "a", 60)
    seen: list[list[object]] = []

    def loader() -> Weights:
        seen.append(cache.keys())  # what is still loaded while the new weights arrive
        return Weights("b")

    cache.get_or_load("b", loader, size_of=lambda _v: 60, size_hint_bytes=60)
    assert seen == [[]] and cache.keys() == ["b"]


def test_pinned_entries_are_never_evicted_even_over_budget() -> None:
    cache = ModelCache(100)
    load(cache, "old", 30)
    with cache.pinned() as hold:
        load(cache, "base", 60)
        hold("base")
        load(cache, "refiner", 60)  # base is pinned: old goes, base stays, total 120 > 100
        assert cache.keys() == ["base", "refiner"] and cache.used_bytes == 120
        assert cache.is_pinned("base")
    assert not cache.is_pinned("base")
    load(cache, "next", 30)  # unpinned now: the least recently used (base) goes first
    assert cache.keys() == ["refiner", "next"]


def test_an_entry_bigger_than_the_budget_loads_alone_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    cache = ModelCache(100, name="cuda:0")
    load(cache, "a", 30)
    load(cache, "b", 30)
    with caplog.at_level(logging.WARNING, logger="hooocus.model_cache"):
        big = load(cache, "huge", 250)
        assert load(cache, "huge", 250) is big  # kept: the next job using it does not reload
        cache.release("huge")
        load(cache, "huge", 250)
    assert cache.keys() == ["huge"] and cache.used_bytes == 250
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cuda:0" in warnings[0].getMessage()
    load(cache, "a", 30)  # the next model evicts the oversize one
    assert cache.keys() == ["a"]


def test_eviction_drops_the_last_reference_and_calls_the_hooks() -> None:
    undone: list[str] = []
    freed: list[int] = []
    cache = ModelCache(100, after_evict=lambda: freed.append(1))
    value = cache.put("a", Weights("a"), 80, on_evict=lambda v: undone.append(v.name))
    ref = weakref.ref(value)
    del value
    load(cache, "b", 80)
    gc.collect()
    assert ref() is None and undone == ["a"] and freed == [1]
    assert cache.size_of("a") is None and cache.used_bytes == 80


def test_release_all_frees_pinned_entries_too_and_reports_bytes() -> None:
    cache = ModelCache(1000)
    load(cache, "a", 100)
    load(cache, "b", 200)
    cache.pin("a")
    assert cache.release_where(lambda k: True) == 200  # pinned a stays
    assert cache.keys() == ["a"]
    assert cache.release() == 100 and len(cache) == 0 and not cache.is_pinned("a")
    assert cache.release("missing") == 0


def test_entry_count_is_bounded_even_for_zero_byte_entries() -> None:
    cache = ModelCache(10**9, max_entries=3)
    for key in "abcde":
        load(cache, key, 0)
    assert cache.keys() == ["c", "d", "e"]


def test_replacing_a_key_does_not_count_its_bytes_twice() -> None:
    cache = ModelCache(100)
    cache.put("a", Weights("a1"), 60)
    cache.put("a", Weights("a2"), 70)
    assert cache.used_bytes == 70 and cache.get("a").name == "a2"


def test_tensor_bytes_counts_parameters_and_buffers_once() -> None:
    import torch  # the core module is torch-free; its measure is duck typed

    layer = torch.nn.Linear(8, 4)  # 32 + 4 float32 values
    layer.register_buffer("scale", torch.zeros(2, dtype=torch.float16))
    assert tensor_bytes(layer) == (32 + 4) * 4 + 2 * 2
    tied = torch.nn.Sequential(layer, torch.nn.ReLU())
    assert tensor_bytes(layer, tied) == tensor_bytes(layer)  # shared weights once
    assert tensor_bytes(torch.ones(10, dtype=torch.float64), None) == 80


def test_budget_from_settings_else_a_fraction_of_ram() -> None:
    assert default_budget_bytes("cpu", configured_gb=1.5) == int(1.5 * 1024**3)
    automatic = default_budget_bytes("cpu")
    import os

    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert automatic == int(ram * 0.5)
    assert default_budget_bytes("cpu", ram_shares=2) == int(ram * 0.5) // 2  # --devices cpu,cpu share the RAM
    assert default_budget_bytes("cpu", configured_gb=1.0, ram_shares=2) == 1024**3  # the flag is per device


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        ModelCache(-1)
    with pytest.raises(ValueError):
        ModelCache(10, max_entries=0)


@pytest.mark.parametrize("command", [["serve"], ["generate", "x"], ["mcp"]])
def test_model_memory_flag_reaches_the_settings_and_bad_values_are_refused(command: list[str], tmp_path) -> None:
    from engine.core.errors import InvalidRequest
    from engine.core.settings import load_settings, settings_from_args
    from hooocus.cli import build_parser

    args = build_parser().parse_args([*command, "--model-memory-gb", "2.5", "--data-dir", str(tmp_path)])
    settings, sources = settings_from_args(args, env={})
    assert settings.model_memory_gb == 2.5 and sources["model_memory_gb"] == "cli"
    with pytest.raises(InvalidRequest) as info:
        load_settings(cli={"model_memory_gb": 0}, env={})
    assert info.value.loc == ("model_memory_gb",)
