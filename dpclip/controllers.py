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

__all__ = [
    "ClipStatistics",
    "Fixed",
    "Quantile",
    "PrivateAutoClip",
    "PrivateZClip",
    "MultiObjective",
    "DEFAULT_EDGES",
    "gradient_noise_multiplier",
    "release_statistics",
    "histogram_estimate",
]

# relative histogram bin edges: 0, then half-octaves from 1/16 to 16, times each group's threshold
# (18 bins, the last open)
DEFAULT_EDGES = (0.0,) + tuple(2.0 ** (k / 2) for k in range(-8, 9))


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
    noise_multiplier: float = 0.0
    dimension: int = 0
    noise_std: float = 0.0
    count_noise_std: float = 0.0

    def __post_init__(self) -> None:
        # only plain numbers get through: a controller can never be handed per-sample tensors
        object.__setattr__(self, "unclipped_fraction", _floats("unclipped_fraction", self.unclipped_fraction))
        object.__setattr__(self, "clip", _floats("clip", self.clip))
        if self.histogram is not None:
            rows = tuple(_floats("histogram row", row) for row in self.histogram)
            object.__setattr__(self, "histogram", rows)
        if self.edges is not None:
            object.__setattr__(self, "edges", _floats("edges", self.edges))
        for name in ("expected_units", "noise_multiplier", "noise_std", "count_noise_std"):
            value = getattr(self, name)
            if isinstance(value, torch.Tensor):
                raise TypeError(f"ClipStatistics.{name} must be a float, not a tensor")
            object.__setattr__(self, name, float(value))
        object.__setattr__(self, "dimension", int(self.dimension))


def _floats(name: str, values: Any) -> tuple[float, ...]:
    if isinstance(values, torch.Tensor) or not isinstance(values, (tuple, list)):
        raise TypeError(f"ClipStatistics.{name} must be a tuple of floats; got {type(values).__name__}")
    if any(isinstance(v, torch.Tensor) for v in values):
        raise TypeError(f"ClipStatistics.{name} must hold floats, not tensors")
    return tuple(float(v) for v in values)


def histogram_estimate(
    stats: ClipStatistics, group: int, threshold: float = 3.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, weights)``: a group's noisy norm histogram as point masses, in absolute norms.

    Each bin is represented by one norm: the midpoint of the first bin ``[0, e_1 C)``, the
    geometric midpoint ``sqrt(e_k e_{k+1}) C`` of an inner bin, and the lower edge ``e_K C`` of
    the open last bin. Weights are the noisy fractions (count / expected units); a bin whose
    noisy count is below ``threshold`` times the counts' noise std is taken as empty (else the
    noise of empty bins far from ``C`` would pose as units with huge or tiny norms; at 3 stds
    a spurious bin survives in about 2% of releases of 18 bins, against 34% at 2 stds). All of this
    is post-processing of the privatised histogram, so any function of it is private.
    """
    if stats.histogram is None or stats.edges is None:
        raise ValueError("this controller needs a histogram; declare histogram_edges(clip)")
    c = stats.clip[group]
    e = stats.edges
    reps = [e[1] / 2.0] + [math.sqrt(a * b) for a, b in zip(e[1:-1], e[2:])] + [e[-1]]
    values = torch.tensor(reps, dtype=torch.float64) * c
    weights = torch.tensor(stats.histogram[group], dtype=torch.float64)
    floor = threshold * stats.count_noise_std / max(stats.expected_units, 1e-12)
    weights = torch.where(weights > floor, weights, torch.zeros_like(weights))
    return values, weights


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
    dimension: int = 0,
    noise_std: float = 0.0,
) -> ClipStatistics | None:
    """The privatised statistics ``controller`` asked for, from the units' norms ``[U, G]``.

    ``add_noise(sigma_c, {key: tensor}, sensitivity)`` adds ``N(0, (sigma_c * sensitivity)^2)``
    to every coordinate (the engine passes its Gaussian or secure noise with its generator).
    Counts (the default statistic) have L2 sensitivity ``sqrt(G)``; a histogram
    (``controller.histogram_edges``) has ``histogram_sensitivity * sqrt(G)``, where
    ``histogram_sensitivity`` is 1 when a unit is one example (add/remove moves one bin by 1)
    and ``sqrt(2)`` when a unit is a micro-batch (its norm can move from one bin to another).
    With ``noise_multiplier == 0`` (no privacy at all) the statistics are exact. Returns
    ``None`` when the controller reads nothing. ``noise_multiplier`` is the step's (what the
    accountant records); the statistics carry the gradient's share of it and ``dimension``
    (the number of trainable coordinates), both public.
    """
    clip = tuple(float(c) for c in clip)
    sigma_c = controller.statistics_noise_multiplier(expected_units)
    public = {
        "noise_multiplier": gradient_noise_multiplier(noise_multiplier, sigma_c),
        "dimension": int(dimension),
        "noise_std": float(noise_std),
    }
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
            tuple(float(c) / expected_units for c in noisy),
            float(expected_units),
            clip=clip,
            count_noise_std=sigma_c * math.sqrt(groups),
            **public,
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
    std = sigma_c * histogram_sensitivity * math.sqrt(groups)
    return ClipStatistics(
        (), float(expected_units), histogram=histogram, edges=edges, clip=clip, count_noise_std=std, **public
    )


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
        keep_total: ``None``, or a total ``T``: after each update the thresholds are rescaled so
            that ``sqrt(sum_g C_g^2) == T``. With per-layer groups the plain rule lets every
            layer's threshold, and with them the noise, drift on its own (by 5-80x in
            docs/results/batch_clipping.md); with ``keep_total`` the noise stays fixed and only
            its split across layers adapts, each layer settling at a common quantile of its own
            norms. This is the private analogue of the adaptive layer-wise clipping of Nguyen
            et al. (2023), whose per-layer constants are scaled by ``C`` from a public data set.
            Post-processing of the same noisy counts: no extra privacy cost.
    """

    target_unclipped_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise_multiplier: float | None = None
    min_clip: float = 1e-6
    max_clip: float = 1e6
    keep_total: float | None = None

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
        if self.keep_total is not None:
            object.__setattr__(self, "keep_total", _positive("keep_total", self.keep_total))

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
        if self.keep_total is not None:
            total = math.sqrt(sum(c * c for c in out))
            out = [c * self.keep_total / total for c in out]
        return tuple(out)


def _check_edges(edges: Sequence[float]) -> tuple[float, ...]:
    edges = tuple(float(e) for e in edges)
    if len(edges) < 3 or edges[0] != 0.0 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"edges must start at 0.0 and increase, with at least 3 entries; got {edges}")
    return edges


def _sigma_c(value: float | None, expected_units: float) -> float:
    return value if value is not None else max(float(expected_units), 1.0) / 20.0


@dataclass
class PrivateAutoClip:
    """AutoClip (Seetharaman et al. 2020) from privatised statistics: clip at a percentile of past norms.

    AutoClip clips at the ``percentile``-th percentile of every gradient norm seen so far. Here
    the norms are never seen: each step releases a noisy histogram of the units' norms (bins
    relative to the current threshold, ``edges``), which is added, as point masses, to a running
    histogram on a fixed grid of quarter-octaves (``history_decay < 1`` forgets old steps
    geometrically). The next threshold is the running histogram's weighted percentile. Mutable
    state: the running histogram (``state_dict`` / ``load_state_dict``).

    Args:
        percentile: in (0, 100); AutoClip recommends 10 (most units are clipped).
        count_noise_multiplier: noise multiplier of the histogram release; ``None``: ``expected_units / 20``.
        edges: relative bin edges (:data:`DEFAULT_EDGES`).
        history_decay: weight kept by past steps at each step, in (0, 1].
    """

    percentile: float = 10.0
    count_noise_multiplier: float | None = None
    edges: tuple[float, ...] = DEFAULT_EDGES
    history_decay: float = 1.0
    _history: dict[tuple[int, int], float] | None = None

    def __post_init__(self) -> None:
        if not 0.0 < float(self.percentile) < 100.0:
            raise ValueError(f"percentile must be in (0, 100) (AutoClip uses 10); got {self.percentile!r}")
        self.percentile = float(self.percentile)
        if self.count_noise_multiplier is not None:
            self.count_noise_multiplier = _positive("count_noise_multiplier", self.count_noise_multiplier)
        self.edges = _check_edges(self.edges)
        if not 0.0 < float(self.history_decay) <= 1.0:
            raise ValueError(f"history_decay must be in (0, 1]; got {self.history_decay!r}")
        self._history = {} if self._history is None else dict(self._history)

    def statistics_noise_multiplier(self, expected_units: float) -> float:
        return _sigma_c(self.count_noise_multiplier, expected_units)

    def histogram_edges(self, clip: Sequence[float]) -> tuple[float, ...]:
        return self.edges

    def update(self, clip: Sequence[float], stats: ClipStatistics | None) -> tuple[float, ...]:
        if stats is None:
            return tuple(float(c) for c in clip)
        assert self._history is not None
        if self.history_decay < 1.0:
            self._history = {k: w * self.history_decay for k, w in self._history.items()}
        out = []
        for g, c in enumerate(clip):
            values, weights = histogram_estimate(stats, g)
            for v, w in zip(values.tolist(), weights.tolist()):
                if w > 0:
                    key = (g, round(4.0 * math.log2(v)))
                    self._history[key] = self._history.get(key, 0.0) + w
            grid = sorted((k[1], w) for k, w in self._history.items() if k[0] == g)
            total = sum(w for _, w in grid)
            if total <= 0:
                out.append(float(c))
                continue
            target, acc = self.percentile / 100.0 * total, 0.0
            for level, w in grid:
                acc += w
                if acc >= target:
                    out.append(2.0 ** (level / 4.0))
                    break
        return tuple(out)

    def state_dict(self) -> dict[str, Any]:
        return {"history": [[g, k, w] for (g, k), w in sorted((self._history or {}).items())]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._history = {(int(g), int(k)): float(w) for g, k, w in state["history"]}


@dataclass
class PrivateZClip:
    """ZClip (Kumar et al. 2025) from privatised statistics: clip at ``mean + z * std`` of the norms.

    ZClip keeps exponential moving averages (factor ``alpha``) of the mean and variance of the
    gradient norm and clips at ``mean + z * std``. Here each step's mean and variance are
    estimated from the noisy histogram of the units' norms (:func:`histogram_estimate`), so
    only privatised statistics enter the averages. Mutable state: the two averages.

    Args:
        z: the z-score threshold (ZClip uses 2.5).
        alpha: EMA factor in (0, 1) (ZClip uses 0.97).
        count_noise_multiplier, edges: as :class:`PrivateAutoClip`.
    """

    z: float = 2.5
    alpha: float = 0.97
    count_noise_multiplier: float | None = None
    edges: tuple[float, ...] = DEFAULT_EDGES
    _mean: list[float] | None = None
    _var: list[float] | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(float(self.z)) and float(self.z) >= 0):
            raise ValueError(f"z must be a finite number >= 0 (ZClip uses 2.5); got {self.z!r}")
        self.z = float(self.z)
        if not 0.0 < float(self.alpha) < 1.0:
            raise ValueError(f"alpha must be in (0, 1) (ZClip uses 0.97); got {self.alpha!r}")
        if self.count_noise_multiplier is not None:
            self.count_noise_multiplier = _positive("count_noise_multiplier", self.count_noise_multiplier)
        self.edges = _check_edges(self.edges)

    def statistics_noise_multiplier(self, expected_units: float) -> float:
        return _sigma_c(self.count_noise_multiplier, expected_units)

    def histogram_edges(self, clip: Sequence[float]) -> tuple[float, ...]:
        return self.edges

    def update(self, clip: Sequence[float], stats: ClipStatistics | None) -> tuple[float, ...]:
        if stats is None:
            return tuple(float(c) for c in clip)
        if self._mean is None or self._var is None or len(self._mean) != len(clip):
            self._mean, self._var = [math.nan] * len(clip), [math.nan] * len(clip)
        out = []
        for g, c in enumerate(clip):
            values, weights = histogram_estimate(stats, g)
            total = float(weights.sum())
            if total <= 0:
                out.append(float(c))
                continue
            mean = float((weights * values).sum()) / total
            var = float((weights * (values - mean) ** 2).sum()) / total
            if math.isnan(self._mean[g]):
                self._mean[g], self._var[g] = mean, var
            else:
                self._mean[g] = self.alpha * self._mean[g] + (1 - self.alpha) * mean
                self._var[g] = self.alpha * self._var[g] + (1 - self.alpha) * var
            out.append(max(1e-12, self._mean[g] + self.z * math.sqrt(max(self._var[g], 0.0))))
        return tuple(out)

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self._mean, "var": self._var}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._mean, self._var = state["mean"], state["var"]


@dataclass(frozen=True)
class MultiObjective:
    """Choose the next threshold by minimising a weighted sum of utility loss and privacy cost.

    Per group ``g`` and candidate threshold ``C`` (the current one times ``2^(k/8)``,
    ``|k| <= 16``), from the privatised norm histogram (``n_i`` the units' norms, ``B`` the
    expected number of units, ``d`` the trainable coordinates, ``sigma`` the gradient's noise
    multiplier)::

        signal(C)  = sum_bins w_k min(n_k, C)               mean norm kept per unit
        bias(C)    = sum_bins w_k (n_k - C)_+               mean norm lost to clipping per unit
        utility(C) = (bias(C)^2 + sigma^2 C^2 d / B^2) / signal(C)^2
        privacy(C) = C^2 / s^2                              only in regime="noise_std"
        J(C)       = utility_weight * utility(C) + privacy_weight * privacy(C)

    ``utility`` is the squared error of the update (clipping bias plus noise) relative to the
    signal it keeps: the learning rate rescales the update, so only this ratio matters. An
    absolute error would always prefer ``C -> 0`` when the noise term dominates (it did, in the
    federated runs of docs/results/federated.md), which stops learning.
    ``regime="noise_multiplier"``: the noise grows with ``C`` (std ``sigma C``), epsilon does
    not depend on ``C``, and ``J`` trades clipping bias against noise. ``regime="noise_std"``:
    the engine keeps the noise std fixed at its initial value ``s = sigma_0 S_0`` and records
    the noise multiplier ``s / S_t`` each step, so a larger ``C`` spends more privacy (a
    Gaussian step's GDP parameter is ``mu = S / s``, and ``mu^2 = sum_g C_g^2 / s^2`` adds over
    groups and composes additively over steps; ``privacy`` is group ``g``'s share), and the
    noise term of ``utility`` is constant. The
    threshold moves geometrically toward the minimiser: ``C <- C (C*/C)^learning_rate`` (the
    damped step on C of Ranaweera et al. 2025); in ``noise_std`` it is rounded to eighth-octaves
    so the accountant's history keeps few distinct noise multipliers. The derivation is in
    ``docs/controllers.md``.
    """

    utility_weight: float = 1.0
    privacy_weight: float = 0.0
    regime: str = "noise_multiplier"
    learning_rate: float = 0.5
    count_noise_multiplier: float | None = None
    edges: tuple[float, ...] = DEFAULT_EDGES

    def __post_init__(self) -> None:
        if self.regime not in ("noise_multiplier", "noise_std"):
            raise ValueError(f"regime must be 'noise_multiplier' or 'noise_std'; got {self.regime!r}")
        if not (float(self.utility_weight) >= 0 and float(self.privacy_weight) >= 0) or (
            float(self.utility_weight) + float(self.privacy_weight) == 0
        ):
            raise ValueError(
                f"utility_weight and privacy_weight must be >= 0 and not both 0; got "
                f"{self.utility_weight!r}, {self.privacy_weight!r}"
            )
        if not 0.0 < float(self.learning_rate) <= 1.0:
            raise ValueError(f"learning_rate must be in (0, 1]; got {self.learning_rate!r}")
        if self.count_noise_multiplier is not None:
            object.__setattr__(self, "count_noise_multiplier", _positive("count_noise_multiplier", self.count_noise_multiplier))
        object.__setattr__(self, "edges", _check_edges(self.edges))

    @property
    def keeps_noise_std(self) -> bool:
        """True in ``regime="noise_std"``: the engine fixes the noise std, not the multiplier."""
        return self.regime == "noise_std"

    def statistics_noise_multiplier(self, expected_units: float) -> float:
        return _sigma_c(self.count_noise_multiplier, expected_units)

    def histogram_edges(self, clip: Sequence[float]) -> tuple[float, ...]:
        return self.edges

    def objective(self, stats: ClipStatistics, group: int, candidates: torch.Tensor) -> torch.Tensor:
        """``J`` at each candidate threshold (shape of ``candidates``)."""
        values, weights = histogram_estimate(stats, group)
        bias = (weights[None, :] * (values[None, :] - candidates[:, None]).clamp_min(0)).sum(1)
        signal = (weights[None, :] * torch.minimum(values[None, :], candidates[:, None])).sum(1)
        b = max(stats.expected_units, 1.0)
        if self.regime == "noise_multiplier":
            noise = stats.noise_multiplier**2 * candidates**2 * stats.dimension / b**2
            privacy = torch.zeros_like(candidates)
        else:
            noise = torch.zeros_like(candidates)
            if not stats.noise_std > 0:
                raise ValueError("regime='noise_std' needs the step's fixed noise std in the statistics (> 0)")
            privacy = (candidates / stats.noise_std) ** 2
        utility = (bias**2 + noise) / signal.clamp_min(1e-300) ** 2
        return self.utility_weight * utility + self.privacy_weight * privacy

    def update(self, clip: Sequence[float], stats: ClipStatistics | None) -> tuple[float, ...]:
        if stats is None:
            return tuple(float(c) for c in clip)
        out = []
        for g, c in enumerate(clip):
            candidates = float(c) * 2.0 ** (torch.arange(-16, 17, dtype=torch.float64) / 8.0)
            values = self.objective(stats, g, candidates)
            if not bool(torch.isfinite(values).any()):  # an empty histogram: nothing to go on
                out.append(float(c))
                continue
            best = float(candidates[int(torch.argmin(values))])
            new = float(c) * (best / float(c)) ** self.learning_rate
            if self.regime == "noise_std":
                new = 2.0 ** (round(8.0 * math.log2(new)) / 8.0)
            out.append(new)
        return tuple(out)
