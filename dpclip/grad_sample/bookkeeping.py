"""Book-keeping (Bu et al. 2023): per-sample norms, then the clipped sum, from one backward.

After the user's ordinary ``loss.backward()`` the :class:`~dpclip.grad_sample.hooks.GradSampler`
holds every unit's activations and output gradients. :func:`clip_and_sum` then

1. takes the per-sample squared norms of each parameter (ghost norms where cheaper),
2. sums them per group and takes the square root: norms ``[B, G]``,
3. asks the clipper for scales ``[B, G]``,
4. forms ``sum_i s_i g_i`` per parameter with its group's scale, as one contraction of the
   scaled output gradients with the activations per layer (no ``[B, *shape]`` tensor for
   layers with a rule).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn

from .._pool import serial
from ..clipping import FlatClipping
from .hooks import GradSampler

try:  # the flat-clipping scales in one call (dpclip/_csrc/gram.c); absent without a C compiler
    from .. import _gram
except ImportError:  # pragma: no cover - depends on the build
    _gram = None

__all__ = ["Clipper", "clip_and_sum"]

Clipper = Callable[[torch.Tensor], torch.Tensor]  # norms [B, G] -> scales [B, G]


def clip_and_sum(
    sampler: GradSampler,
    clipper: Clipper,
    groups: Sequence[Sequence[nn.Parameter]] | None = None,
    *,
    scale: float = 1.0,
) -> tuple[dict[nn.Parameter, torch.Tensor], torch.Tensor]:
    """Per-group per-sample norms, scales from ``clipper``, and the clipped sums.

    ``groups``: ``None`` for one group holding every parameter of the sampler (flat clipping),
    else one group per entry (per-layer clipping). Every parameter of the sampler must be in
    exactly one group (an unclipped parameter would break the sensitivity bound).

    ``scale``: a constant factor on every sum, applied to the ``[B]`` scales (so it costs
    nothing per summed entry; e.g. ``1 / expected batch size`` for DP-SGD's average).

    Returns ``(sums, norms)``: ``sums[p] = scale * sum_i scales[i, group(p)] * g_i(p)`` with ``p``'s
    shape, and ``norms [B, G]`` (``norms[i, k]`` = L2 norm of sample ``i``'s gradient over the
    parameters of group ``k``).
    """
    params = sampler.parameters
    if groups is None:
        groups = [params]
    groups = [list(g) for g in groups]
    group_of: dict[int, int] = {}
    for k, group in enumerate(groups):
        for p in group:
            if id(p) in group_of:
                raise ValueError(
                    f"clip_and_sum: a parameter of shape {tuple(p.shape)} is in groups "
                    f"{group_of[id(p)]} and {k}; each parameter must be in exactly one group"
                )
            group_of[id(p)] = k
    known = {id(p) for p in params}
    foreign = [tuple(p.shape) for g in groups for p in g if id(p) not in known]
    if foreign:
        raise ValueError(
            f"clip_and_sum: {len(foreign)} grouped parameter(s) have no per-sample gradient "
            f"(not covered by the sampler; shapes {foreign})"
        )
    missing = [tuple(p.shape) for p in params if id(p) not in group_of]
    if missing:
        raise ValueError(
            f"clip_and_sum: {len(missing)} parameter(s) of the sampler are in no group "
            f"(shapes {missing}); every trainable parameter must be clipped"
        )

    flat = _flat_kernel_bound(clipper, groups)

    def scales_for(sq: dict, batch: int, factor: float):
        if flat is not None:
            fast = _flat_scales(sq, groups[0], params, batch, factor, flat, scale * factor)
            if fast is not None:
                return fast
        ref = next(iter(sq.values()), None)
        dtype = ref.dtype if ref is not None else torch.get_default_dtype()
        device = ref.device if ref is not None else torch.device("cpu")
        for t in sq.values():
            dtype = torch.promote_types(dtype, t.dtype)
        with serial(batch * max(1, len(groups)), device):  # tiny: waking the workers costs more (E19)
            columns = []
            for group in groups:
                parts = [
                    sq[p] if sq[p].dtype == dtype and sq[p].device == device else sq[p].to(device=device, dtype=dtype)
                    for p in group
                    if p in sq
                ]
                if not parts:
                    columns.append(torch.zeros(batch, dtype=dtype, device=device))
                else:
                    columns.append(parts[0] if len(parts) == 1 else torch.stack(parts).sum(0))
            if not columns:
                norms = torch.zeros(batch, 0, dtype=dtype, device=device)
            else:
                # the factor on the norms, not on every parameter's squared norms
                norms = torch.stack(columns, dim=1).clamp_min_(0).sqrt_()
                if factor != 1.0:
                    norms.mul_(factor)
            scales = clipper(norms)
            if tuple(scales.shape) != tuple(norms.shape):
                raise ValueError(
                    f"clip_and_sum: the clipper returned scales of shape {tuple(scales.shape)} for "
                    f"norms of shape {tuple(norms.shape)}"
                )
            # the loss factor and the constant scale ride on the [B, G] scales, once
            total = scale * factor
            factors = scales * total if total != 1.0 else scales
            by_group = [factors[:, k] for k in range(len(groups))]
        return {p: by_group[group_of[id(p)]] for p in params}, norms

    return sampler.bookkeep(scales_for)


def _flat_kernel_bound(clipper: Clipper, groups: list) -> float | None:
    """The bound ``C`` when :func:`_flat_scales` may replace the generic scales: one group,
    :class:`~dpclip.clipping.FlatClipping` itself with a finite bound, and the kernel built."""
    if _gram is None or len(groups) != 1 or type(clipper) is not FlatClipping:
        return None
    bound = float(clipper.max_grad_norm)
    return bound if math.isfinite(bound) else None


def _flat_scales(sq: dict, group: list, params: list, batch: int, factor: float, bound: float, total: float):
    """Flat clipping's norms ``[B, 1]`` and per-parameter scales in one C call
    (``_gram.flat_scales``, docs/design.md E26): what the generic path computes (the squared
    norms summed in the group's order, ``sqrt(max(., 0)) * factor``, then ``C / max(n, C) *
    total``), to one unit in the last place (torch's vectorised sqrt is not correctly rounded,
    the C library's is); None where it does not apply (no squared norms, mixed dtypes
    or devices, non-CPU, strided or half precision), and the generic path runs."""
    parts = [sq[p] for p in group if p in sq]
    if not parts:
        return None
    dtype = parts[0].dtype
    if dtype not in (torch.float32, torch.float64):
        return None
    for t in parts:
        if t.dtype != dtype or t.device.type != "cpu" or t.dim() != 1 or t.shape[0] != batch or not t.is_contiguous():
            return None
    norms = torch.empty(batch, 1, dtype=dtype)
    scales = torch.empty(batch, 1, dtype=dtype)
    if batch:
        _gram.flat_scales([t.data_ptr() for t in parts], batch, dtype == torch.float64, float(factor), bound,
                          float(total), norms.data_ptr(), scales.data_ptr())
    column = scales[:, 0]
    return {p: column for p in params}, norms
