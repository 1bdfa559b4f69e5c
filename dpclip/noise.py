"""The Gaussian mechanism on clipped sums, with an explicit ``torch.Generator``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = ["GaussianNoise"]


@dataclass(frozen=True)
class GaussianNoise:
    """Adds ``N(0, (noise_multiplier * sensitivity)^2)`` to every coordinate.

    The noise is drawn from ``generator`` (on the generator's device, then moved), so a
    run is reproducible from the generator's state and no global RNG is touched.
    """

    noise_multiplier: float

    def __post_init__(self) -> None:
        sigma = float(self.noise_multiplier)
        if not sigma >= 0:
            raise ValueError(f"noise_multiplier must be >= 0 (noise std / sensitivity); got {self.noise_multiplier}")
        object.__setattr__(self, "noise_multiplier", sigma)

    def std(self, sensitivity: float) -> float:
        """``noise_multiplier * sensitivity``; 0 without noise, also for an unbounded sensitivity."""
        if self.noise_multiplier == 0.0:
            return 0.0
        return self.noise_multiplier * float(sensitivity)

    def add(
        self, sums: Mapping[object, torch.Tensor], sensitivity: float, generator: torch.Generator
    ) -> dict[object, torch.Tensor]:
        """``{key: sum + noise}``; the keys' order fixes the order of the draws."""
        std = self.std(sensitivity)
        out = {}
        for key, value in sums.items():
            if std == 0.0:
                out[key] = value.clone()
                continue
            draw = torch.randn(value.shape, generator=generator, device=generator.device, dtype=value.dtype)
            out[key] = draw.to(value.device).mul_(std).add_(value)
        return out
