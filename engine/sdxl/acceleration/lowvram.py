"""Low-VRAM mode: weights live in (pinned) CPU memory and visit the device only while used, one
group at a time; the UNet keeps what the VRAM budget allows resident and streams the other blocks,
each prefetched on a side CUDA stream while the previous one computes."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils._pytree import tree_map_only

from engine.sdxl.acceleration.config import AccelerationConfig, GiB

if TYPE_CHECKING:
    from engine.sdxl.models.loading import SDXLComponents

log = logging.getLogger("hooocus.acceleration")

#: VRAM kept free of resident UNet weights in low-VRAM mode. UNet activations at batch 2 (CFG),
#: 128×128 latent, bf16 are ≈0.46 GiB (diffusers' model offload peaked at 5.24 GiB with 4.78 GiB
#: of UNet weights on the GPU, spec/performance.md §0 low-VRAM anchor); the GPT-2 expansion stays
#: on the GPU (0.23 GiB fp16); the rest is slack for conditioning, latents and the allocator.
UNET_ACTIVATION_RESERVE_BYTES_BF16 = 1 * GiB
#: Modules the low-VRAM mode may stream one by one (diffusers class names; they hold 97.9% of the
#: SDXL base UNet's weights: 70 transformer blocks of ≈70 MB bf16 and 17 ResNet blocks ≤ 98 MB).
STREAM_UNIT_CLASSES = frozenset({"BasicTransformerBlock", "ResnetBlock2D"})


def _tensor_bytes(module: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


class _Weights:
    """The parameters and buffers of some modules, kept at 'home' (CPU, pinned for CUDA) and given
    a device copy on :meth:`load`. Parameter objects never change, only their ``.data``, so LoRA
    code holding them keeps working; an in-place write made while loaded is copied back home."""

    def __init__(self, modules: Sequence[nn.Module], device: torch.device, *, exclude: set[int] | None = None) -> None:
        self.device = device
        self.tensors: list[torch.Tensor] = []
        self.homes: list[torch.Tensor] = []
        self.versions: list[int] = []
        self.loaded = False
        seen = set(exclude or ())
        pin = device.type == "cuda"
        with torch.inference_mode(False):
            for module in modules:
                for tensor in [*module.parameters(), *module.buffers()]:
                    if id(tensor) in seen:
                        continue
                    seen.add(id(tensor))
                    home = tensor.data.to("cpu")
                    if pin:
                        home = _pinned(home)
                    tensor.data = home
                    self.tensors.append(tensor)
                    self.homes.append(home)
        self.ids = seen
        self.nbytes = sum(h.numel() * h.element_size() for h in self.homes)

    def load(self) -> None:
        if self.loaded:
            return
        with torch.inference_mode(False):
            for tensor, home in zip(self.tensors, self.homes):
                # copy=True: on a CPU "device" (tests) the copy must still be a separate tensor.
                tensor.data = home.to(self.device, non_blocking=True, copy=True)
        self.versions = [t._version for t in self.tensors]
        self.loaded = True

    def unload(self, compute_stream: Any = None) -> None:
        if not self.loaded:
            return
        for tensor, home, version in zip(self.tensors, self.homes, self.versions):
            copy = tensor.data
            if tensor._version != version:  # written while loaded (e.g. a LoRA merge): keep it
                home.copy_(copy)
            if compute_stream is not None:
                copy.record_stream(compute_stream)  # not reused before the compute that reads it ran
            tensor.data = home
        self.loaded = False


def _pinned(tensor: torch.Tensor) -> torch.Tensor:
    """Page-locked copy for asynchronous host→device copies; the plain tensor when the OS refuses
    (little RAM): copies are then synchronous, slower but correct."""
    try:
        return tensor.pin_memory()
    except RuntimeError:
        log.warning("cannot pin %.0f MB of host memory; low-VRAM copies will be synchronous",
                    tensor.numel() * tensor.element_size() / 1e6)
        return tensor


def plan_streaming(unit_bytes: Sequence[int], stream_at_least: int) -> list[bool]:
    """Which units to stream so at least ``stream_at_least`` bytes leave the GPU, spread evenly
    over the execution order (a streamed block's copy then overlaps resident blocks' compute)."""
    total = sum(unit_bytes)
    if stream_at_least <= 0 or total == 0:
        return [False] * len(unit_bytes)
    if stream_at_least >= total:
        return [True] * len(unit_bytes)
    fraction = stream_at_least / total
    chosen, credit, streamed = [], 0.0, 0
    for size in unit_bytes:
        credit += fraction * size
        take = credit >= size / 2
        if take:
            credit -= size
            streamed += size
        chosen.append(take)
    for index in sorted(range(len(unit_bytes)), key=lambda i: -unit_bytes[i]):
        if streamed >= stream_at_least:
            break
        if not chosen[index]:
            chosen[index] = True
            streamed += unit_bytes[index]
    return chosen


class _Residency:
    """Which group of weights is on the device now: one at a time (text, a UNet, the VAE)."""

    def __init__(self) -> None:
        self.active: _Group | None = None
        self.lock = threading.RLock()

    def activate(self, group: _Group) -> None:
        with self.lock:
            if self.active is group:
                return
            if self.active is not None:
                self.active.unload()
            group.load()
            self.active = group

    def evict(self, group: _Group) -> None:
        with self.lock:
            if self.active is group:
                group.unload()
                self.active = None


class _Group:
    """Weights activated by a forward pre-hook on ``entries`` (which also move tensor inputs to the
    device), plus optional streamed units with their own hooks."""

    def __init__(self, name: str, residency: _Residency, device: torch.device, entries: Sequence[nn.Module],
                 resident: _Weights, streamer: _Streamer | None = None) -> None:
        self.name, self.residency, self.device = name, residency, device
        self.resident, self.streamer = resident, streamer
        self.handles = [m.register_forward_pre_hook(self._pre_hook, with_kwargs=True) for m in entries]

    def _pre_hook(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
        self.residency.activate(self)
        device = self.device

        def move(t: torch.Tensor) -> torch.Tensor:
            return t if t.device == device else t.to(device)

        return tree_map_only(torch.Tensor, move, (args, kwargs))

    def load(self) -> None:
        self.resident.load()

    def unload(self) -> None:
        if self.streamer is not None:
            self.streamer.unload_all()
        self.resident.unload()

    def remove(self) -> None:
        self.residency.evict(self)
        for handle in self.handles:
            handle.remove()
        if self.streamer is not None:
            self.streamer.remove()


class _Streamer:
    """UNet blocks streamed through the device: each one's weights arrive before its forward
    (prefetched ``prefetch`` blocks ahead, in the order recorded on the first forward, wrapping
    round to the next step) and leave right after it."""

    def __init__(self, units: Sequence[nn.Module], device: torch.device, prefetch: int, exclude: set[int]) -> None:
        self.device = device
        self.prefetch = max(0, prefetch)
        self.units = list(units)
        self.weights = {id(u): _Weights([u], device, exclude=exclude) for u in self.units}
        self.order: list[int] = []
        self.recording = True
        self.events: dict[int, Any] = {}
        self.max_loaded = 0
        cuda = device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device) if cuda else None
        self.handles = []
        for unit in self.units:
            self.handles.append(unit.register_forward_pre_hook(self._before))
            self.handles.append(unit.register_forward_hook(self._after))

    def _load(self, key: int) -> None:
        weights = self.weights[key]
        if weights.loaded:
            return
        if self.copy_stream is None:
            weights.load()
            return
        with torch.cuda.stream(self.copy_stream):
            weights.load()
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        self.events[key] = event

    def _before(self, unit: nn.Module, _args: Any) -> None:
        key = id(unit)
        if self.recording:
            if key in self.order:  # the second forward begins: the order is known
                self.recording = False
            else:
                self.order.append(key)
        self._load(key)
        event = self.events.pop(key, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        if not self.recording and self.order:
            position = self.order.index(key)
            for step in range(1, self.prefetch + 1):
                self._load(self.order[(position + step) % len(self.order)])
        self.max_loaded = max(self.max_loaded, sum(w.loaded for w in self.weights.values()))

    def _after(self, unit: nn.Module, _args: Any, _output: Any) -> None:
        stream = torch.cuda.current_stream(self.device) if self.copy_stream is not None else None
        self.weights[id(unit)].unload(stream)

    def unload_all(self) -> None:
        if self.copy_stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        self.events.clear()
        stream = torch.cuda.current_stream(self.device) if self.copy_stream is not None else None
        for weights in self.weights.values():
            weights.unload(stream)

    @property
    def streamed_bytes(self) -> int:
        return sum(w.nbytes for w in self.weights.values())

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def stream_units(unet: nn.Module) -> list[nn.Module]:
    """The UNet's streamable blocks in registration order (outermost matches only)."""
    units: list[nn.Module] = []

    def walk(module: nn.Module) -> None:
        for child in module.children():
            if type(child).__name__ in STREAM_UNIT_CLASSES:
                units.append(child)
            else:
                walk(child)

    walk(unet)
    return units


def unet_activation_reserve(dtype: torch.dtype) -> int:
    return UNET_ACTIVATION_RESERVE_BYTES_BF16 * max(1, torch.finfo(dtype).bits // 16)


def offload(components: SDXLComponents, residency: _Residency,
            config: AccelerationConfig) -> tuple[list[_Group], int, int]:
    """Put the model's weights in (pinned) CPU memory and install the hooks that bring each part to
    the device while used: text encoders, VAE and UNet (resident part + streamed blocks) as three
    groups sharing ``residency``. Returns (groups, streamed bytes, resident UNet bytes)."""
    device = config.device
    groups: list[_Group] = []
    encoders = [m for m in (components.text_encoder, components.text_encoder_2) if m is not None]
    groups.append(_Group("text", residency, device, encoders, _Weights(encoders, device)))
    vae = components.vae
    vae_entries = [m for m in (vae.encoder, vae.quant_conv, vae.post_quant_conv, vae.decoder) if m is not None]
    groups.append(_Group("vae", residency, device, vae_entries, _Weights([vae], device)))
    unet = components.unet
    units = stream_units(unet)
    sizes = [_tensor_bytes(u) for u in units]
    total = _tensor_bytes(unet)
    target = config.vram_budget_bytes - unet_activation_reserve(components.dtype) \
        - (1 + config.prefetch_blocks) * max(sizes, default=0)
    plan = plan_streaming(sizes, total - target)
    streamed = [u for u, take in zip(units, plan) if take]
    streamer = None
    exclude: set[int] = set()
    if streamed:
        streamer = _Streamer(streamed, device, config.prefetch_blocks, exclude=set())
        for weights in streamer.weights.values():
            exclude |= weights.ids
    resident = _Weights([unet], device, exclude=exclude)
    groups.append(_Group("unet", residency, device, [unet], resident, streamer))
    streamed_bytes = streamer.streamed_bytes if streamer else 0
    components.device = device
    log.info("low-VRAM: UNet %.2f GiB resident, %.2f GiB streamed in %d blocks", resident.nbytes / GiB,
             streamed_bytes / GiB, len(streamed))
    return groups, streamed_bytes, resident.nbytes
