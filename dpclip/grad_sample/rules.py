"""Per-layer per-sample gradient rules.

Each rule is a set of pure functions of ``(module, activations, backprops)`` for a batch of
``B`` samples, where ``activations`` is the layer's input as seen in forward and ``backprops``
is ``dL/d(output)`` with ``L`` the *sum* of the per-sample losses. The per-sample gradient of
sample ``i`` therefore depends only on ``activations[i]`` and ``backprops[i]``.

A :class:`LayerRule` gives three things for a layer:

``per_sample_grads(module, a, g)``
    ``{param name: [B, *param.shape]}``, the materialised per-sample gradients.
``sq_norms(module, a, g)``
    ``{param name: [B]}``, the per-sample squared L2 norm of each parameter's gradient. For
    Linear, Conv and Embedding weights this uses the ghost norm (Goodfellow 2015; Li et al.
    2022; Bu et al. 2023) when it is cheaper than materialising (:func:`use_ghost`).
``clipped_sum(module, a, g, scales)``
    ``{param name: sum_i scales[name][i] * g_i}`` with the parameter's shape, computed as one
    contraction of the scaled output gradients with the activations (book-keeping), without
    building the ``[B, *shape]`` tensor for Linear, Conv and Embedding.

Only trainable parameters (``requires_grad``) appear in the dicts. All functions are
device- and dtype-agnostic, accept ``B == 0`` and run under ``torch.no_grad``.

Linear algebra used (per sample, dropping the sample index): with activations
``a [T, d]`` and output gradients ``g [T, p]``, the weight gradient is ``g^T a`` and

    ||g^T a||_F^2 = sum_{t,s} (a_t . a_s)(g_t . g_s) = sum((a a^T) * (g g^T)),

which costs ``O(T^2 (d + p))`` instead of ``O(T d p)`` memory/time for the materialised form.
Conv layers reduce to Linear through unfolding (``T`` = output positions, ``d`` = in channels
per group times kernel size, ``p`` = out channels per group); Embedding is a Linear layer on
one-hot inputs, so ``a_t . a_s = [x_t == x_s]``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .._pool import in_shares, serial as _serial, serial_gemm as _serial_gemm

try:  # the per-sample conv2d kernel (dpclip/_csrc/conv_psg.c); absent without a C compiler
    from .. import _convpsg
except ImportError:  # pragma: no cover - depends on the build
    _convpsg = None
try:  # the norm-layer kernel (dpclip/_csrc/norm_psg.c); absent without a C compiler
    from .. import _normpsg
except ImportError:  # pragma: no cover - depends on the build
    _normpsg = None
try:  # the Gram-tile ghost-norm kernel (dpclip/_csrc/gram.c); absent without a C compiler
    from .. import _gram
except ImportError:  # pragma: no cover - depends on the build
    _gram = None

__all__ = ["LayerRule", "RULES", "rule_for", "use_ghost"]

Grads = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LayerRule:
    """The per-sample gradient rule of one layer type (see the module docstring)."""

    per_sample_grads: Callable[[nn.Module, torch.Tensor, torch.Tensor], Grads]
    sq_norms: Callable[[nn.Module, torch.Tensor, torch.Tensor], Grads]
    clipped_sum: Callable[[nn.Module, torch.Tensor, torch.Tensor, Grads], Grads]
    # Raises ValueError (with the fix) for a module configuration no engine can support.
    check: Callable[[nn.Module], None] | None = None
    # True when sq_norms and clipped_sum go through per_sample_grads anyway (small layers):
    # the engine then computes the per-sample grads once and reuses them for both.
    materialised: bool = False
    # plan(module, activations, backprops) -> True: materialise this call's per-sample
    # gradients once, as soon as its output gradient arrives, and take both the norm and the
    # clipped sum from them (cheap when they are no larger than the captured activations and
    # output gradients they replace, which the engine may then release). False: keep the
    # captures and use sq_norms (ghost norm) and clipped_sum (book-keeping contraction).
    # None: never (materialised rules are always materialised).
    plan: Callable[[nn.Module, torch.Tensor, torch.Tensor], bool] | None = None
    # True: sq_norms and clipped_sum take a keyword ``scratch``, a dict the engine keeps per
    # call and output gradient, so that the norm pass can leave what the clipped-sum pass
    # reuses (the conv ghost norm's patches).
    scratch: bool = False

    def materialise(self, module: nn.Module, activations: torch.Tensor, backprops: torch.Tensor) -> bool:
        """Whether the engine should materialise this call's per-sample gradients (see ``plan``)."""
        if self.materialised:
            return True
        return bool(self.plan(module, activations, backprops)) if self.plan is not None else False


def use_ghost(T: int, d: int, p: int) -> bool:
    """fastDP's rule: the ghost norm (``2 T^2`` work) beats materialising (``d p``)."""
    return 2 * T * T < d * p


_FASTDP_USE_GHOST = use_ghost


def _ghost_overridden() -> bool:
    """True when a caller swapped ``use_ghost`` (``ghost="always"``, tests forcing a branch)."""
    return use_ghost is not _FASTDP_USE_GHOST


# --------------------------------------------------------------------------- helpers


def _trainable(module: nn.Module, name: str) -> bool:
    p = getattr(module, name, None)
    return isinstance(p, torch.Tensor) and p.requires_grad


def _scale(scales: Grads, name: str, like: torch.Tensor) -> torch.Tensor:
    s = scales[name]
    return s.to(device=like.device, dtype=like.dtype)


def _sq(x: torch.Tensor) -> torch.Tensor:
    """Per-sample squared norm of ``x [B, ...]``."""
    # one pass, no [B, ...] temporary (x.pow(2) would allocate one)
    with _serial(x.numel(), x.device):
        return torch.linalg.vector_norm(x.flatten(1), dim=1).square() if x.dim() > 1 else x.square()


def _weighted_sum(s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``sum_i s_i x_i`` for ``x [B, ...]``."""
    with _serial(x.numel(), x.device):
        return torch.tensordot(s, x, dims=1)


def _ghost_sq(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``||g_i^T a_i||_F^2`` for ``a [B, T, d]``, ``g [B, T, p]`` via Gram matrices: ``[B]``."""
    return _ghost_sq_and_bias(a, g, bias=False)[0]


def _ghost_sq_and_bias(a: torch.Tensor, g: torch.Tensor, bias: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ghost norm ``||g_i^T a_i||_F^2 = <a_i a_i^T, g_i g_i^T>`` (Li et al. 2022) and, with
    ``bias``, the bias's ``||sum_t g_it||^2``: two ``[B]`` (the second None without ``bias``).
    The bias's norm is not taken as ``1^T (g_i g_i^T) 1``: that sum of ``T^2`` products loses
    ``eps (sum_t |g_it|)^2`` to cancellation (docs/design.md E22).

    Shapes: ``a [B, T, d]``, ``g [B, T, p]``. On CPU in float32 with AVX2 the C kernel
    (:func:`_gram_kernel_takes`) computes only the Gram tiles on and above the diagonal and no
    ``[B, T, T]`` tensor; otherwise torch's batched GEMMs, and the Frobenius product as one
    batched dot (``[B, 1, T^2] @ [B, T^2, 1]``)."""
    B, T = a.shape[0], a.shape[1]
    if _gram_kernel_takes(a, g):
        return _gram_kernel(a, g, bias)
    aa = torch.bmm(a, a.transpose(1, 2))
    gg = torch.bmm(g, g.transpose(1, 2))
    weight = torch.bmm(aa.view(B, 1, T * T), gg.view(B, T * T, 1)).view(B)
    return weight, (_sq(g.sum(1)) if bias else None)


_GRAM_MAX_T = 1024  # positions up to which the Gram kernel runs (its [T, T] scratch: 4 MB per thread)


def _gram_kernel_takes(a: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether :func:`_gram_kernel` runs for ``a [B, T, d]``, ``g [B, T, p]``: the kernel is
    built and this CPU has AVX2 and FMA, both are float32 CPU tensors, and
    ``1 <= T <= _GRAM_MAX_T``, ``d, p >= 1``."""
    return (
        _gram is not None
        and _gram.available()
        and a.device.type == "cpu" == g.device.type
        and a.dtype == torch.float32 == g.dtype
        and 1 <= a.shape[1] <= _GRAM_MAX_T
        and a.shape[2] >= 1
        and g.shape[2] >= 1
    )


def _gram_layout(x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """``x [B, T, w]`` as the Gram kernel reads it, with its sample and row strides: rows of
    ``w`` contiguous floats, apart by at least ``w``, samples by at least ``T`` rows. A view
    that is not so (transposed, expanded) is copied first: one pass, against ``T`` passes for
    the Grams. The stride of a dimension of size 1 is whatever torch left there, so it is
    replaced by the one it would have if the tensor were contiguous."""
    def strides(t: torch.Tensor) -> tuple[bool, int, int]:
        B, T, w = t.shape
        s0, s1, s2 = t.stride()
        s1 = w if T == 1 else s1
        s0 = T * s1 if B == 1 else s0
        return (s2 == 1 or w == 1) and s1 >= w and s0 >= (T - 1) * s1 + w, s0, s1

    ok, s0, s1 = strides(x)
    if not ok:  # a contiguous copy always has such strides
        x = x.contiguous()
        _, s0, s1 = strides(x)
    return x, s0, s1


def _gram_kernel(
    a: torch.Tensor, g: torch.Tensor, bias: bool, threads: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`_ghost_sq_and_bias` by dpclip/_csrc/gram.c (docs/design.md E22): per sample,
    the weighted Gram tiles on and above the diagonal, in cache; one call over the batch,
    split over the torch threads by the kernel itself (``threads``: that many instead). For
    ``T = 1`` the kernel takes two sums of squares per sample. Shapes as there."""
    B, T, d = a.shape
    p = g.shape[2]
    a, sa, la = _gram_layout(a)
    g, sg, lg = _gram_layout(g)
    out = a.new_empty(B)
    out_bias = a.new_empty(B) if bias else None
    if B:
        dims = (T, d, p, sa, la, sg, lg)

        def run(lo: int, hi: int, count: int) -> None:
            _gram.gram_dot(a.data_ptr(), g.data_ptr(), out.data_ptr(), 0 if out_bias is None else out_bias.data_ptr(),
                           lo, hi, dims, count)

        if threads is None:
            _over_batch(run, B, B * T * (d + p))
        else:
            run(0, B, threads)
    return out, out_bias


def _materialised_rule(
    per_sample: Callable[[nn.Module, torch.Tensor, torch.Tensor], Grads],
    check: Callable[[nn.Module], None] | None = None,
) -> LayerRule:
    """A rule for layers whose per-sample gradients are small (norm layers)."""

    def sq_norms(module, activations, backprops):
        return {n: _sq(gs) for n, gs in per_sample(module, activations, backprops).items()}

    def clipped_sum(module, activations, backprops, scales):
        return {
            n: _weighted_sum(_scale(scales, n, gs), gs)
            for n, gs in per_sample(module, activations, backprops).items()
        }

    return LayerRule(
        per_sample_grads=torch.no_grad()(per_sample),
        sq_norms=torch.no_grad()(sq_norms),
        clipped_sum=torch.no_grad()(clipped_sum),
        check=check,
        materialised=True,
    )


# --------------------------------------------------------------------------- Linear


def _linear_flat(activations: torch.Tensor, backprops: torch.Tensor):
    """``a [B, T, d]``, ``g [B, T, p]`` from ``[B, ..., d]`` and ``[B, ..., p]``."""
    a = activations.flatten(1, -2) if activations.dim() > 2 else activations.unsqueeze(1)
    g = backprops.flatten(1, -2) if backprops.dim() > 2 else backprops.unsqueeze(1)
    return a, g.to(a.dtype)


def _linear_T(activations: torch.Tensor) -> int:
    """Positions per sample of a Linear call (1 for ``[B, d]`` inputs)."""
    return math.prod(activations.shape[1:-1]) if activations.dim() > 2 else 1


@torch.no_grad()
def _linear_psg(module: nn.Linear, activations, backprops) -> Grads:
    a, g = _linear_flat(activations, backprops)
    out: Grads = {}
    if _trainable(module, "weight"):
        out["weight"] = torch.bmm(g.transpose(1, 2), a)  # [B, p, d]
    if _trainable(module, "bias"):
        out["bias"] = g.sum(1)
    return out


def _linear_plan(module: nn.Linear, activations, backprops) -> bool:
    """Materialise when the per-sample weight gradient (``d p`` numbers per sample) is no
    larger than the activations and output gradients it replaces (``T (d + p)``): then it
    costs the weight-gradient contraction once (which book-keeping would do anyway for the
    clipped sum) instead of a ghost norm of ``T^2 (d + p)`` on top. With ``T = 1`` (an MLP) the
    ghost norm is nearly free and materialising would write ``B d p`` numbers: never."""
    if not _trainable(module, "weight"):
        return True
    T, d, p = _linear_T(activations), activations.shape[-1], backprops.shape[-1]
    return T > 1 and d * p <= T * (d + p)


@torch.no_grad()
def _linear_sq(module: nn.Linear, activations, backprops) -> Grads:
    a, g = _linear_flat(activations, backprops)
    out: Grads = {}
    T = a.shape[1]
    weight, bias = _trainable(module, "weight"), _trainable(module, "bias")
    if T == 1 and not _ghost_overridden():
        # one position (an MLP): ||g a^T||^2 = |a|^2 |g|^2, and |g|^2 is the bias's
        if weight and _gram_kernel_takes(a, g):
            # the Gram kernel's one-position rows: both norms in one pass, on this thread (the
            # pass is memory-bound; starting a second thread costs more than it saves)
            out["weight"], bias_sq = _gram_kernel(a, g, bias, threads=1)
            if bias:
                out["bias"] = bias_sq
            return out
        g_sq = _sq(g)
        if weight:
            out["weight"] = _sq(a).mul_(g_sq)
        if bias:
            out["bias"] = g_sq
        return out
    if weight:
        d, p = a.shape[2], g.shape[2]
        if use_ghost(T, d, p):
            out["weight"], bias_sq = _ghost_sq_and_bias(a, g, bias)
            if bias_sq is not None:
                out["bias"] = bias_sq
        else:
            out["weight"] = _sq(torch.bmm(g.transpose(1, 2), a))
    if bias and "bias" not in out:
        out["bias"] = _sq(g.sum(1))
    return out


@torch.no_grad()
def _linear_clipped(module: nn.Linear, activations, backprops, scales) -> Grads:
    if activations.dim() == 2:  # one position: no reshapes
        a2, g2 = activations, backprops.to(activations.dtype)
        B, d = a2.shape
        T, a, g = 1, a2, g2
    else:
        a, g = _linear_flat(activations, backprops)
        B, T, d = a.shape
        a2, g2 = a.reshape(B * T, d), g.reshape(B * T, g.shape[-1])
    p = g2.shape[-1]
    out: Grads = {}
    weight, bias = _trainable(module, "weight"), _trainable(module, "bias")
    if weight:
        s = _scale(scales, "weight", g)
        if T > 1:
            s = s.repeat_interleave(T)
        # scale the narrower operand: one pass over B T min(d, p) numbers, then one GEMM
        if d <= p and T > 1 and bias:
            # the bias rides in the same GEMM as a column of its scales after the scaled
            # activations: g^T [a s_w, s_b] = [sum s_w g a^T, sum s_b g], one pass over the
            # [B T, p] output gradients instead of two (their matrix-vector product alone
            # is memory-bound, 2.6 ms for W4's [16384, 512])
            both = torch.empty(B * T, d + 1, dtype=a2.dtype, device=a2.device)
            with _serial(B * T * d, a.device):
                torch.mul(a2, s[:, None], out=both[:, :d])
                both[:, d] = _scale(scales, "bias", g).repeat_interleave(T)
            with _serial_gemm(2 * B * T * (d + 1) * p, a.device):
                full = g2.t() @ both
            out["weight"], out["bias"] = full[:, :d].contiguous(), full[:, d].contiguous()
            return out
        with _serial(B * T * min(d, p), a.device):
            scaled = a2 * s[:, None] if d <= p else g2 * s[:, None]
        with _serial_gemm(2 * B * T * d * p, a.device):
            out["weight"] = g2.t() @ scaled if d <= p else scaled.t() @ a2
    if bias:
        s = _scale(scales, "bias", g)
        if T > 1:
            s = s.repeat_interleave(T)
        with _serial(B * T * p, g.device):
            out["bias"] = g2.t() @ s  # a matrix-vector product, no [B, T, p] temporary
    return out


LINEAR_RULE = LayerRule(_linear_psg, _linear_sq, _linear_clipped, plan=_linear_plan)


# --------------------------------------------------------------------------- Conv


_CONV_WEIGHT_GRAD = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}


def _conv_pads(module: nn.modules.conv._ConvNd) -> list[tuple[int, int]]:
    """(left, right) padding per spatial dim, as the module's forward applies it."""
    n = len(module.kernel_size)
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return [(0, 0)] * n
        if module.padding == "same":
            pads = []
            for k, dil in zip(module.kernel_size, module.dilation):
                total = dil * (k - 1)
                pads.append((total // 2, total - total // 2))
            return pads
        raise ValueError(f"unknown conv padding {module.padding!r}")
    return [(int(p), int(p)) for p in module.padding]


def _conv_patches(module: nn.modules.conv._ConvNd, activations: torch.Tensor) -> torch.Tensor:
    """The input patches of every output position: ``[B G, L, K Cg]``.

    ``L`` output positions, ``G`` groups, ``K`` kernel offsets, ``Cg`` input channels per group;
    within a patch the kernel offset is major and the channel minor (not ``weight``'s order:
    the ghost norm's ``a a^T`` does not depend on it). Taken from a channels-last copy of the
    (padded) input through one strided view, so the copy that forms the patches reads runs of
    ``Cg`` contiguous numbers: 0.45 ms for W2's 16->32 4x4 stride-2 layer, where
    ``F.unfold`` (im2col) took 6 ms.
    """
    x = _conv_padded(module, activations)
    B, C = x.shape[0], x.shape[1]
    n, G = x.dim() - 2, module.groups
    Cg = C // G
    xc = x.movedim(1, -1).contiguous()  # [B, *S, C]
    S, st = xc.shape[1:-1], xc.stride()
    k, s, d = module.kernel_size, module.stride, module.dilation
    Ls = [(S[j] - d[j] * (k[j] - 1) - 1) // s[j] + 1 for j in range(n)]
    shape = (B, G, *Ls, *k, Cg)
    strides = (st[0], Cg, *[st[1 + j] * s[j] for j in range(n)], *[st[1 + j] * d[j] for j in range(n)], 1)
    return xc.as_strided(shape, strides).reshape(B * G, math.prod(Ls), math.prod(k) * Cg)


def _conv_ghost_sq(module: nn.modules.conv._ConvNd, activations, backprops, keep: list | None = None) -> torch.Tensor:
    """Per-sample squared weight-gradient norms ``[B]``: the ghost norm (Li et al. 2022) of the
    equivalent Linear map per group, ``<a a^T, g g^T>`` over output positions, from
    :func:`_conv_patches`, a few samples at a time (patches under :data:`_CHUNK_NUMBERS`).
    ``keep``: a list that receives ``(i, j, patches)`` of every piece, for
    :func:`_conv_sum_from_patches`."""
    B = activations.shape[0]
    G = module.groups
    L, d, _, _ = _conv_shapes(module, activations, backprops)
    chunk = max(1, _CHUNK_NUMBERS // max(1, G * L * d))

    def piece(i: int, j: int) -> torch.Tensor:
        a = _conv_patches(module, activations[i:j])
        if keep is not None:
            keep.append((i, j, a))  # list.append is atomic: pieces may finish on any thread
        g = backprops[i:j].reshape((j - i) * G, backprops.shape[1] // G, L).to(a.dtype)
        return _ghost_sq(a, g.transpose(1, 2)).view(j - i, G).sum(1)

    spread = _spread(chunk, B, activations.device, B * G * L * d)
    out = _map_chunks(piece, B, spread, activations.device)
    return torch.cat(out) if out else activations.new_zeros(0)


def _conv_sum_from_patches(module: nn.modules.conv._ConvNd, backprops, scale: torch.Tensor, pieces: list) -> torch.Tensor:
    """``sum_i scale_i g_i`` for the weight, from the patches the norm pass kept: per group one
    matmul of the scaled output gradients ``[Og, B L]`` with the patches ``[B L, K Cg]``, then
    the ``(K, Cg)`` order of a patch turned into the weight's ``(Cg, K)``. Shapes: ``backprops
    [B, O, *L]``, ``scale [B]``; returns ``weight``'s shape."""
    G = module.groups
    O = backprops.shape[1]
    K = math.prod(module.kernel_size)
    L = math.prod(backprops.shape[2:])
    total = None
    for i, j, a in sorted(pieces, key=lambda piece: piece[0]):  # a: [m G, L, K Cg]; fixed order
        m = j - i
        g = backprops[i:j].reshape(m, G, O // G, L).to(a.dtype) * scale[i:j].to(a.dtype).view(m, 1, 1, 1)
        g = g.permute(1, 2, 0, 3).reshape(G, O // G, m * L)
        part = torch.bmm(g, a.view(m, G, L, -1).transpose(0, 1).reshape(G, m * L, -1))  # [G, Og, K Cg]
        total = part if total is None else total.add_(part)
    Cg = total.shape[-1] // K
    w = total.view(G, O // G, K, Cg).permute(0, 1, 3, 2).reshape(O, Cg, *module.kernel_size)
    return w.to(module.weight.dtype)


def _conv_psg_from_patches(module: nn.modules.conv._ConvNd, activations, backprops) -> torch.Tensor:
    """Per-sample weight gradients from :func:`_conv_patches`: per sample and group one matmul
    ``g [Og, L] @ patches [L, K Cg]``, a few samples at a time (patches under
    :data:`_CHUNK_NUMBERS`). Shapes: ``activations [B, C, *S]``, ``backprops [B, O, *L]``;
    returns ``[B, G, Og, K, Cg]`` (a patch's order; :func:`_conv_sum_from_psg` turns a sum
    of them into ``weight``'s)."""
    B, O = backprops.shape[0], backprops.shape[1]
    G = module.groups
    L, d, _, _ = _conv_shapes(module, activations, backprops)
    K = math.prod(module.kernel_size)
    out = activations.new_empty((B, G, O // G, K, d // K))

    def piece(i: int, j: int) -> None:
        a = _conv_patches(module, activations[i:j])  # [m G, L, K Cg]
        g = backprops[i:j].reshape((j - i) * G, O // G, L).to(a.dtype)
        torch.bmm(g, a, out=out[i:j].view((j - i) * G, O // G, d))

    chunk = max(1, _CHUNK_NUMBERS // max(1, G * L * d))
    _map_chunks(piece, B, _spread(chunk, B, activations.device, B * G * L * d), activations.device)
    return out


def _conv_sum_from_psg(module: nn.modules.conv._ConvNd, scale: torch.Tensor, psg: torch.Tensor) -> torch.Tensor:
    """``sum_i scale_i psg_i`` in ``weight``'s shape, for ``psg [B, G, Og, K, Cg]`` from
    :func:`_conv_psg_from_patches`."""
    G, Og, K, Cg = psg.shape[1:]
    total = _weighted_sum(scale.to(psg.dtype), psg)  # [G, Og, K, Cg]
    return total.transpose(2, 3).reshape(G * Og, Cg, *module.kernel_size).to(module.weight.dtype)


def _conv_bias_grad(backprops: torch.Tensor) -> torch.Tensor:
    with _serial(backprops.numel(), backprops.device):
        return backprops.flatten(2).sum(2)


def _conv_input(module: nn.modules.conv._ConvNd, x: torch.Tensor):
    """``(input, padding)`` for torch's conv kernels: zero padding that is the same on both
    sides is passed to the kernel (no copy); anything else is applied with ``F.pad`` first, as
    the module's own forward does."""
    if module.padding_mode == "zeros":
        if not isinstance(module.padding, str):
            return x, tuple(int(p) for p in module.padding)
        pads = _conv_pads(module)
        if all(l == r for l, r in pads):
            return x, tuple(l for l, _ in pads)
    pads = _conv_pads(module)
    if any(l or r for l, r in pads):
        flat = [v for l_r in reversed(pads) for v in l_r]  # F.pad wants the last dim first
        x = F.pad(x, flat, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
    return x, 0


def _conv_padded(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """``x`` with the module's padding applied, whatever its mode (a copy only if there is any)."""
    x, padding = _conv_input(module, x)
    if isinstance(padding, tuple) and any(padding):
        x = F.pad(x, [v for q in reversed(padding) for v in (q, q)])  # F.pad wants the last dim first
    return x


_PSG_CHUNK = 32  # samples per weight-gradient kernel call (measured on 2 CPU threads: one call
# for 256 samples is 1.5-2x slower than 8 calls of 32, 2-3x a plain weight gradient)
_PATCH_PSG_MEMORY = 3  # per-sample gradients from patches are kept up to this many times the captures
_UNFOLD_MAX_D = 32  # inputs per group and kernel offsets up to which unfold + bmm is faster


def _map_chunks(fn: Callable[[int, int], torch.Tensor], batch: int, chunk: int, device: torch.device) -> list:
    """``[fn(i, min(i + chunk, batch)) for i in range(0, batch, chunk)]``, in that order.

    On a CPU with several torch threads the chunks run concurrently, one single-threaded chunk
    per core (the calling thread takes the first share): torch's grouped conv weight-gradient
    kernel, which the per-sample paths call on a few samples at a time, scales badly across
    threads on such small problems (W2's 16->32 layer: 4.4 ms on one thread, 6.6 ms on two;
    docs/design.md E15). The thread count is restored afterwards; values do not depend on it.
    """
    starts = list(range(0, batch, chunk))
    if device.type != "cpu":
        return [fn(i, min(i + chunk, batch)) for i in starts]
    shares = in_shares(lambda lo, hi: [fn(i, min(i + chunk, batch)) for i in starts[lo:hi]], len(starts))
    return [part for share in shares for part in share]


_SPREAD_MIN = 1 << 16  # numbers of temporaries below which a batch is not split across threads


def _spread(chunk: int, batch: int, device: torch.device, numbers: int) -> int:
    """``chunk``, lowered so that a CPU batch splits into at least one piece per torch thread
    (:func:`_map_chunks` then runs the pieces side by side, each on one thread), unless the
    work is small (``numbers``, the size of its temporaries over the whole batch, below
    :data:`_SPREAD_MIN`): then handing pieces to another thread costs more than it saves."""
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    if numbers < _SPREAD_MIN:
        return max(1, chunk)
    return max(1, min(chunk, -(-batch // max(1, threads))))


def _over_batch(run: Callable[[int, int, int], object], batch: int, numbers: int) -> None:
    """``run(0, batch, threads)``: one C kernel call over the batch, which the kernel splits
    into one share of samples per thread of its own (dpclip/_csrc/threads.h, design P12) on
    ``torch.get_num_threads()`` threads, or runs on the caller alone when its input
    (``numbers``) is below :data:`_SPREAD_MIN`."""
    run(0, batch, 1 if numbers < _SPREAD_MIN else torch.get_num_threads())


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _conv_psg_by_forward(module: nn.modules.conv._ConvNd, x, padding, g, out) -> torch.Tensor:
    """Per-sample weight gradients of a conv with few input channels per group, as one forward
    conv (the "batched" method of Rochette et al. 2019, arXiv:1912.06015):
    ``G_i[o, c, k] = sum_l g_i[o, l] x_i[c, s l + d k]`` is a conv whose input has the
    ``Cg`` channels of a group as its batch and the ``B G`` (sample, group) pairs as its
    channels, whose kernel is ``g`` (``B O`` filters, ``groups = B G``), with the module's
    stride and dilation swapped.

    Shapes: ``x [B, C, *S]`` (as :func:`_conv_input` returns it, with ``padding``),
    ``g [B, O, *L]``; fills and returns ``out [B, O, Cg, *k]``. The input is a view for
    ``Cg = 1`` and a copy the size of ``x`` otherwise: no patches. Used where torch's forward
    kernel measured faster than the weight-gradient kernel or unfold + bmm (2 threads,
    docs/design.md E18): ``Cg = 1`` in 1-D and 2-D (W2's 1->16 8x8 layer: 3.2 -> 2.1 ms; a
    depthwise 3x3: 4.6 -> 0.5 ms) and ``Cg <= 3`` in 2-D (W3's 3->32 layer: 15.6 -> 11.7 ms).
    The batch is split in one piece per thread (:func:`_map_chunks`).
    """
    B, C = x.shape[0], x.shape[1]
    O, G = g.shape[1], module.groups
    Cg = C // G
    k = tuple(module.kernel_size)
    n = len(k)
    conv = _CONV[n]
    crop = (slice(None), slice(None)) + tuple(slice(0, kk) for kk in k)

    def piece(i: int, j: int) -> None:
        m = j - i
        xb = x[i:j].reshape(m, G, Cg, *x.shape[2:]).movedim(2, 0).reshape(Cg, m * G, *x.shape[2:])
        w = g[i:j].reshape(m * O, 1, *g.shape[2:])
        # the output's extent is >= k (more where the last positions are not reached): crop
        r = conv(xb, w, None, stride=module.dilation, padding=padding, dilation=module.stride, groups=m * G)
        out[i:j] = r[crop].reshape(Cg, m, O, *k).movedim(0, 2)

    _map_chunks(piece, B, _spread(B, B, x.device, B * x[0].numel()), x.device)
    return out


_FORWARD_PSG_MAX_CG = {1: 1, 2: 3}  # spatial dims -> inputs per group up to which the forward path wins


_KERNEL_MIN_KW = 6  # kernel widths from which the column-vectorised kernel fills enough of its 8 lanes
_KERNEL_MAX_CG = 3  # inputs per group up to which the output-vectorised kernel beats torch's paths
_KERNEL_MIN_WO = 16  # output columns from which the position-vectorised kernel beats torch's paths


def _conv_kernel_ok(module: nn.modules.conv._ConvNd, activations: torch.Tensor, backprops: torch.Tensor) -> bool:
    """dpclip's per-sample conv2d kernels can run this layer: 2-D, CPU, float32, AVX2."""
    return (
        _convpsg is not None
        and len(module.kernel_size) == 2
        and activations.device.type == "cpu"
        and activations.dtype == torch.float32
        and backprops.dtype == torch.float32
        and _convpsg.available()
    )


def _conv_kernel_takes(module: nn.modules.conv._ConvNd, activations: torch.Tensor, backprops: torch.Tensor) -> str | None:
    """Which of dpclip's per-sample conv2d kernels :func:`_conv_weight_psg` uses, or None for
    torch's paths: ``"columns"`` (8 kernel columns x 8 outputs per register block) for kernels at
    least :data:`_KERNEL_MIN_KW` wide with 8+ outputs per group; ``"positions"`` (8 output
    columns per register, 4 outputs x 3 kernel columns per block) for stride 1 along the width
    and at least :data:`_KERNEL_MIN_WO` output columns; ``"outputs"`` (4 kernel columns x 16
    outputs) for at most :data:`_KERNEL_MAX_CG` inputs per group and outputs per group a
    multiple of 8. Measured against torch's paths (2 threads, B = 256): W2's 1->16 8x8 layer
    2.33 -> 0.94 ms; W3's 3->32 3x3 layer 11.3 -> 7.5 ms ("outputs") -> 3.7 ms ("positions",
    at the bandwidth of reading its 33.6 MB of output gradients once); W3's 32->64 3x3 layer
    17.3 -> 15.0 ms; a depthwise 3x3 conv on 32x32 23 -> 16 ms; with 8-15 output columns
    "positions" lost to torch (5.2 against 7.9 ms for 16->32 4x4 on 13x13; docs/design.md
    E20, E24)."""
    if not _conv_kernel_ok(module, activations, backprops):
        return None
    cg = activations.shape[1] // module.groups
    og = backprops.shape[1] // module.groups
    kw = module.kernel_size[1]
    if og >= 8 and kw >= _KERNEL_MIN_KW:
        return "columns"
    if module.stride[1] == 1 and backprops.shape[3] >= _KERNEL_MIN_WO:
        return "positions"
    if cg <= _KERNEL_MAX_CG and og % 8 == 0:
        return "outputs"
    if og >= 8 and cg <= _KERNEL_MAX_CG:
        return "columns"
    return None


def _conv_kernel_run(fn, module: nn.modules.conv._ConvNd, activations, backprops, out: torch.Tensor) -> torch.Tensor:
    """Run ``fn`` (``_convpsg.conv2d_psg`` or ``conv2d_psg_t``) over the batch, one share of
    samples per thread, on the padded input; fills and returns ``out``."""
    x = _conv_padded(module, activations).contiguous()
    g = backprops.contiguous()
    B, C, H, W = x.shape
    O, Ho, Wo = g.shape[1:]
    dims = (C, H, W, O, Ho, Wo, module.groups, *module.kernel_size, *module.stride, *module.dilation)
    _over_batch(lambda lo, hi, threads: fn(x.data_ptr(), g.data_ptr(), out.data_ptr(), lo, hi, dims, threads), B, x.numel())
    return out


def _conv_psg_kernel(module: nn.modules.conv._ConvNd, activations, backprops, out: torch.Tensor, variant: str) -> torch.Tensor:
    """Per-sample weight gradients of a 2-D conv from dpclip's kernels (dpclip/_csrc/conv_psg.c,
    docs/design.md E20): per sample the padded input stays in cache and a block of outputs x
    kernel columns accumulates in registers over all output positions; no patches.

    Shapes: ``activations [B, C, H, W]``, ``backprops [B, O, Ho, Wo]`` (float32); fills and
    returns ``out [B, O, C/G, kh, kw]`` (contiguous float32). ``variant``: what
    :func:`_conv_kernel_takes` chose."""
    if variant == "outputs":
        t = _conv_psg_t(module, activations, backprops)  # [B, G, Cg, kh, kw, Og]
        B, G, Og = t.shape[0], t.shape[1], t.shape[-1]
        out.view(B, G, Og, *t.shape[2:5]).copy_(t.permute(0, 1, 5, 2, 3, 4))
        return out
    fn = _convpsg.conv2d_psg_p if variant == "positions" else _convpsg.conv2d_psg
    return _conv_kernel_run(fn, module, activations, backprops, out)


def _conv_psg_t(module: nn.modules.conv._ConvNd, activations, backprops) -> torch.Tensor:
    """Per-sample weight gradients with the outputs innermost, ``[B, G, C/G, kh, kw, O/G]``
    (float32; ``O/G`` a multiple of 8), from the output-vectorised kernel."""
    B, C = activations.shape[0], activations.shape[1]
    O, G = backprops.shape[1], module.groups
    out = activations.new_empty((B, G, C // G, *module.kernel_size, O // G))
    return _conv_kernel_run(_convpsg.conv2d_psg_t, module, activations, backprops, out)


def _conv_sum_from_psg_t(module: nn.modules.conv._ConvNd, scale: torch.Tensor, psg_t: torch.Tensor) -> torch.Tensor:
    """``sum_i scale_i psg_i`` in ``weight``'s shape, for ``psg_t [B, G, Cg, kh, kw, Og]``."""
    total = _weighted_sum(scale.to(psg_t.dtype), psg_t)  # [G, Cg, kh, kw, Og]
    G, Og = total.shape[0], total.shape[-1]
    return total.permute(0, 4, 1, 2, 3).reshape(G * Og, *total.shape[1:4]).to(module.weight.dtype)


def _conv_weight_psg(module: nn.modules.conv._ConvNd, activations, backprops) -> torch.Tensor:
    """Per-sample weight gradients ``[B, *weight.shape]`` without a per-sample loop.

    2-D convs in float32 with a wide kernel or few inputs per group, on a CPU with AVX2: dpclip's
    own kernel (:func:`_conv_psg_kernel`). Otherwise torch's kernels:
    Few input channels per group (``C/G = 1`` in 1-D and 2-D: an MNIST first layer, a depthwise
    conv; ``C/G <= 3`` in 2-D: RGB images): a forward conv with the samples as groups
    (:func:`_conv_psg_by_forward`). Narrow layers
    (``C/G * K <= 32``, e.g. a first layer on RGB images, 1-D/2-D): unfold the input and one
    batched matmul per group. Otherwise torch's conv weight-gradient kernel with the samples as
    extra groups (``groups = B * G``), ``_PSG_CHUNK`` samples per call.
    """
    B = activations.shape[0]
    k = tuple(module.kernel_size)
    out = activations.new_empty((B, *module.weight.shape))
    if B == 0:
        return out
    variant = _conv_kernel_takes(module, activations, backprops)
    if variant:
        return _conv_psg_kernel(module, activations, backprops, out, variant)
    x, padding = _conv_input(module, activations)
    g = backprops.to(x.dtype)
    C, O, G = x.shape[1], g.shape[1], module.groups
    n = len(k)
    L = math.prod(g.shape[2:])
    if C // G <= _FORWARD_PSG_MAX_CG.get(n, 0):
        return _conv_psg_by_forward(module, x, padding, g, out)
    # samples per piece: the unfolded patches of a piece stay below _CHUNK_NUMBERS numbers
    # (a fresh block above ~32 MB costs page faults on every call; see _in_chunks)
    chunk = max(1, _CHUNK_NUMBERS // max(1, L * C * math.prod(k)))
    if n <= 2 and (C // G) * math.prod(k) <= _UNFOLD_MAX_D:
        pad = padding if isinstance(padding, tuple) else (0,) * n
        if n == 1:  # as a 2-D conv of height 1
            x, g = x.unsqueeze(2), g.unsqueeze(2)
            k2, pad2 = (1, k[0]), (0, pad[0])
            stride2, dil2 = (1, module.stride[0]), (1, module.dilation[0])
        else:
            k2, pad2, stride2, dil2 = k, pad, module.stride, module.dilation
        w = out.view(B * G, O // G, -1)

        def unfolded(i: int, j: int) -> None:
            cols = F.unfold(x[i:j], k2, dilation=dil2, padding=pad2, stride=stride2)  # [m, C K, L]
            cols = cols.view((j - i) * G, -1, L)
            # [m G, Og, Cg K]
            torch.bmm(g[i:j].reshape((j - i) * G, O // G, L), cols.transpose(1, 2), out=w[i * G : j * G])

        _map_chunks(unfolded, B, _spread(chunk, B, x.device, B * L * C * math.prod(k)), x.device)
        return out
    weight_grad = _CONV_WEIGHT_GRAD[n]

    def chunk(i: int, j: int) -> None:
        xb, gb = x[i:j], g[i:j]
        m = j - i
        w = weight_grad(
            xb.reshape(1, m * C, *xb.shape[2:]),
            (m * O, C // G, *k),
            gb.reshape(1, m * O, *gb.shape[2:]),
            stride=module.stride,
            padding=padding,
            dilation=module.dilation,
            groups=m * G,
        )
        out[i:j] = w.view(m, *module.weight.shape)

    _map_chunks(chunk, B, _PSG_CHUNK, x.device)
    return out


def _conv_shapes(module: nn.modules.conv._ConvNd, activations, backprops):
    """``(L, d, p, G)``: output positions, inputs and outputs per group of the equivalent Linear map."""
    L = math.prod(backprops.shape[2:])
    G = module.groups
    d = (activations.shape[1] // G) * math.prod(module.kernel_size)
    return L, d, backprops.shape[1] // G, G


def _conv_plan(module, activations, backprops) -> bool:
    """Materialise when the per-sample weight gradient is no larger than the input and output
    gradient it replaces (per sample): computed with the weight-gradient kernel, it then costs
    what the clipped-sum contraction would, and the norm comes free."""
    if not _trainable(module, "weight"):
        return True
    B = activations.shape[0]
    if B == 0:
        return True
    return module.weight.numel() * B <= activations.numel() + backprops.numel()


def _conv_norm_path(module, activations, backprops) -> str:
    """How :func:`_conv_sq` takes the norm: ``"psg"`` (per-sample gradients), ``"ghost"``
    (:func:`_conv_ghost_sq`) or ``"gram"`` (:func:`_conv_gram_sq`), the cheapest by a cost model
    in multiply-adds per sample and group, fitted on this machine's 2 threads:

    * per-sample gradients ``2 L d p`` (torch's grouped weight-gradient kernel runs at about
      half the speed of the batched matmuls of the ghost norms);
    * ghost norm ``L^2 (d + p) + 4 L d`` (the patches' copy);
    * Gram ghost norm ``P^2 Cg + L^2 (p + K)``.

    With ``use_ghost`` overridden (``ghost="always"``/``"never"``, tests) it decides between
    some ghost norm (the cheaper one) and the per-sample gradients.
    """
    L, d, p, _ = _conv_shapes(module, activations, backprops)
    ghost = L * L * (d + p) + 4 * L * d
    gram = _conv_gram_cost(module, activations, backprops)
    best = "gram" if gram < ghost else "ghost"
    if _ghost_overridden():
        return best if use_ghost(L, d, p) else "psg"
    return best if min(ghost, gram) < 2 * L * d * p else "psg"


def _conv_padded_positions(module: nn.modules.conv._ConvNd, activations: torch.Tensor) -> int:
    """``P``: input positions per sample after padding."""
    return math.prod(n + l + r for n, (l, r) in zip(activations.shape[2:], _conv_pads(module)))


def _conv_gram_cost(module: nn.modules.conv._ConvNd, activations, backprops) -> int:
    """Multiply-adds per group and sample of :func:`_conv_gram_sq`: ``P^2 Cg + L^2 Og + K L^2``."""
    L, _, p, G = _conv_shapes(module, activations, backprops)
    P = _conv_padded_positions(module, activations)
    Cg = activations.shape[1] // G
    P0 = math.prod(activations.shape[2:])
    if module.padding_mode == "zeros" and P0 < P:  # the unpadded input's Gram matrix, zeros around it
        return P0 * P0 * Cg + P * P + L * L * (p + math.prod(module.kernel_size))
    return P * P * Cg + L * L * (p + math.prod(module.kernel_size))


_GRAM_MAX_NUMBERS = 1 << 22  # samples per chunk of _conv_gram_sq: at most this many Gram entries


def _conv_gram_sq(module: nn.modules.conv._ConvNd, activations, backprops) -> torch.Tensor:
    """Per-sample squared weight-gradient norms ``[B]`` from the input's Gram matrix over positions.

    With ``x`` the padded input of one sample and group (``[Cg, P]``, ``P`` positions) and
    ``g`` its output gradient (``[Og, L]``), the weight gradient at kernel offset ``k`` is
    ``g x_k^T`` with ``x_k [Cg, L]`` the input positions that offset reads. Its squared norm,
    summed over offsets, is ``sum_{l, l'} (g^T g)[l, l'] sum_k (x^T x)[pos_k(l), pos_k(l')]``:
    the ghost norm of Li et al. (2022) with the patches' Gram matrix ``sum_k x_k^T x_k`` read
    off the ``[P, P]`` Gram matrix of the padded input (at stride 1 as contiguous ``[N, N]``
    blocks, one per offset; otherwise through one strided view per offset), instead of from
    unfolded patches. That costs ``P^2 Cg + L^2 Og`` multiply-adds
    (``P0^2 Cg`` for zero padding: the Gram matrix of the ``P0`` unpadded positions, set in a
    zero ``[P, P]`` one) and ``K L^2`` additions per sample against ``L Cg K Og`` for the
    per-sample gradient, and
    wins for small feature maps with many channels (W3's 8x8 and 4x4 layers: 8 and 1.4 ms
    against 22 and 5 ms; docs/design.md E16). Exact in exact arithmetic, for any stride,
    dilation, padding (mode) and groups.

    Shapes: ``activations [B, C, *S]``, ``backprops [B, O, *L]``; returns ``[B]``.
    """
    B = activations.shape[0]
    G = module.groups
    n = len(module.kernel_size)
    # zero padding: the Gram matrix of the unpadded input (P0^2 Cg instead of P^2 Cg), placed
    # in a zero [P, P] one (W3's 8x8 layer: P0 = 64, P = 100)
    pads = _conv_pads(module)
    zeros = module.padding_mode == "zeros" and any(l or r for l, r in pads)
    x = activations if zeros else _conv_padded(module, activations)
    S0 = activations.shape[2:]
    S = tuple(s0 + l + r for s0, (l, r) in zip(S0, pads)) if zeros else x.shape[2:]
    P, P0 = math.prod(S), math.prod(S0)
    inner = (slice(None),) + tuple(slice(l, l + s0) for s0, (l, _) in zip(S0, pads)) * 2
    C, O = x.shape[1], backprops.shape[1]
    Ls = backprops.shape[2:]
    L = math.prod(Ls)
    g = backprops.to(x.dtype)
    pos_strides = [math.prod(S[j + 1 :]) for j in range(n)]  # of a position in the flat [P]
    offsets = [
        sum(kj * dj * sj for kj, dj, sj in zip(ks, module.dilation, pos_strides))
        for ks in itertools.product(*[range(k) for k in module.kernel_size])
    ]
    step = [st * sj for st, sj in zip(module.stride, pos_strides)]
    unit_stride = all(st == 1 for st in module.stride)
    N = sum((lj - 1) * q for lj, q in zip(Ls, pos_strides)) + 1  # flat extent of the output positions
    chunk = max(1, _GRAM_MAX_NUMBERS // max(1, G * max(P * P, L * L)))

    def piece(i: int, j: int) -> torch.Tensor:
        m = j - i
        if zeros:
            xs = x[i:j].reshape(m * G, C // G, P0)
            gram = x.new_zeros(m * G, P, P)
            gram.view(m * G, *S, *S)[inner] = torch.bmm(xs.transpose(1, 2), xs).view(m * G, *S0, *S0)
        else:
            xs = x[i:j].reshape(m * G, C // G, P)
            gram = torch.bmm(xs.transpose(1, 2), xs)  # [m G, P, P]
        gs = g[i:j].reshape(m * G, O // G, L)
        gg = torch.bmm(gs.transpose(1, 2), gs).view(m * G, *Ls, *Ls)
        if unit_stride:
            # stride 1: the patches of offset k occupy the rows and columns off_k + q(l) of the
            # Gram matrix, q(l) the flat index of position l in the padded grid: sum the [N, N]
            # blocks from off_k (long contiguous rows, a few unused entries between the
            # positions' rows), then read the positions' entries
            acc = None
            for off in offsets:
                block = gram[:, off : off + N, off : off + N]
                acc = block.clone() if acc is None else acc.add_(block)
            sel = acc.as_strided((m * G, *Ls, *Ls), (N * N, *[q * N for q in pos_strides], *pos_strides))
            return gg.mul_(sel).flatten(1).sum(1).view(m, G).sum(1)
        shape = (m * G, *Ls, *Ls)
        strides = (P * P, *[s * P for s in step], *step)
        base = gram.storage_offset()
        patches = None  # sum over offsets of the patches' Gram matrix, [m G, *L, *L]
        for off in offsets:
            view = gram.as_strided(shape, strides, base + off * (P + 1))
            patches = view.clone() if patches is None else patches.add_(view)
        return patches.mul_(gg).flatten(1).sum(1).view(m, G).sum(1)

    spread = _spread(chunk, B, activations.device, B * G * max(P * P, L * L))
    out = _map_chunks(piece, B, spread, activations.device)
    return torch.cat(out) if out else activations.new_zeros(0)


@torch.no_grad()
def _conv_psg(module, activations, backprops) -> Grads:
    out: Grads = {}
    if _trainable(module, "weight"):
        out["weight"] = _conv_weight_psg(module, activations, backprops)
    if _trainable(module, "bias"):
        out["bias"] = _conv_bias_grad(backprops).to(activations.dtype)
    return out


@torch.no_grad()
def _conv_sq(module, activations, backprops, scratch: dict | None = None) -> Grads:
    out: Grads = {}
    if _trainable(module, "weight"):
        B = activations.shape[0]
        path = _conv_norm_path(module, activations, backprops)
        if path == "gram":
            out["weight"] = _conv_gram_sq(module, activations, backprops)
        elif path == "ghost":
            L, d, p, G = _conv_shapes(module, activations, backprops)
            captures = activations.numel() + backprops.numel()
            if scratch is not None and B * G * p * d <= _PATCH_PSG_MEMORY * captures and 2 * d * p < L * L * (d + p):
                # per-sample gradients from the patches (one matmul, as the clipped sum from
                # kept patches would cost anyway) instead of the ghost norm's L^2 (d + p); the
                # clipped sum is then a weighted sum of them (W2's 16->32 layer: norm and sum
                # 4.1 -> 2.7 ms; docs/design.md E18)
                if B and _conv_kernel_ok(module, activations, backprops) and p % 8 == 0:
                    # dpclip's kernel, outputs innermost: no patches (W2's 16->32 layer 3.3 -> 1.0 ms; E20)
                    psg = _conv_psg_t(module, activations, backprops)
                    scratch["psg_t"] = psg
                else:
                    psg = _conv_psg_from_patches(module, activations, backprops)
                    scratch["psg"] = psg
                out["weight"] = _sq(psg.view(B, -1)) if B else activations.new_zeros(0)
            else:
                # keep the patches for the clipped sum while they are at most twice the captures;
                # its clipped sum then costs one matmul instead of the weight-gradient kernel
                keep = [] if scratch is not None and B * G * L * d <= 2 * captures else None
                out["weight"] = _conv_ghost_sq(module, activations, backprops, keep)
                if keep is not None:
                    scratch["patches"] = keep
        else:
            # per-sample gradients for the norm only, a few samples at a time
            out["weight"] = torch.cat(
                _map_chunks(
                    lambda i, j: _sq(_conv_weight_psg(module, activations[i:j], backprops[i:j])),
                    B, _PSG_CHUNK, activations.device,
                )
            ) if B else activations.new_zeros(0)
    if _trainable(module, "bias"):
        out["bias"] = _sq(_conv_bias_grad(backprops).to(activations.dtype))
    return out


@torch.no_grad()
def _conv_clipped(module, activations, backprops, scales, scratch: dict | None = None) -> Grads:
    out: Grads = {}
    kept = scratch.get("patches") if scratch is not None else None
    psg = scratch.get("psg") if scratch is not None else None
    psg_t = scratch.get("psg_t") if scratch is not None else None
    if _trainable(module, "weight") and psg_t is not None:
        # the norm pass's per-sample gradients from dpclip's kernel, outputs innermost
        out["weight"] = _conv_sum_from_psg_t(module, _scale(scales, "weight", psg_t), psg_t)
    elif _trainable(module, "weight") and psg is not None:
        # the norm pass's per-sample gradients
        out["weight"] = _conv_sum_from_psg(module, _scale(scales, "weight", psg), psg)
    elif _trainable(module, "weight") and kept:
        # the norm pass's patches: one matmul, no weight-gradient kernel
        out["weight"] = _conv_sum_from_patches(module, backprops, _scale(scales, "weight", backprops), kept)
    elif _trainable(module, "weight"):
        # book-keeping through torch's own conv weight-gradient kernel on scaled output
        # gradients (or scaled inputs, whichever is smaller): no unfold (Bu et al. 2023; the
        # clipped sum is linear in g)
        B = activations.shape[0]
        if B == 0:
            out["weight"] = torch.zeros_like(module.weight)
        else:
            x, padding = _conv_input(module, activations)
            g = backprops.to(x.dtype)
            s = _scale(scales, "weight", g).to(x.dtype)
            if x.numel() < g.numel():
                x = x * s.view(B, *[1] * (x.dim() - 1))
            else:
                g = g * s.view(B, *[1] * (g.dim() - 1))
            weight_grad = _CONV_WEIGHT_GRAD[len(module.kernel_size)]
            out["weight"] = weight_grad(
                x, module.weight.shape, g, stride=module.stride, padding=padding,
                dilation=module.dilation, groups=module.groups,
            ).to(module.weight.dtype)
    if _trainable(module, "bias"):
        bg = _conv_bias_grad(backprops).to(activations.dtype)
        out["bias"] = _weighted_sum(_scale(scales, "bias", bg), bg)
    return out


CONV_RULE = LayerRule(_conv_psg, _conv_sq, _conv_clipped, plan=_conv_plan, scratch=True)


# --------------------------------------------------------------------------- Embedding


def _embedding_check(module: nn.Embedding) -> None:
    if module.max_norm is not None:
        raise ValueError(
            "nn.Embedding with max_norm is not supported for private training: its forward "
            "renormalises the embedding rows it looks up, in place, from the private batch, so "
            "the released weights depend on data outside the clipped gradient and no "
            "per-sample gradient accounts for it. Fix: construct the Embedding with "
            "max_norm=None (and, if you need bounded rows, renormalise explicitly on public "
            "data or after the optimizer step)."
        )
    if module.sparse:
        raise ValueError(
            "nn.Embedding(sparse=True) is not supported: per-sample clipping and Gaussian noise "
            "make the gradient dense anyway. Fix: construct the Embedding with sparse=False."
        )


def _embedding_flat(module: nn.Embedding, activations: torch.Tensor, backprops: torch.Tensor):
    """``x [B, T]`` indices and ``g [B, T, D]`` with padding rows and frequency scaling applied."""
    _embedding_check(module)
    x = (activations.flatten(1) if activations.dim() > 1 else activations.unsqueeze(1)).long()
    g = backprops.reshape(*x.shape, module.embedding_dim).to(module.weight.dtype)
    if module.padding_idx is not None:
        g = g.masked_fill((x == module.padding_idx)[..., None], 0)
    if module.scale_grad_by_freq:
        # torch divides by the count of each index in the call: for one sample, in that sample
        counts = (x[:, :, None] == x[:, None, :]).sum(-1)
        g = g / counts[..., None].to(g.dtype)
    return x, g


@torch.no_grad()
def _embedding_psg(module: nn.Embedding, activations, backprops) -> Grads:
    if not _trainable(module, "weight"):
        return {}
    x, g = _embedding_flat(module, activations, backprops)
    B, T, D = g.shape
    out = g.new_zeros(B, module.num_embeddings, D)
    out.scatter_add_(1, x[..., None].expand(B, T, D), g)
    return {"weight": out}


@torch.no_grad()
def _embedding_sq(module: nn.Embedding, activations, backprops) -> Grads:
    if not _trainable(module, "weight"):
        return {}
    x, g = _embedding_flat(module, activations, backprops)
    B, T, D = g.shape
    if not use_ghost(T, module.num_embeddings, D):
        return {"weight": _sq(_embedding_psg(module, activations, backprops)["weight"])}
    if _ghost_overridden():  # the Gram form, kept for ghost="always" and the tests
        same = (x[:, :, None] == x[:, None, :]).to(g.dtype)
        gg = torch.bmm(g, g.transpose(1, 2))
        return {"weight": same.mul_(gg).flatten(1).sum(1)}
    # Sample i's gradient has one row per distinct token v, sum_{t: x_t = v} g_t, and distinct
    # rows are orthogonal: sort each sample's tokens, add the gradients of equal neighbours
    # into one slot per run, and take the norm. O(T D) per sample instead of the ghost
    # norm's O(T^2 D).
    xs, order = x.sort(dim=1)
    first = torch.ones_like(xs, dtype=torch.bool)
    first[:, 1:] = xs[:, 1:] != xs[:, :-1]
    run = first.cumsum(1) - 1  # run index of each sorted position
    # run index of each original position, offset per sample: one flat index_add
    slot = torch.empty_like(run).scatter_(1, order, run)
    slot += torch.arange(B, device=slot.device)[:, None] * T
    per_token = g.new_zeros(B * T, D).index_add_(0, slot.reshape(-1), g.reshape(B * T, D))
    return {"weight": _sq(per_token.view(B, T * D))}


@torch.no_grad()
def _embedding_clipped(module: nn.Embedding, activations, backprops, scales) -> Grads:
    if not _trainable(module, "weight"):
        return {}
    x, g = _embedding_flat(module, activations, backprops)
    D = g.shape[-1]
    gs = g * _scale(scales, "weight", g)[:, None, None]
    out = g.new_zeros(module.num_embeddings, D)
    out.index_add_(0, x.reshape(-1), gs.reshape(-1, D))
    return {"weight": out}


EMBEDDING_RULE = LayerRule(
    _embedding_psg, _embedding_sq, _embedding_clipped, check=_embedding_check
)


# --------------------------------------------------------------------------- norm layers


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Half-precision inputs are normalised in float32, as torch's kernels do."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _affine_grads(module: nn.Module, x_hat: torch.Tensor, g: torch.Tensor, reduce_dims: list[int]):
    """``weight``: sum of ``g * x_hat``, ``bias``: sum of ``g``, over ``reduce_dims``."""
    out: Grads = {}
    dtype = getattr(module, "weight", None)
    dtype = dtype.dtype if isinstance(dtype, torch.Tensor) else x_hat.dtype
    if _trainable(module, "bias"):
        b = g.sum(reduce_dims) if reduce_dims else g
        out["bias"] = b.to(dtype)
    if _trainable(module, "weight"):
        w = x_hat.mul_(g)  # x_hat is this rule's own temporary: no second [B, ...] tensor
        out["weight"] = (w.sum(reduce_dims) if reduce_dims else w).to(dtype)
    return out


def _layer_norm_psg(module: nn.LayerNorm, activations, backprops) -> Grads:
    x = activations.to(_compute_dtype(activations))
    g = backprops.to(x.dtype)
    x_hat = F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    k = len(module.normalized_shape)
    return _affine_grads(module, x_hat, g, list(range(1, x.dim() - k)))


def _group_norm_psg(module: nn.GroupNorm, activations, backprops) -> Grads:
    x = activations.to(_compute_dtype(activations))
    g = backprops.to(x.dtype)
    x_hat = F.group_norm(x, module.num_groups, None, None, module.eps)
    return _affine_grads(module, x_hat, g, list(range(2, x.dim())))


def _instance_norm_check(module: nn.modules.instancenorm._InstanceNorm) -> None:
    if module.track_running_stats:
        raise ValueError(
            f"{type(module).__name__}(track_running_stats=True) is not supported for private "
            "training: its running mean and variance are updated from the private batch and "
            "released with the model without any clipping or noise. Fix: construct it with "
            "track_running_stats=False (statistics of each sample's own input are used in "
            "training and evaluation alike)."
        )


def _instance_norm_psg(module, activations, backprops) -> Grads:
    _instance_norm_check(module)
    x = activations.to(_compute_dtype(activations))
    g = backprops.to(x.dtype)
    x_hat = F.instance_norm(x, None, None, None, None, use_input_stats=True, eps=module.eps)
    return _affine_grads(module, x_hat, g, list(range(2, x.dim())))


def _rms_norm_psg(module: nn.RMSNorm, activations, backprops) -> Grads:
    x = activations.to(_compute_dtype(activations))
    g = backprops.to(x.dtype)
    x_hat = F.rms_norm(x, module.normalized_shape, None, module.eps)
    k = len(module.normalized_shape)
    return _affine_grads(module, x_hat, g, list(range(1, x.dim() - k)))


_CHUNK_NUMBERS = 1 << 20  # numbers per temporary of a chunked rule (4 MB in float32)


def _in_chunks(per_sample: Callable[[nn.Module, torch.Tensor, torch.Tensor], Grads]):
    """``per_sample`` on a few samples at a time, so that its ``[B, ...]`` temporaries (the
    normalised input) stay below :data:`_CHUNK_NUMBERS` numbers: a larger block is mapped
    fresh from the OS on every call, and on a virtual machine its page faults cost more than
    the arithmetic (33 MB for W3's first GroupNorm: 15 ms against 5; docs/design.md E16)."""

    def run(module, activations, backprops):
        B = activations.shape[0]
        per = max(1, activations[0].numel()) if B else 1
        chunk = _spread(max(1, _CHUNK_NUMBERS // per), B, activations.device, B * per)
        if B <= chunk:
            return per_sample(module, activations, backprops)
        parts = _map_chunks(lambda i, j: per_sample(module, activations[i:j], backprops[i:j]), B, chunk, activations.device)
        return {n: torch.cat([part[n] for part in parts]) for n in parts[0]}

    return run


def _norm_kernel_takes(module: nn.Module, activations: torch.Tensor, backprops: torch.Tensor) -> bool:
    """dpclip's norm-layer kernel (dpclip/_csrc/norm_psg.c) runs this call: CPU, float32 inputs,
    output gradients and affine parameters."""
    weight = getattr(module, "weight", None)
    return (
        _normpsg is not None
        and activations.device.type == "cpu"
        and activations.dtype == torch.float32
        and backprops.dtype == torch.float32
        and (not isinstance(weight, torch.Tensor) or weight.dtype == torch.float32)
    )


def _norm_kernel_run(fn, module: nn.Module, activations, backprops, width: int, *args) -> Grads:
    """Per-sample affine gradients ``{weight, bias: [B, width]}`` from ``fn``
    (``_normpsg.group`` or ``rows``), one share of samples per thread."""
    x, g = activations.contiguous(), backprops.contiguous()
    B = x.shape[0]
    want = {n: x.new_empty((B, width)) for n in ("weight", "bias") if _trainable(module, n)}
    if not want or B == 0:
        return want
    w, b = want.get("weight"), want.get("bias")
    _over_batch(lambda lo, hi, threads: fn(x.data_ptr(), g.data_ptr(), 0 if w is None else w.data_ptr(),
                                           0 if b is None else b.data_ptr(), lo, hi, *args, threads), B, x.numel())
    return want


def _group_norm_kernel(module: nn.GroupNorm, activations, backprops) -> Grads:
    """GroupNorm's per-sample ``weight``/``bias`` gradients ``[B, C]`` from the norm kernel:
    statistics per sample and group, then ``sum_s g (x - mean) rstd`` and ``sum_s g`` per
    channel in one pass, double accumulators (docs/design.md E21)."""
    C = activations.shape[1]
    S = math.prod(activations.shape[2:])
    return _norm_kernel_run(_normpsg.group, module, activations, backprops, C, C, S, module.num_groups, float(module.eps))


def _instance_norm_kernel(module, activations, backprops) -> Grads:
    """InstanceNorm: GroupNorm with one channel per group."""
    _instance_norm_check(module)
    C = activations.shape[1]
    S = math.prod(activations.shape[2:])
    return _norm_kernel_run(_normpsg.group, module, activations, backprops, C, C, S, C, float(module.eps))


def _rows_norm_kernel(module, activations, backprops, rms: bool) -> Grads:
    """LayerNorm (``rms=False``) and RMSNorm: per-sample gradients ``[B, *normalized_shape]``,
    statistics per row of the normalised dims, sums over the other dims."""
    shape = tuple(module.normalized_shape)
    D = math.prod(shape)
    B = activations.shape[0]
    T = activations.numel() // max(1, B * D)
    eps = module.eps
    if eps is None:  # RMSNorm's default, as torch's kernel takes it
        eps = torch.finfo(activations.dtype).eps
    out = _norm_kernel_run(_normpsg.rows, module, activations, backprops, D, T, D, float(eps), rms)
    return {n: v.view(B, *shape) for n, v in out.items()}


def _kernel_or(kernel: Callable[..., Grads], fallback: Callable[[nn.Module, torch.Tensor, torch.Tensor], Grads]):
    """``kernel`` where :func:`_norm_kernel_takes`, else ``fallback`` (torch's ops in chunks)."""

    def run(module, activations, backprops):
        if _norm_kernel_takes(module, activations, backprops):
            return kernel(module, activations, backprops)
        return fallback(module, activations, backprops)

    return run


LAYER_NORM_RULE = _materialised_rule(
    _kernel_or(lambda m, a, g: _rows_norm_kernel(m, a, g, False), _in_chunks(_layer_norm_psg))
)
GROUP_NORM_RULE = _materialised_rule(_kernel_or(_group_norm_kernel, _in_chunks(_group_norm_psg)))
INSTANCE_NORM_RULE = _materialised_rule(
    _kernel_or(_instance_norm_kernel, _in_chunks(_instance_norm_psg)), check=_instance_norm_check
)
RMS_NORM_RULE = _materialised_rule(
    _kernel_or(lambda m, a, g: _rows_norm_kernel(m, a, g, True), _in_chunks(_rms_norm_psg))
)


# --------------------------------------------------------------------------- registry

RULES: dict[type[nn.Module], LayerRule] = {
    nn.Linear: LINEAR_RULE,
    nn.Conv1d: CONV_RULE,
    nn.Conv2d: CONV_RULE,
    nn.Conv3d: CONV_RULE,
    nn.Embedding: EMBEDDING_RULE,
    nn.LayerNorm: LAYER_NORM_RULE,
    nn.GroupNorm: GROUP_NORM_RULE,
    nn.InstanceNorm1d: INSTANCE_NORM_RULE,
    nn.InstanceNorm2d: INSTANCE_NORM_RULE,
    nn.InstanceNorm3d: INSTANCE_NORM_RULE,
    nn.RMSNorm: RMS_NORM_RULE,
}


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule for ``module``'s exact type, or ``None`` (subclasses may override forward).

    Raises ``ValueError`` (with the fix) for a configuration that no per-sample engine can
    train privately: ``nn.Embedding`` with ``max_norm`` or ``sparse=True``, ``InstanceNorm``
    with ``track_running_stats=True``.
    """
    rule = RULES.get(type(module))
    if rule is not None and rule.check is not None:
        rule.check(module)
    return rule
