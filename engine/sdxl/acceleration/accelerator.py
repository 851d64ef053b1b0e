"""The runner's entry point: one :class:`Accelerator` per runner applies the fast paths to each
loaded model and owns the low-VRAM residency; nothing happens at import time."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from engine.sdxl.acceleration.attention import fuse_qkv_views, to_channels_last, use_sdpa
from engine.sdxl.acceleration.compile import CompiledCall, configure_compile
from engine.sdxl.acceleration.config import AccelerationConfig
from engine.sdxl.acceleration.expansion_decode import fast_expansion
from engine.sdxl.acceleration.guidance import _GuidanceGraph, guidance_function
from engine.sdxl.acceleration.lowvram import _Group, _Residency, offload
from engine.sdxl.sampling.guidance import sharpness_sampling_function

if TYPE_CHECKING:
    from engine.sdxl.models.loading import SDXLComponents


@dataclass
class Acceleration:
    """What :meth:`Accelerator.apply` installed on one model; :meth:`remove` undoes the hooks."""

    fused_attention_layers: int = 0
    compiled: dict[str, CompiledCall] = field(default_factory=dict)
    groups: list[_Group] = field(default_factory=list)
    streamed_bytes: int = 0
    resident_unet_bytes: int = 0

    def remove(self) -> None:
        for call in self.compiled.values():
            call.remove()
        for group in self.groups:
            group.remove()

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        return all([call.wait_idle(timeout_s) for call in self.compiled.values()])


class Accelerator:
    """One per runner: applies the fast paths to each loaded model and owns the low-VRAM residency."""

    def __init__(self, config: AccelerationConfig) -> None:
        self.config = config
        self._residency = _Residency()
        self._applied: dict[int, Acceleration] = {}
        self._compile_configured = False
        self._guidance: Callable[..., Any] | None = None

    @property
    def load_device(self) -> torch.device:
        return self.config.load_device

    def apply(self, components: SDXLComponents) -> Acceleration:
        config = self.config
        result = Acceleration()
        if config.sdpa:
            use_sdpa(components)
        if config.fuse_qkv and not config.low_vram:
            result.fused_attention_layers = fuse_qkv_views(components.unet)
        if config.channels_last:
            to_channels_last(components.unet, components.vae)
        if config.compile and not config.low_vram:
            if not self._compile_configured:
                configure_compile(config.cache_dir)
                self._compile_configured = True
            common = {"mode": config.compile_mode, "backend": config.compile_backend, "policy": config.compile_policy}
            unet_call = CompiledCall(components.unet, "forward", dynamic={"encoder_hidden_states": 1}, **common)
            result.compiled["unet"] = unet_call
            if config.compile_vae:
                vae_call = CompiledCall(components.vae, "decode", **common)
                result.compiled["vae"] = vae_call
            if config.compile_policy == "background" and config.compile_ahead_latents:
                unet_call.compile_ahead(config.compile_ahead_latents)
                if config.compile_vae:
                    vae_call.compile_ahead(config.compile_ahead_latents)
        if config.low_vram:
            result.groups, result.streamed_bytes, result.resident_unet_bytes = offload(
                components, self._residency, config)
        self._applied[id(components)] = result
        return result

    def forget(self, components: SDXLComponents) -> None:
        """Undo hooks and stop compiles for a model that is being unloaded."""
        applied = self._applied.pop(id(components), None)
        if applied is not None:
            applied.remove()

    def acceleration(self, components: SDXLComponents) -> Acceleration | None:
        return self._applied.get(id(components))

    def guidance(self) -> Callable[..., Any]:
        """The guidance function for ``SDXLDenoiser``: the reference, or with compile on the
        compiled :func:`guidance_tensors` behind the same never-stall dispatcher as the UNet."""
        if not self.config.compile or self.config.low_vram:
            return sharpness_sampling_function
        if self._guidance is None:
            holder = _GuidanceGraph()
            call = CompiledCall(holder, "graph", mode=None, backend=self.config.compile_backend,
                                policy=self.config.compile_policy)
            if self.config.compile_policy == "background" and self.config.compile_ahead_latents:
                call.compile_ahead(self.config.compile_ahead_latents)
            self._guidance = guidance_function(holder.graph)
        return self._guidance

    def expansion(self, expansion: Any) -> Any:
        if expansion is None or not self.config.fast_expansion:
            return expansion
        return fast_expansion(expansion)

    @contextlib.contextmanager
    def eager(self) -> Iterator[None]:
        """Run every compiled call eagerly inside this block (timing and debugging)."""
        calls = [c for a in self._applied.values() for c in a.compiled.values()]
        states = [c.enabled for c in calls]
        for call in calls:
            call.enabled = False
        try:
            yield
        finally:
            for call, state in zip(calls, states):
                call.enabled = state
