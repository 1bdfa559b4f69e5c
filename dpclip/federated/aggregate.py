"""The DP-FedAvg server step: clip each client's model delta, sum, add Gaussian noise once, divide.

One client is one privacy unit (user-level DP; McMahan, Ramage, Talwar, Zhang 2018). For the
clients ``u`` of a round, with model deltas ``delta_u`` (a mapping of tensors) split into
``G`` clipping groups (one group: flat clipping; one per layer: per-layer clipping) and
thresholds ``C_g``:

    norms[u, g]  = || delta_u restricted to group g ||_2
    scale[u, g]  = min(1, C_g / norms[u, g])          (dpclip.clipping; exactly 1 at norm 0)
    sum          = sum_u scale[u, g(tensor)] * delta_u
    noisy        = sum + N(0, (sigma_grad * S)^2 I),   S = sqrt(sum_g C_g^2)
    update       = noisy / (q * K)                     (the EXPECTED number of clients)

Adding or removing one client moves ``sum`` by at most ``S`` in L2, so the release is the
Gaussian mechanism with noise multiplier ``sigma_grad`` on a Poisson-subsampled unit. The
fixed denominator ``q K`` does not depend on who was sampled (McMahan et al.'s ``f_f``
estimator with unit weights), so it adds nothing to the sensitivity. The noise is added even
when no client was sampled.

A clip controller (:mod:`dpclip.controllers`) may read privatised statistics of the
clients' norms; they are released with :func:`dpclip.controllers.release_statistics` (the
same function the centralised engine uses), and the gradient's noise multiplier is lowered
to ``sigma_grad = (sigma^-2 - sigma_c^-2)^(-1/2)`` so that both releases together are one
Gaussian mechanism with ``sigma`` (Andrew et al. 2021). The accountant records ``sigma``.

Everything here is a pure function of its arguments and the explicit generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..clipping import FlatClipping, PerLayerClipping
from ..controllers import ClipStatistics, gradient_noise_multiplier, release_statistics
from ..noise import GaussianNoise

__all__ = [
    "RoundRelease",
    "clipper_for",
    "group_norms",
    "clipped_sum",
    "dp_aggregate",
    "check_controller",
    "noise_class",
]

Groups = tuple[tuple[str, ...], ...]


def noise_class(secure_mode: bool) -> Callable[[float], Any]:
    """``GaussianNoise``, or ``SecureGaussianNoise`` (same interface) when ``secure_mode``."""
    if not secure_mode:
        return GaussianNoise
    from .. import noise as noise_module

    secure = getattr(noise_module, "SecureGaussianNoise", None)
    if secure is None:  # pragma: no cover - the class ships with dpclip.noise
        raise ValueError("secure_mode needs dpclip.noise.SecureGaussianNoise, which this build lacks")
    return secure


def check_controller(controller: Any) -> Any:
    """``controller`` if it has the interface of :mod:`dpclip.controllers`, else a TypeError naming the fix."""
    if not (
        callable(getattr(controller, "update", None))
        and callable(getattr(controller, "statistics_noise_multiplier", None))
    ):
        raise TypeError(
            f"clip controller {controller!r} lacks the controller interface (update(clip, stats) and "
            "statistics_noise_multiplier(expected_units)); use dpclip.controllers.Fixed() or Quantile()"
        )
    return controller


def clipper_for(clip: Sequence[float]) -> FlatClipping | PerLayerClipping:
    """``FlatClipping`` for one threshold, ``PerLayerClipping`` for several."""
    clip = tuple(float(c) for c in clip)
    if len(clip) == 1:
        return FlatClipping(clip[0])
    return PerLayerClipping(clip)


def _check_groups(keys: Sequence[str], groups: Sequence[Sequence[str]] | None, n_clip: int) -> Groups:
    if groups is None:
        groups = (tuple(keys),)
    groups = tuple(tuple(g) for g in groups)
    flat = [k for g in groups for k in g]
    if sorted(flat) != sorted(keys) or len(set(flat)) != len(flat):
        missing = sorted(set(keys) - set(flat))
        extra = sorted(set(flat) - set(keys))
        raise ValueError(
            f"clipping groups must cover every delta tensor exactly once; missing {missing}, unknown {extra}"
            + (", duplicated" if len(set(flat)) != len(flat) else "")
        )
    if len(groups) != n_clip:
        raise ValueError(
            f"{n_clip} clipping thresholds for {len(groups)} groups; give one threshold per group "
            "(one for flat clipping)"
        )
    return groups


def group_norms(deltas: Mapping[str, torch.Tensor], groups: Groups) -> torch.Tensor:
    """``[U, G]`` float64 L2 norms of each unit's delta over each group (deltas are ``[U, ...]``)."""
    cols = []
    for group in groups:
        sq = None
        for key in group:
            t = deltas[key].detach().to(torch.float64)
            s = t.reshape(t.shape[0], t.shape[1:].numel()).pow(2).sum(1)
            sq = s if sq is None else sq + s
        cols.append(sq.sqrt())
    return torch.stack(cols, 1)


def clipped_sum(
    deltas: Mapping[str, torch.Tensor], groups: Groups, scales: torch.Tensor
) -> dict[str, torch.Tensor]:
    """``{key: sum_u scales[u, g(key)] * deltas[key][u]}`` in each delta's dtype."""
    out = {}
    for g, group in enumerate(groups):
        for key in group:
            t = deltas[key]
            s = scales[:, g].to(t.dtype)
            out[key] = torch.einsum("u,u...->...", s, t) if t.shape[0] else torch.zeros_like(t[0:1]).sum(0)
    return out


@dataclass(frozen=True)
class RoundRelease:
    """What one DP-FedAvg server step releases (all of it privatised, or public settings).

    Attributes:
        update: ``{key: noisy clipped sum / expected_clients}``, the mean model delta to apply.
        clip: the thresholds the round was clipped at.
        next_clip: the controller's thresholds for the next round.
        stats: the privatised clip statistics the controller read (``None`` for ``Fixed``).
        noise_multiplier: ``sigma``, what the accountant records for the round.
        gradient_noise_multiplier: ``sigma_grad``, the aggregate's share of the noise.
        sensitivity: ``S``, the L2 bound of one client's clipped delta.
        noise_std: ``sigma_grad * S``, the std of the noise on each coordinate of the sum.
        expected_clients: ``q * K``, the denominator.
    """

    update: dict[str, torch.Tensor]
    clip: tuple[float, ...]
    next_clip: tuple[float, ...]
    stats: ClipStatistics | None
    noise_multiplier: float
    gradient_noise_multiplier: float
    sensitivity: float
    noise_std: float
    expected_clients: float


def dp_aggregate(
    deltas: Mapping[str, torch.Tensor],
    clip: Sequence[float],
    *,
    noise_multiplier: float,
    expected_clients: float,
    generator: torch.Generator | None,
    controller: Any = None,
    groups: Sequence[Sequence[str]] | None = None,
    secure_mode: bool = False,
    fixed_noise_std: float | None = None,
) -> RoundRelease:
    """One DP-FedAvg server step on the round's stacked client deltas.

    Args:
        deltas: ``{key: tensor [U, ...]}``, row ``u`` the model delta of the round's ``u``-th
            client (``U`` may be 0: the noise is still added).
        clip: the thresholds, one per group (one: flat clipping).
        noise_multiplier: ``sigma`` of the round (for the aggregate and the clip statistics
            together); 0 releases the exact mean.
        expected_clients: ``q * K``, the expected number of clients per round (> 0).
        generator: the noise's ``torch.Generator`` (unused by secure noise, which draws from
            the operating system).
        controller: a clip controller (:mod:`dpclip.controllers`); ``None`` keeps ``clip``.
        groups: the clipping groups, tuples of keys covering ``deltas``; ``None`` is one group.
        secure_mode: use :class:`dpclip.noise.SecureGaussianNoise`.
        fixed_noise_std: for a controller in the noise-std regime (``keeps_noise_std``): the
            run's fixed noise std ``s``; the round's noise multiplier is then ``s / S`` (what
            the accountant must record, :attr:`RoundRelease.noise_multiplier`) and
            ``noise_multiplier`` is ignored.

    Raises:
        ValueError: invalid thresholds, groups that do not cover the deltas, a non-positive
            ``expected_clients``, an infinite threshold with noise, or a controller whose count
            noise would use the whole budget.
    """
    clip = tuple(float(c) for c in clip)
    keys = list(deltas)
    group_keys = _check_groups(keys, groups, len(clip))
    expected = float(expected_clients)
    if not (expected > 0 and math.isfinite(expected)):
        raise ValueError(
            f"expected_clients must be a finite number > 0 (sample rate * number of clients); got {expected_clients!r}"
        )
    clipper = clipper_for(clip)
    if fixed_noise_std is not None:
        sigma = float(fixed_noise_std) / clipper.sensitivity
    else:
        sigma = float(noise_multiplier)
    sigma_c = controller.statistics_noise_multiplier(expected) if controller is not None else None
    sigma_grad = gradient_noise_multiplier(sigma, sigma_c)
    noise_cls = noise_class(secure_mode)
    sensitivity = clipper.sensitivity

    norms = group_norms(deltas, group_keys)
    scales = clipper(norms)
    sums = clipped_sum(deltas, group_keys, scales)
    noise = noise_cls(sigma_grad)
    noisy = noise.add(sums, sensitivity, generator)
    update = {key: noisy[key].div_(expected) for key in keys}
    stats = None
    next_clip = clip
    if controller is not None:
        stats = release_statistics(
            controller, norms, clip, expected, sigma,
            lambda s, values, sens: noise_cls(s).add(values, sens, generator),
            dimension=sum(int(t.shape[1:].numel()) for t in deltas.values()),
            noise_std=float(fixed_noise_std or 0.0),
        )
        next_clip = tuple(float(c) for c in controller.update(clip, stats))
    return RoundRelease(
        update=update,
        clip=clip,
        next_clip=next_clip,
        stats=stats,
        noise_multiplier=sigma,
        gradient_noise_multiplier=float(sigma_grad),
        sensitivity=float(sensitivity),
        noise_std=float(noise.std(sensitivity)),
        expected_clients=expected,
    )
