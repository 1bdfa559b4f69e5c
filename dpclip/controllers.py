"""Clip-norm controllers: the next clipping thresholds from privatised statistics only.

Interface (DESIGN.md §7). A controller is a small frozen object with

* ``statistics_noise_multiplier(expected_units) -> float | None``: the noise multiplier
  ``sigma_c`` it needs on the per-group counts of *unclipped units* (a unit is a sample, or a
  micro-batch in batch clipping), or ``None`` when it reads no statistic at all (``Fixed``);
* ``update(clip, stats) -> new_clip``: a pure function of the current thresholds ``clip`` (a
  tuple, one per clipping group) and the privatised :class:`ClipStatistics`.

The engine, not the controller, touches private data. Per step it counts, per group ``g``,
the units whose norm was at most ``C_g`` and releases these counts with noise std
``sigma_c * sqrt(G)`` on each: adding or removing one sample moves each of the ``G`` counts by
at most 1 (in batch clipping too: it changes one micro-batch, whose indicator can flip), so
the count vector's L2 sensitivity is ``sqrt(G)``. The count release and the gradient release
(sensitivity ``S``, noise std ``sigma_grad * S``) together are one Gaussian mechanism whose
whitened sensitivity is ``sqrt(sigma_grad^-2 + sigma_c^-2)``, so the engine lowers the
gradient's noise multiplier to

    sigma_grad = (sigma^-2 - sigma_c^-2)^(-1/2)

and the accountant records the step's ``sigma`` (Andrew, Thakkar, McMahan, Ramaswamy 2021,
"Differentially Private Learning with Adaptive Clipping", §3.2, there with ``G = 1``). See
:func:`gradient_noise_multiplier`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ClipStatistics", "Fixed", "Quantile", "gradient_noise_multiplier", "release_statistics"]


@dataclass(frozen=True)
class ClipStatistics:
    """What a controller may read after one step: privatised, so reading it is post-processing.

    Attributes:
        unclipped_fraction: per clipping group, the noisy count of units whose norm was at
            most the group's threshold, divided by the expected number of units (may fall
            outside [0, 1] because of the noise). Empty when the controller asked for a
            histogram instead.
        expected_units: the expected number of units per step (``sample_rate * N``, or the
            expected number of micro-batches in batch clipping).
        histogram: per group, the noisy counts of unit norms in the bins
            ``[edges[k] * C_g, edges[k+1] * C_g)`` divided by ``expected_units`` (the first bin
            starts at 0, the last one is open), when the controller declares
            ``histogram_edges``; else ``None``.
        edges: the relative bin edges used (``edges[0] = 0``), or ``None``.
        clip: the thresholds the statistics were measured at.
    """

    unclipped_fraction: tuple[float, ...]
    expected_units: float
    histogram: tuple[tuple[float, ...], ...] | None = None
    edges: tuple[float, ...] | None = None
    clip: tuple[float, ...] = ()


def gradient_noise_multiplier(noise_multiplier: float, statistics_noise_multiplier: float | None) -> float:
    """``(sigma^-2 - sigma_c^-2)^(-1/2)``: the gradient's share when a count release shares the step.

    ``noise_multiplier`` (``sigma``) is what the accountant records for the whole step.
    Returns it unchanged when no statistic is released (``None``) or without noise, and
    raises when the count noise would use up the whole budget.
    """
    if statistics_noise_multiplier is None or noise_multiplier == 0.0:
        return noise_multiplier
    rest = noise_multiplier**-2 - statistics_noise_multiplier**-2
    if not rest > 0:
        raise ValueError(
            f"the clip controller's statistics noise multiplier {statistics_noise_multiplier:g} must exceed "
            f"noise_multiplier={noise_multiplier:g}, or the clip-norm statistics use the whole privacy budget; "
            "give the controller a larger count_noise_multiplier (e.g. expected batch size / 20), or use larger batches"
        )
    return rest**-0.5


def release_statistics(
    controller: Any,
    norms: torch.Tensor,
    clip: Sequence[float],
    expected_units: float,
    noise_multiplier: float,
    add_noise: Callable[[float, Mapping[str, torch.Tensor], float], Mapping[str, torch.Tensor]],
    histogram_sensitivity: float = 1.0,
) -> ClipStatistics | None:
    """The privatised statistics ``controller`` asked for, from the units' norms ``[U, G]``.

    ``add_noise(sigma_c, {key: tensor}, sensitivity)`` adds ``N(0, (sigma_c * sensitivity)^2)``
    to every coordinate (the engine passes its Gaussian or secure noise with its generator).
    Counts (the default statistic) have L2 sensitivity ``sqrt(G)``; a histogram
    (``controller.histogram_edges``) has ``histogram_sensitivity * sqrt(G)``, where
    ``histogram_sensitivity`` is 1 when a unit is one example (add/remove moves one bin by 1)
    and ``sqrt(2)`` when a unit is a micro-batch (its norm can move from one bin to another).
    With ``noise_multiplier == 0`` (no privacy at all) the statistics are exact. Returns
    ``None`` when the controller reads nothing.
    """
    clip = tuple(float(c) for c in clip)
    sigma_c = controller.statistics_noise_multiplier(expected_units)
    if sigma_c is None:
        return None
    if noise_multiplier == 0.0:
        sigma_c = 0.0
    groups = len(clip)
    norms = norms.detach().to(dtype=torch.float64, device="cpu").reshape(-1, groups)
    bounds = torch.tensor(clip, dtype=torch.float64)
    edges_of = getattr(controller, "histogram_edges", None)
    edges = tuple(float(e) for e in edges_of(clip)) if callable(edges_of) else None
    if edges is None:
        raw = (norms <= bounds).sum(0).to(torch.float64)
        noisy = add_noise(sigma_c, {"counts": raw}, math.sqrt(groups))["counts"]
        return ClipStatistics(
            tuple(float(c) / expected_units for c in noisy), float(expected_units), clip=clip
        )
    if not edges or edges[0] != 0.0 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"histogram_edges must start at 0 and increase; got {edges}")
    inner = torch.tensor(edges[1:], dtype=torch.float64)
    rows = []
    for g in range(groups):
        index = torch.bucketize(norms[:, g] / bounds[g], inner, right=True)  # bin k: [e_k, e_{k+1})
        rows.append(torch.bincount(index, minlength=len(edges)).to(torch.float64))
    raw = torch.stack(rows)  # [G, K]
    noisy = add_noise(sigma_c, {"histogram": raw}, histogram_sensitivity * math.sqrt(groups))["histogram"]
    histogram = tuple(tuple(float(c) / expected_units for c in row) for row in noisy)
    return ClipStatistics((), float(expected_units), histogram=histogram, edges=edges, clip=clip)


def _positive(name: str, value: object) -> float:
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number; got {value!r}") from None
    if not (x > 0 and math.isfinite(x)):
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")
    return x


@dataclass(frozen=True)
class Fixed:
    """Keeps the thresholds; reads no statistic and spends nothing."""

    def statistics_noise_multiplier(self, expected_units: float) -> float | None:
        return None

    def update(self, clip: Sequence[float], stats: ClipStatistics | None) -> tuple[float, ...]:
        return tuple(float(c) for c in clip)


@dataclass(frozen=True)
class Quantile:
    """Andrew et al. 2021: move each threshold geometrically toward a target quantile of the norms.

    ``C_g <- C_g * exp(-learning_rate * (unclipped_fraction_g - target_unclipped_quantile))``:
    a threshold grows while fewer than the target fraction of units is unclipped, and
    shrinks otherwise. One threshold per clipping group: with per-layer groups this is the
    private adaptive layer-wise rule.

    Args:
        target_unclipped_quantile: the fraction of units to leave unclipped, in (0, 1).
        learning_rate: the geometric step size (Andrew et al. use 0.2).
        count_noise_multiplier: ``sigma_c``, the counts' noise std over their sensitivity;
            ``None`` gives Andrew et al.'s recommendation ``expected_units / 20``. The
            gradient keeps the fraction ``1 - sigma^2 / sigma_c^2`` of the budget's precision
            (``1 / sigma^2``).
        min_clip, max_clip: the thresholds are kept in this range.
    """

    target_unclipped_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise_multiplier: float | None = None
    min_clip: float = 1e-6
    max_clip: float = 1e6

    def __post_init__(self) -> None:
        q = float(self.target_unclipped_quantile)
        if not 0.0 < q < 1.0:
            raise ValueError(
                f"target_unclipped_quantile must be in (0, 1) (e.g. 0.5); got {self.target_unclipped_quantile!r}"
            )
        object.__setattr__(self, "target_unclipped_quantile", q)
        object.__setattr__(self, "learning_rate", _positive("learning_rate", self.learning_rate))
        if self.count_noise_multiplier is not None:
            object.__setattr__(
                self, "count_noise_multiplier", _positive("count_noise_multiplier", self.count_noise_multiplier)
            )
        lo, hi = _positive("min_clip", self.min_clip), _positive("max_clip", self.max_clip)
        if lo >= hi:
            raise ValueError(f"min_clip ({lo}) must be below max_clip ({hi})")
        object.__setattr__(self, "min_clip", lo)
        object.__setattr__(self, "max_clip", hi)

    def statistics_noise_multiplier(self, expected_units: float) -> float:
        if self.count_noise_multiplier is not None:
            return self.count_noise_multiplier
        return max(float(expected_units), 1.0) / 20.0

    def update(self, clip: Sequence[float], stats: ClipStatistics | None) -> tuple[float, ...]:
        if stats is None:
            return tuple(float(c) for c in clip)
        if len(stats.unclipped_fraction) != len(clip):
            raise ValueError(f"Quantile.update: {len(stats.unclipped_fraction)} statistics for {len(clip)} thresholds")
        out = []
        for c, frac in zip(clip, stats.unclipped_fraction):
            step = math.exp(-self.learning_rate * (frac - self.target_unclipped_quantile))
            out.append(min(self.max_clip, max(self.min_clip, float(c) * step)))
        return tuple(out)
