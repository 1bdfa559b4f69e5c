"""Batched exact per-sample gradients for the user's own ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``.

The module is not replaced or modified. From the inputs captured by the forward hook (``input``
and optionally ``h_0`` / ``(h_0, c_0)``) and the gradients of its outputs (``output``, ``h_n``
and, for an LSTM, ``c_n``; ``None`` means zeros) the recurrence is recomputed in Python, unrolled
over time, layer by layer and direction by direction, with the module's own weights. Autograd
then gives, in one backward pass over the whole batch, the gradient with respect to

* ``gi = x W_ih^T + b_ih`` (all time steps at once, ``[T, B, G]``),
* ``gh_t = h_{t-1} W_hh^T + b_hh`` at every step (``[B, G]`` each), and
* for an LSTM with ``proj_size > 0``, the projected state ``h_t = m_t W_hr^T``.

Every weight of a recurrent layer enters only through these affine maps, and within one sample
the gradient of the batch loss with respect to them is that sample's own (samples do not
interact), so the per-sample weight gradients are sums over time of outer products::

    grad W_ih[b] = sum_t d gi_t[b]^T x_t[b]       grad b_ih[b] = sum_t d gi_t[b]
    grad W_hh[b] = sum_t d gh_t[b]^T h_{t-1}[b]   grad b_hh[b] = sum_t d gh_t[b]
    grad W_hr[b] = sum_t d h_t[b]^T m_t[b]

For the GRU this is exact as it stands: its candidate gate is ``tanh(gi_n + r * gh_n)`` with
``gh_n = W_hn h + b_hn``, and ``d gh_n = r * d(pre-activation of n)`` is what autograd returns
for ``gh_t``; no special case is needed. The result equals the per-sample loop up to
floating-point summation order.

Before the gradients are trusted the recomputed ``(output, h_n[, c_n])`` is compared with the
module's own (native) forward on the same inputs; on a mismatch the exact per-sample loop
(:func:`dpclip.grad_sample.vmap.rnn_per_sample_grads`) is used instead, with a warning.

Anything this path does not handle is sent to that loop as well (which handles it or raises the
error it documents): ``PackedSequence`` inputs, dropout between layers in train mode, unbatched
2-D inputs, keyword arguments other than ``hx``, subclasses of the three modules (their
``forward`` may differ), parametrized weights, and dtypes other than float32 / float64.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .vmap import (
    _constants,
    _hooks_disabled,
    _pair,
    _resolve_params,
    _split,
    _tree_map,
    rnn_per_sample_grads,
)

__all__ = [
    "expand",
    "rnn_per_sample_grads_batched",
    "rnn_per_sample_sq_norms",
    "unsupported_reason",
]

_TYPES = (nn.RNN, nn.LSTM, nn.GRU)
_DTYPES = (torch.float32, torch.float64)


def _split_call(inputs: Any, kwargs: dict | None):
    """``(x, hx)`` from the captured call, or ``None`` if the call is not the plain form."""
    if not isinstance(inputs, tuple):
        inputs = (inputs,)
    kwargs = dict(kwargs or {})
    if not inputs or len(inputs) > 2 or set(kwargs) - {"hx"}:
        return None
    if len(inputs) == 2 and "hx" in kwargs:
        return None
    x = inputs[0]
    hx = inputs[1] if len(inputs) == 2 else kwargs.get("hx")
    return x, hx


def unsupported_reason(
    module: nn.Module, inputs: Any, kwargs: dict | None = None
) -> str | None:
    """Why :func:`rnn_per_sample_grads_batched` would hand this call to the loop (``None``: it
    will not)."""
    if type(module) not in _TYPES:
        return f"{type(module).__name__} is not exactly nn.RNN / nn.LSTM / nn.GRU"
    if torch.nn.utils.parametrize.is_parametrized(module):
        return "parametrized weights"
    if module.training and module.dropout > 0 and module.num_layers > 1:
        return "dropout between layers in train mode"
    call = _split_call(inputs, kwargs)
    if call is None:
        return "arguments other than (input, hx)"
    x, hx = call
    if isinstance(x, nn.utils.rnn.PackedSequence):
        return "PackedSequence input"
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        return "input is not a batched 3-D tensor"
    if x.dtype not in _DTYPES:
        return f"dtype {x.dtype}"
    L, D = module.num_layers, 2 if module.bidirectional else 1
    B = x.shape[0 if module.batch_first else 1]
    H = module.hidden_size
    h_out = module.proj_size if isinstance(module, nn.LSTM) and module.proj_size > 0 else H
    if x.shape[2] != module.input_size:
        return "input size does not match the module"
    states = []
    if hx is not None:
        if isinstance(module, nn.LSTM):
            if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
                return "LSTM hx is not a pair (h_0, c_0)"
            states = [(hx[0], h_out), (hx[1], H)]
        else:
            states = [(hx, H)]
    for s, size in states:
        if not isinstance(s, torch.Tensor) or tuple(s.shape) != (L * D, B, size):
            return "initial state of unexpected shape"
        if s.dtype != x.dtype:
            return "initial state of another dtype"
    for name in module._flat_weights_names:
        w = getattr(module, name)
        if not isinstance(w, torch.Tensor) or w.dtype != x.dtype:
            return f"weight {name} missing or of another dtype"
    return None


def _tolerance(x: torch.Tensor) -> tuple[float, float]:
    if x.dtype == torch.float64:
        return 1e-7, 1e-9
    if x.is_cuda:  # cuDNN may use TF32 for the native forward
        return 5e-3, 5e-3
    return 1e-4, 1e-5


def _recompute(module, W: dict[str, torch.Tensor], x: torch.Tensor, hx: Any):
    """Unrolled forward. ``x`` is time-major ``[T, B, I]``. Returns ``(out, h_n, c_n, records)``.

    ``records`` holds per (layer, direction) the tensors the weight gradients are built from:
    the layer input, ``gi``, and per step ``h_{t-1}``, ``gh_t`` (and ``m_t``, ``h_t`` with a
    projection), in natural time order.
    """
    mode = module.mode
    L, D = module.num_layers, 2 if module.bidirectional else 1
    H = module.hidden_size
    lstm = mode == "LSTM"
    P = module.proj_size if lstm else 0
    h_out = P or H
    T, B = x.shape[0], x.shape[1]
    if hx is None:
        h0 = x.new_zeros(L * D, B, h_out)
        c0 = x.new_zeros(L * D, B, H) if lstm else None
    elif lstm:
        h0, c0 = hx
    else:
        h0, c0 = hx, None
    act = torch.tanh if mode in ("RNN_TANH", "GRU", "LSTM") else torch.relu

    records = []
    hn, cn = [], []
    layer_in = x
    for layer in range(L):
        outs = []
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w_ih, w_hh = W["weight_ih" + sfx], W["weight_hh" + sfx]
            b_ih, b_hh = W.get("bias_ih" + sfx), W.get("bias_hh" + sfx)
            w_hr = W.get("weight_hr" + sfx) if P else None
            # For RNN and LSTM, W_ih x_t + b_ih and W_hh h_{t-1} + b_hh enter only through their
            # sum z_t, so the gradients w.r.t. the z_t serve both matrices (and both biases).
            # The GRU's candidate gate scales the hidden-hidden part by r: both are kept apart.
            fused = mode != "GRU"
            if fused and b_ih is not None:
                gi = F.linear(layer_in, w_ih, b_ih + b_hh)  # [T, B, G]
            else:
                gi = F.linear(layer_in, w_ih, b_ih)
            if not fused and not gi.requires_grad:  # first layer: inputs and weights constant
                gi.requires_grad_(True)
            gis = gi.unbind(0)  # one stack in the backward, not T zero-filled [T, B, G]
            w_hh_t = w_hh.t()
            h = h0[layer * D + d]
            c = c0[layer * D + d] if lstm else None
            hprev, gh_list, m_list, h_list = [None] * T, [None] * T, [None] * T, [None] * T
            for t in range(T - 1, -1, -1) if d else range(T):
                hprev[t] = h
                if fused:
                    gh = torch.addmm(gis[t], h, w_hh_t)  # z_t
                else:
                    gh = F.linear(h, w_hh, b_hh)
                if not gh.requires_grad:  # first step of the first layer from a constant h_0
                    gh.requires_grad_(True)
                gh_list[t] = gh
                if lstm:
                    s = torch.sigmoid(gh)  # i, f, (unused), o in one call
                    g_ = torch.tanh(gh[:, 2 * H : 3 * H])
                    c = torch.addcmul(s[:, H : 2 * H] * c, s[:, :H], g_)
                    m = s[:, 3 * H :] * torch.tanh(c)
                    if P:
                        m_list[t] = m
                        h = F.linear(m, w_hr)
                    else:
                        h = m
                elif mode == "GRU":
                    r_i, z_i, n_i = gis[t].chunk(3, 1)
                    r_h, z_h, n_h = gh.chunk(3, 1)
                    r = torch.sigmoid(r_i + r_h)
                    z = torch.sigmoid(z_i + z_h)
                    n = torch.tanh(n_i + r * n_h)
                    h = n + z * (h - n)
                else:
                    h = act(gh)
                h_list[t] = h
            outs.append(torch.stack(h_list))
            hn.append(h)
            if lstm:
                cn.append(c)
            records.append(
                dict(
                    sfx=sfx,
                    x=layer_in,
                    gi=None if fused else gi,
                    hprev=hprev,
                    gh=gh_list,
                    m=m_list,
                    h=h_list,
                )
            )
        layer_in = torch.cat(outs, 2) if D == 2 else outs[0]
    return layer_in, torch.stack(hn), (torch.stack(cn) if lstm else None), records


def _structure(module, out, hn, cn):
    if module.batch_first:
        out = out.transpose(0, 1)
    return (out, (hn, cn)) if cn is not None else (out, hn)


def _check_against_native(module, W, x_orig, hx, mine) -> str | None:
    args = (x_orig,) if hx is None else (x_orig, hx)
    with torch.no_grad(), _hooks_disabled(module):
        ref = functional_call(module, W, args)
    rtol, atol = _tolerance(x_orig)
    ref_leaves, my_leaves = [], []
    _tree_map(ref_leaves.append, ref)
    _tree_map(my_leaves.append, mine)
    if len(ref_leaves) != len(my_leaves):
        return "output structure differs"
    for a, b in zip(my_leaves, ref_leaves):
        if a.shape != b.shape:
            return f"shape {tuple(a.shape)} vs {tuple(b.shape)}"
        if not torch.allclose(a.detach(), b, rtol=rtol, atol=atol):
            return f"max abs difference {(a.detach() - b).abs().max().item():.3g}"
    return None


@dataclass(frozen=True)
class _NotBatched:
    """Why the batched path does not apply: an unsupported call, or a recomputed forward that
    differs from the module's own (``mismatch``)."""

    reason: str
    mismatch: bool = False


def _unrolled_grads(
    module: nn.RNNBase,
    inputs: tuple[Any, ...],
    grad_output: Any,
    params: dict[str, torch.Tensor] | None,
    kwargs: dict[str, Any] | None,
    check_output: bool,
) -> tuple[dict[str, torch.Tensor], int, list[dict[str, Any]]] | _NotBatched:
    """Recompute the recurrence and backpropagate the captured output gradients once.

    Returns ``(diff, batch, layers)``: ``diff`` the parameters to differentiate, and per (layer,
    direction) a dict with ``sfx`` and the time-major tensors the weight gradients are built
    from: ``x [T, B, I]`` with ``dgi [T, B, G]`` (W_ih, b_ih), ``hprev [T, B, H]`` with
    ``dgh [T, B, G]`` (W_hh, b_hh), and with a projection ``m [T, B, H]`` with ``dh [T, B, P]``
    (W_hr); ``layers`` is empty when the batch is empty or nothing is differentiated. Returns
    :class:`_NotBatched` when this path does not apply or the recomputed forward does not match
    the module's own; the caller then uses the per-sample loop.
    """
    if not isinstance(inputs, tuple):
        inputs = (inputs,)
    reason = unsupported_reason(module, inputs, kwargs)
    if reason is not None:
        return _NotBatched(reason)
    x_orig, hx = _split_call(inputs, kwargs)
    x_orig = x_orig.detach()
    hx = _tree_map(torch.Tensor.detach, hx)
    if isinstance(hx, list):
        hx = tuple(hx)
    grad_output = _tree_map(torch.Tensor.detach, grad_output)
    diff = _resolve_params(module, params)
    batch = x_orig.shape[0 if module.batch_first else 1]
    if batch == 0 or not diff:
        return diff, batch, []
    W = {n: p.detach() for n, p in _constants(module, diff).items()}
    W.update(diff)
    W = {n: W[n] for n in module._flat_weights_names}
    x = x_orig.transpose(0, 1) if module.batch_first else x_orig

    tensors: list[torch.Tensor] = []
    template = _split(grad_output, tensors)
    with torch.enable_grad():
        out, hn, cn, records = _recompute(module, W, x, hx)
        mine = _structure(module, out, hn, cn)
        if check_output:
            bad = _check_against_native(module, W, x_orig, hx, mine)
            if bad is not None:
                return _NotBatched(
                    f"the recomputed {type(module).__name__} forward differs from the module's ({bad})",
                    mismatch=True,
                )
        pairs: list = []
        _pair(mine, template, tensors, pairs)
        outs = [o for o, c in pairs if c is not None]
        cots = [c for o, c in pairs if c is not None]
        proj = isinstance(module, nn.LSTM) and module.proj_size > 0
        targets: list[torch.Tensor] = []
        for rec in records:
            targets.extend(rec["gh"])
            if rec["gi"] is not None:
                targets.append(rec["gi"])
            if proj:
                targets.extend(rec["h"])
        if outs:
            gs = list(torch.autograd.grad(outs, targets, cots, allow_unused=True))
        else:
            gs = [None] * len(targets)

    def zeros_if_none(g, like):
        return torch.zeros_like(like) if g is None else g

    layers: list[dict[str, Any]] = []
    T = x.shape[0]
    k = 0
    for rec in records:
        dgh = torch.stack([zeros_if_none(g, t) for g, t in zip(gs[k : k + T], rec["gh"])])
        k += T
        if rec["gi"] is None:  # RNN / LSTM: gi_t and gh_t enter only through their sum
            dgi = dgh
        else:
            dgi = zeros_if_none(gs[k], rec["gi"])
            k += 1
        layer = dict(
            sfx=rec["sfx"], x=rec["x"].detach(), dgi=dgi.detach(),
            hprev=torch.stack([h.detach() for h in rec["hprev"]]), dgh=dgh.detach(), m=None, dh=None,
        )
        if proj:
            layer["dh"] = torch.stack([zeros_if_none(g, t) for g, t in zip(gs[k : k + T], rec["h"])]).detach()
            k += T
            layer["m"] = torch.stack([t.detach() for t in rec["m"]])
        layers.append(layer)
    return diff, batch, layers


def _weight_pairs(layer: dict[str, Any]):
    """``(weight, bias, a [T, B, d], g [T, B, p])`` for the affine maps of one (layer, direction)."""
    sfx = layer["sfx"]
    yield "weight_ih" + sfx, "bias_ih" + sfx, layer["x"], layer["dgi"]
    yield "weight_hh" + sfx, "bias_hh" + sfx, layer["hprev"], layer["dgh"]
    if layer["dh"] is not None:
        yield "weight_hr" + sfx, None, layer["m"], layer["dh"]


def rnn_per_sample_grads_batched(
    module: nn.RNNBase,
    inputs: tuple[Any, ...],
    grad_output: Any,
    *,
    params: dict[str, torch.Tensor] | None = None,
    kwargs: dict[str, Any] | None = None,
    check_output: bool = True,
) -> dict[str, torch.Tensor]:
    """Exact per-sample gradients of an ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``, batched.

    Same contract as :func:`dpclip.grad_sample.vmap.rnn_per_sample_grads` (and the same result
    up to summation order): ``inputs`` is ``(input,)`` or ``(input, hx)`` as captured (``hx``
    may instead be in ``kwargs``), ``grad_output`` mirrors the module's output ``(output, h_n)``
    / ``(output, (h_n, c_n))`` with ``None`` for zeros (a bare tensor is the gradient of
    ``output``); the batch is on dim 0 of ``input`` / ``output`` if ``batch_first`` else dim 1,
    on dim 1 of the states. ``params`` selects (and gives the values of) the parameters to
    differentiate. Returns ``{name: [B, *shape]}``.

    Calls this path does not support (see :func:`unsupported_reason`) go to the per-sample
    loop. With ``check_output`` (default) the recomputed forward is compared with the module's
    native one first, and a mismatch falls back to the loop with a ``RuntimeWarning``.
    """
    got = _unrolled_grads(module, inputs, grad_output, params, kwargs, check_output)
    if isinstance(got, _NotBatched):
        if not got.mismatch:  # unsupported call: the loop handles it or raises
            return rnn_per_sample_grads(module, inputs, grad_output, params=params, kwargs=kwargs)
        warnings.warn(
            f"rnn_per_sample_grads_batched: {got.reason}; using the exact per-sample loop instead",
            RuntimeWarning,
            stacklevel=2,
        )
        return rnn_per_sample_grads(module, inputs, grad_output, params=params, kwargs=kwargs)
    diff, batch, layers = got
    if not layers:
        return {n: p.new_zeros((batch, *p.shape)) for n, p in diff.items()}
    result: dict[str, torch.Tensor] = {}
    for layer in layers:
        for weight, bias, a, g in _weight_pairs(layer):
            if weight in diff:
                result[weight] = torch.einsum("tbg,tbi->bgi", g, a)
            if bias is not None and bias in diff:
                result[bias] = g.sum(0)
    missing = set(diff) - set(result)
    if missing:  # cannot happen for the three supported types; be loud rather than wrong
        raise RuntimeError(f"rnn_per_sample_grads_batched: no gradient built for {missing}")
    return {n: result[n] for n in diff}


def expand(
    module: nn.RNNBase,
    inputs: tuple[Any, ...],
    grad_output: Any,
    *,
    params: dict[str, torch.Tensor] | None = None,
    kwargs: dict[str, Any] | None = None,
) -> list | None:
    """The recurrent layer's affine maps as Linear pieces (:class:`dpclip.grad_sample.mha.Piece`),
    for ghost norms and the book-keeping contraction without ``[B, *weight]`` tensors.

    Each weight ``W`` of the module enters as ``sum_t g_t a_t^T`` per sample (see the module
    docstring), i.e. a Linear map over ``T`` positions with activations ``a [B, T, d]`` and
    output gradients ``g [B, T, p]``; its bias is ``sum_t g_t``. Only parameters in ``params``
    (default: all trainable) get pieces. Returns None where the batched path does not apply
    (unsupported call, recomputed forward differs, empty batch): the caller then materialises
    through :func:`rnn_per_sample_grads_batched`, which handles those cases.
    """
    from .mha import Piece

    got = _unrolled_grads(module, inputs, grad_output, params, kwargs, check_output=True)
    if isinstance(got, _NotBatched):
        return None
    diff, _, layers = got
    if not layers:
        return None
    pieces = []
    for layer in layers:
        for weight, bias, a, g in _weight_pairs(layer):
            w = weight if weight in diff else None
            b = bias if bias is not None and bias in diff else None
            if w is None and b is None:
                continue
            pieces.append(Piece(weight=w, bias=b, rows=None, a=a.transpose(0, 1), g=g.transpose(0, 1)))
    return pieces


def rnn_per_sample_sq_norms(
    module: nn.RNNBase,
    inputs: tuple[Any, ...],
    grad_output: Any,
    *,
    params: dict[str, torch.Tensor] | None = None,
    kwargs: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """``{name: [B]}`` squared per-sample gradient norms (from the materialised gradients)."""
    grads = rnn_per_sample_grads_batched(
        module, inputs, grad_output, params=params, kwargs=kwargs
    )
    return {n: g.flatten(1).pow(2).sum(1) for n, g in grads.items()}
