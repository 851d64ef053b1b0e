"""A per-device, byte-bounded LRU of loaded models (issue 15: model memory management).

Family-neutral and torch-free at import: a runner keys its loaded objects (checkpoints, refiners,
upscalers, adapters) by what identifies the weights, gives each one's size in bytes
(:func:`tensor_bytes` measures parameters + buffers of torch modules by duck typing), and the cache
keeps them while they fit in ``budget_bytes``. Loading something new that does not fit evicts the
least recently used entries first. Entries pinned by the running job are never evicted, so a job's
base model stays while its refiner loads; an entry bigger than the whole budget still loads (alone,
with everything unpinned evicted, and a warning once per key).

Not thread-safe by design: one cache per runner, used only on that runner's worker thread
(``stats`` reads ints and is safe from any thread).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("hooocus.model_cache")

#: On a CUDA device the automatic budget leaves this much (or RESERVE_FRACTION of the card, if
#: more) for what is not a cached weight: activations of a 1024² SDXL step and the VAE decode need
#: ~3–4 GB in float16, and the CUDA context and allocator fragmentation take more.
CUDA_RESERVE_BYTES = 4 * 1024**3
CUDA_RESERVE_FRACTION = 0.25
#: On the CPU the automatic budget is this fraction of physical RAM: models live in process memory
#: next to the front door, decoded images and other processes; half keeps the machine usable.
CPU_BUDGET_FRACTION = 0.5
#: Entries a cache holds at most, whatever their size (a bound even for zero-byte entries).
MAX_ENTRIES = 64


@dataclass
class _Entry:
    value: Any
    size_bytes: int
    on_evict: Callable[[Any], None] | None


@dataclass(frozen=True)
class CacheStats:
    """What ``/metrics`` shows for one device's cache."""

    budget_bytes: int
    used_bytes: int
    entries: int
    evictions: int


class ModelCache:
    """Key -> loaded object + byte size, least recently used first out, within ``budget_bytes``."""

    def __init__(self, budget_bytes: int, *, name: str = "", max_entries: int = MAX_ENTRIES,
                 after_evict: Callable[[], None] | None = None) -> None:
        if budget_bytes < 0 or max_entries < 1:
            raise ValueError("budget_bytes must be >= 0 and max_entries >= 1")
        self.budget_bytes = int(budget_bytes)
        self.name = name
        self.max_entries = max_entries
        #: Called once after one or more entries were dropped (a runner frees the allocator there:
        #: gc.collect + torch.cuda.empty_cache), not per entry.
        self._after_evict = after_evict
        self._entries: collections.OrderedDict[Hashable, _Entry] = collections.OrderedDict()
        self._pins: collections.Counter[Hashable] = collections.Counter()
        self._used_bytes = 0
        self._evictions = 0
        self._warned_oversize: set[Hashable] = set()

    # -- views ---------------------------------------------------------------------------------

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def used_bytes(self) -> int:
        return self._used_bytes

    def keys(self) -> list[Hashable]:
        """Least recently used first."""
        return list(self._entries)

    def size_of(self, key: Hashable) -> int | None:
        entry = self._entries.get(key)
        return None if entry is None else entry.size_bytes

    def stats(self) -> CacheStats:
        return CacheStats(budget_bytes=self.budget_bytes, used_bytes=self._used_bytes,
                          entries=len(self._entries), evictions=self._evictions)

    # -- use -----------------------------------------------------------------------------------

    def get(self, key: Hashable) -> Any | None:
        """The cached object (now the most recently used), or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry.value

    def peek(self, key: Hashable) -> Any | None:
        """The cached object without touching its recency (diagnostics), or None."""
        entry = self._entries.get(key)
        return None if entry is None else entry.value

    def get_or_load(self, key: Hashable, load: Callable[[], Any], *, size_of: Callable[[Any], int],
                    size_hint_bytes: int = 0, on_evict: Callable[[Any], None] | None = None) -> Any:
        """The cached object for ``key``, else ``load()`` it. Before loading, room is made for
        ``size_hint_bytes`` (e.g. the file size) so the old weights go before the new ones arrive;
        after loading, the measured ``size_of(value)`` is what counts."""
        value = self.get(key)
        if value is not None:
            return value
        self.make_room(size_hint_bytes, keep=(key,))
        value = load()
        self.put(key, value, size_of(value), on_evict=on_evict)
        return value

    def put(self, key: Hashable, value: Any, size_bytes: int, *,
            on_evict: Callable[[Any], None] | None = None) -> Any:
        """Add (or replace) ``key``; evicts least recently used unpinned entries to fit."""
        if key in self._entries:
            self._drop(key)
        size_bytes = max(0, int(size_bytes))
        if size_bytes > self.budget_bytes and key not in self._warned_oversize:
            self._warned_oversize.add(key)
            log.warning("model %s needs %.2f GB, more than the %s memory budget of %.2f GB: it is kept alone "
                        "(raise --model-memory-gb to keep more models loaded)", _label(key), size_bytes / 1e9,
                        self.name or "device", self.budget_bytes / 1e9)
        self.make_room(size_bytes, keep=(key,))
        self._entries[key] = _Entry(value, size_bytes, on_evict)
        self._used_bytes += size_bytes
        return value

    def make_room(self, size_bytes: int, *, keep: Iterable[Hashable] = ()) -> list[Hashable]:
        """Evict least recently used unpinned entries until ``size_bytes`` more fit in the budget
        (and one more entry fits in ``max_entries``). Pinned entries stay even over budget."""
        keep = set(keep)
        evicted: list[Hashable] = []
        for key in list(self._entries):
            over_bytes = self._used_bytes + size_bytes > self.budget_bytes
            over_count = len(self._entries) + 1 > self.max_entries
            if not (over_bytes or over_count):
                break
            if key not in self._entries or self._pins[key] > 0 or key in keep:
                continue  # (gone already: an evicted model's hook released what was built from it)
            self._drop(key)
            evicted.append(key)
        if evicted:
            self._evictions += len(evicted)
            log.info("evicted %d model(s) from the %s cache: %s", len(evicted), self.name or "device",
                     ", ".join(_label(k) for k in evicted))
            self._freed()
        return evicted

    def release(self, key: Hashable | None = None) -> int:
        """Drop ``key`` (None: every entry, pinned or not, e.g. after out-of-memory or before a
        family switch). Returns the bytes released."""
        keys = list(self._entries) if key is None else ([key] if key in self._entries else [])
        before = self._used_bytes
        for k in keys:
            self._drop(k)
        if key is None:
            self._pins.clear()
        if keys:
            self._freed()
        return before - self._used_bytes

    def release_where(self, predicate: Callable[[Hashable], bool]) -> int:
        """Drop every unpinned entry whose key matches (e.g. adapters built for an evicted model)."""
        keys = [k for k in self._entries if predicate(k) and self._pins[k] == 0]
        before = self._used_bytes
        for k in keys:
            self._drop(k)
        if keys:
            self._freed()
        return before - self._used_bytes

    # -- pinning -------------------------------------------------------------------------------

    def pin(self, key: Hashable) -> None:
        self._pins[key] += 1

    def unpin(self, key: Hashable) -> None:
        if self._pins[key] <= 1:
            self._pins.pop(key, None)
        else:
            self._pins[key] -= 1

    def is_pinned(self, key: Hashable) -> bool:
        return self._pins[key] > 0

    @contextlib.contextmanager
    def pinned(self) -> Iterator[Callable[[Hashable], None]]:
        """A job's scope: ``pin(key)`` inside it keeps that entry until the scope ends."""
        held: list[Hashable] = []

        def hold(key: Hashable) -> None:
            self.pin(key)
            held.append(key)

        try:
            yield hold
        finally:
            for key in held:
                self.unpin(key)

    # -- internals -----------------------------------------------------------------------------

    def _drop(self, key: Hashable) -> None:
        entry = self._entries.pop(key, None)
        if entry is None:  # released by another entry's on_evict hook during the same sweep
            return
        self._used_bytes -= entry.size_bytes
        if entry.on_evict is not None:
            try:
                entry.on_evict(entry.value)
            except Exception:  # an undo hook failing must not keep the weights alive or stop the job
                log.exception("releasing model %s failed", _label(key))
        entry.value = None  # the cache's last reference goes now, not when the entry is collected

    def _freed(self) -> None:
        if self._after_evict is not None:
            try:
                self._after_evict()
            except Exception:
                log.exception("freeing device memory after eviction failed")


def _label(key: Hashable) -> str:
    text = str(key)
    return text if len(text) <= 160 else text[:157] + "..."


def tensor_bytes(*objects: Any) -> int:
    """Bytes of the parameters and buffers of torch modules (duck typed: anything with
    ``parameters()``/``buffers()``) and of bare tensors; shared storage is counted once."""
    seen: set[tuple[str, int]] = set()
    total = 0

    def add(tensor: Any) -> None:
        nonlocal total
        try:
            storage = tensor.untyped_storage()
            key = (str(tensor.device), storage.data_ptr())
            size = storage.nbytes()
        except Exception:  # a meta or odd tensor: count its own elements
            key = ("id", id(tensor))
            size = tensor.numel() * tensor.element_size()
        if key[1] == 0 and key[0] != "id":  # empty storage: data_ptr 0 is not unique
            key = ("id", id(tensor))
        if key not in seen:
            seen.add(key)
            total += int(size)

    for obj in objects:
        if obj is None:
            continue
        if hasattr(obj, "parameters") and hasattr(obj, "buffers"):
            for tensor in obj.parameters():
                add(tensor)
            for tensor in obj.buffers():
                add(tensor)
        elif hasattr(obj, "untyped_storage"):
            add(obj)
    return total


def default_budget_bytes(device: str, *, configured_gb: float | None = None, ram_shares: int = 1) -> int:
    """The model memory budget for ``device``: ``configured_gb`` when given, else the card's total
    minus the reserve on CUDA (:data:`CUDA_RESERVE_BYTES` / :data:`CUDA_RESERVE_FRACTION`), else
    :data:`CPU_BUDGET_FRACTION` of physical RAM split over the ``ram_shares`` workers that keep
    their models in RAM (``--devices cpu,cpu``: each gets half of it)."""
    if configured_gb is not None:
        return int(configured_gb * 1024**3)
    if str(device).startswith("cuda"):
        torch = sys.modules.get("torch")  # a CUDA runner has imported it; the core never does
        if torch is not None:
            try:
                total = int(torch.cuda.get_device_properties(device).total_memory)
                return max(0, total - max(CUDA_RESERVE_BYTES, int(total * CUDA_RESERVE_FRACTION)))
            except Exception:
                log.warning("cannot read the memory of %s; using the CPU rule for its model budget", device)
    return int(_physical_memory_bytes() * CPU_BUDGET_FRACTION) // max(1, ram_shares)


def _physical_memory_bytes() -> int:
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 16 * 1024**3  # unknown platform: assume a modest machine
