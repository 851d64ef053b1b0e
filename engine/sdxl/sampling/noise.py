"""Seeded noise: the initial latent noise, the ancestral stream and the Brownian tree (spec §7.4).

No global RNG state is touched: every stream lives in an object the caller owns and passes on.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torchsde
from torch import Tensor


def prepare_noise(seed: int, shape: Sequence[int], device: str | torch.device = "cpu") -> tuple[Tensor, torch.Generator]:
    """Initial noise exactly as ``torch.manual_seed(seed); torch.randn(shape)`` (spec §7.4.1).

    The noise is always drawn on the CPU (portable across devices) and then moved to ``device``.
    The returned CPU generator continues the same stream, as Fooocus's CPU global generator does:
    pass it to ``sample`` for ancestral/lcm/ddpm/restart/tcd noise ("later image" rule).
    """
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    noise = torch.randn(tuple(shape), generator=generator, dtype=torch.float32, device="cpu")
    return noise.to(device), generator


def randn_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """``torch.randn_like(x)`` drawn from ``generator`` (on its device), then moved to ``x``'s device.

    With the CPU generator of ``prepare_noise`` this equals Fooocus's CPU ``randn_like`` draw.
    """
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)


class BrownianNoise:
    """One torchsde Brownian tree per image, shared by base and refiner (spec §7.4.3).

    Built like Fooocus's ``BrownianTreeNoiseSamplerPatched.global_init``: ``t0 = σmin``, ``t1 = σmax``,
    ``w0 = zeros(latent_shape)``, ``entropy = seed`` and torchsde's defaults (tol 1e-6, pool 24). A
    query ``(σ, σ_next)`` returns ``W / sqrt(|σ_next − σ|)`` with ``W = sign·tree(min, max)``,
    ``sign = −1`` when ``σ > σ_next`` (stepping down in sigma). The tree lives on ``device``; CPU and
    CUDA trees give different noise for the same seed.
    """

    def __init__(
        self, latent_shape: Sequence[int], sigma_min: float, sigma_max: float, seed: int,
        device: str | torch.device = "cpu",
    ) -> None:
        # Fooocus passes the float32 sigmas through torch.as_tensor: keep exactly those values.
        self.t0 = torch.as_tensor(sigma_min, dtype=torch.float32)
        self.t1 = torch.as_tensor(sigma_max, dtype=torch.float32)
        self.seed = int(seed)
        self._tree: torchsde.BrownianTree | None = None
        if self.t0 < self.t1:
            w0 = torch.zeros(tuple(latent_shape), dtype=torch.float32, device=device)
            self._tree = torchsde.BrownianTree(self.t0, w0, self.t1, entropy=self.seed)

    def increment(self, sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
        """The signed Brownian increment W between the two sigmas."""
        if self._tree is None:
            raise ValueError(f"Brownian interval [{float(self.t0)}, {float(self.t1)}] is empty")
        ta, tb = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        low, high, sign = (ta, tb, 1) if ta < tb else (tb, ta, -1)
        with warnings.catch_warnings():
            # torchsde rounds the interval ends to its tolerance and clamps (with a warning) queries
            # a rounding error outside them; Fooocus gets the same clamp, the warning is noise.
            warnings.filterwarnings("ignore", message="Should have", category=UserWarning)
            return self._tree(low, high) * sign

    def __call__(self, sigma: Tensor | float, sigma_next: Tensor | float) -> Tensor:
        """Unit-variance noise for the step ``sigma → sigma_next``."""
        ta, tb = torch.as_tensor(sigma), torch.as_tensor(sigma_next)
        return self.increment(ta, tb) / (tb - ta).abs().sqrt()
