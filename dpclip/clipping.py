"""Clipping rules: pure functions from per-sample norms to per-sample scale factors.

Each rule maps ``norms`` of shape ``[B, G]`` (sample i, parameter group g) to ``scales`` of
the same shape, and declares the L2 sensitivity ``S`` of the clipped sum
``sum_i scale_ig * g_ig`` under adding or removing one sample; the noise std is
``noise_multiplier * S`` (DESIGN.md §5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["FlatClipping", "PerLayerClipping", "AutomaticClipping", "clip_factor"]


def clip_factor(norms: torch.Tensor, max_norm: torch.Tensor | float) -> torch.Tensor:
    """``min(1, max_norm / norm)``, exactly 1 at norm 0 and for ``max_norm = inf`` (shape of ``norms``)."""
    if not isinstance(max_norm, torch.Tensor):
        if math.isinf(max_norm):
            return torch.ones_like(norms)
        # C / max(norm, C): exactly 1 up to the bound (C / C), and two passes over [B, G]
        bound = torch.as_tensor(float(max_norm), dtype=norms.dtype, device=norms.device)
        return torch.div(bound, norms.clamp_min(bound))
    max_norm = max_norm.to(dtype=norms.dtype, device=norms.device)
    over = norms > max_norm
    return torch.where(over, max_norm / torch.where(over, norms, 1.0), 1.0).to(norms.dtype)


def _check_norm(name: str, value: float) -> float:
    value = float(value)
    if not value > 0:
        raise ValueError(f"{name} must be > 0 (an L2 norm bound, e.g. 1.0); got {value}")
    return value


@dataclass(frozen=True)
class FlatClipping:
    """Abadi et al. 2016: clip each sample's whole gradient to ``max_grad_norm``. ``G = 1``."""

    max_grad_norm: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_grad_norm", _check_norm("max_grad_norm", self.max_grad_norm))

    @property
    def groups(self) -> int:
        return 1

    @property
    def sensitivity(self) -> float:
        return self.max_grad_norm

    def __call__(self, norms: torch.Tensor) -> torch.Tensor:
        return clip_factor(norms, self.max_grad_norm)


@dataclass(frozen=True)
class PerLayerClipping:
    """Clip group ``l`` of each sample's gradient to ``max_grad_norms[l]`` (McMahan et al. 2018).

    Sensitivity ``sqrt(sum_l C_l^2)``: the clipped per-sample gradient's total norm is at most that.
    """

    max_grad_norms: tuple[float, ...]

    def __post_init__(self) -> None:
        if isinstance(self.max_grad_norms, (str, bytes)) or not isinstance(self.max_grad_norms, Sequence):
            raise TypeError(f"max_grad_norms must be a sequence of floats; got {self.max_grad_norms!r}")
        if len(self.max_grad_norms) == 0:
            raise ValueError("max_grad_norms is empty: give one bound per parameter group")
        values = tuple(_check_norm(f"max_grad_norm[{i}]", c) for i, c in enumerate(self.max_grad_norms))
        object.__setattr__(self, "max_grad_norms", values)

    @property
    def groups(self) -> int:
        return len(self.max_grad_norms)

    @property
    def sensitivity(self) -> float:
        return math.sqrt(sum(c * c for c in self.max_grad_norms))

    def __call__(self, norms: torch.Tensor) -> torch.Tensor:
        if norms.shape[-1] != self.groups:
            raise ValueError(f"norms have {norms.shape[-1]} groups but {self.groups} bounds were given")
        bounds = torch.tensor(self.max_grad_norms, dtype=norms.dtype, device=norms.device)
        return clip_factor(norms, bounds)


@dataclass(frozen=True)
class AutomaticClipping:
    """AUTO-S (Bu et al. 2023): scale ``1 / (norm + gamma)``; every scaled gradient has norm < 1. ``S = 1``."""

    gamma: float = 0.01

    def __post_init__(self) -> None:
        object.__setattr__(self, "gamma", _check_norm("gamma", self.gamma))

    @property
    def groups(self) -> int:
        return 1

    @property
    def sensitivity(self) -> float:
        return 1.0

    def __call__(self, norms: torch.Tensor) -> torch.Tensor:
        return 1.0 / (norms + self.gamma)
