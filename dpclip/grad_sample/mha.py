"""``nn.MultiheadAttention``: per-sample gradients of its projections without ``torch.func``.

The module's parameters are linear maps around the attention core: the in-projections
(``in_proj_weight`` / ``in_proj_bias``, or ``q_proj_weight``, ``k_proj_weight``,
``v_proj_weight`` when key/value dimensions differ) and ``out_proj``. The module-level hooks
see the inputs ``(query, key, value)`` and ``dL/d(attn_output)`` only, so the attention core is
recomputed once for the whole batch (no per-sample loop, no vmap) and backpropagated to give
the gradients with respect to the projected ``q``, ``k``, ``v`` and the core's output ``o``.
Each parameter is then a set of Linear maps ``(activations, output gradients)`` (a row block
of ``in_proj_weight`` per projection) and gets the Linear rule's ghost norm or materialised
gradient and the book-keeping contraction.

Supported: ``batch_first=True``, no ``add_bias_kv``, no ``add_zero_attn``, dropout 0 or eval
mode, ``key_padding_mask`` / ``attn_mask`` (bool or float), ``is_causal``, and an attention-
weights output that does not reach the loss. Anything else goes to the ``torch.func``
fallback (:func:`supported` says which).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import rules as _rules

__all__ = ["supported", "expand", "per_sample_grads", "sq_norms", "clipped_sums"]

_SIG = inspect.signature(nn.MultiheadAttention.forward)


@dataclass
class Piece:
    """One Linear map inside the module: ``param[rows] += g^T a`` per sample (bias: ``sum_t g``)."""

    weight: str | None  # parameter name (relative to the module) of the weight, or None
    bias: str | None
    rows: slice | None  # row block of the parameter (in_proj_*), None for all rows
    a: torch.Tensor  # [B, T, d]
    g: torch.Tensor  # [B, T, p]


def _bind(inputs: tuple, kwargs: dict) -> dict:
    bound = _SIG.bind(None, *inputs, **kwargs)  # None stands for self
    bound.apply_defaults()
    args = dict(bound.arguments)
    args.pop("self", None)
    return args


def supported(module: nn.Module, inputs: tuple, kwargs: dict, grads: list) -> bool:
    """Whether this call can use the batched recomputation (else the torch.func fallback)."""
    if type(module) is not nn.MultiheadAttention or not module.batch_first:
        return False
    if module.bias_k is not None or module.bias_v is not None or module.add_zero_attn:
        return False
    if module.training and module.dropout > 0:
        return False
    if len(grads) > 1 and any(g is not None for g in grads[1:]):
        return False  # the attention weights reach the loss
    if not grads or grads[0] is None:
        return False
    try:
        args = _bind(inputs, kwargs)
    except TypeError:
        return False
    q = args["query"]
    return isinstance(q, torch.Tensor) and q.dim() == 3 and not q.is_nested


def _merged_mask(args: dict, B: int, H: int, L: int, S: int, dtype: torch.dtype):
    """The additive ``[B, H, L, S]`` (or broadcastable) float mask torch's forward applies."""
    mask = None
    attn_mask = args.get("attn_mask")
    kpm = args.get("key_padding_mask")
    if attn_mask is None and args.get("is_causal"):
        attn_mask = torch.ones(L, S, dtype=torch.bool, device=args["query"].device).triu(1)
    if attn_mask is not None:
        m = _additive(attn_mask, dtype)
        mask = m.view(1, 1, L, S) if m.dim() == 2 else m.view(B, H, L, S)
    if kpm is not None:
        k = _additive(kpm, dtype).view(B, 1, 1, S)
        mask = k if mask is None else mask + k
    return mask


def _additive(m: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A mask as an additive float mask: ``True`` (masked out) -> ``-inf``; float masks as given."""
    if m.dtype == torch.bool:
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill_(m, float("-inf"))
    return m.to(dtype)


def expand(module: nn.MultiheadAttention, inputs: tuple, kwargs: dict, grad_out: torch.Tensor) -> list[Piece]:
    """The module's Linear maps with their activations and output gradients for this call.

    ``grad_out`` is ``dL/d(attn_output)`` (the per-sample loss is summed), ``[B, L, E]``.
    """
    args = _bind(inputs, kwargs)
    query, key, value = args["query"], args["key"], args["value"]
    B, L, E = query.shape
    S = key.shape[1]
    H = module.num_heads
    Dh = E // H
    dtype = query.dtype
    if module._qkv_same_embed_dim:
        wq, wk, wv = module.in_proj_weight.chunk(3)
        names = [("in_proj_weight", slice(0, E)), ("in_proj_weight", slice(E, 2 * E)), ("in_proj_weight", slice(2 * E, 3 * E))]
    else:
        wq, wk, wv = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
        names = [("q_proj_weight", None), ("k_proj_weight", None), ("v_proj_weight", None)]
    if module.in_proj_bias is not None:
        bq, bk, bv = module.in_proj_bias.chunk(3)
    else:
        bq = bk = bv = None
    with torch.no_grad():
        q = F.linear(query, wq.detach(), None if bq is None else bq.detach())
        k = F.linear(key, wk.detach(), None if bk is None else bk.detach())
        v = F.linear(value, wv.detach(), None if bv is None else bv.detach())
        g_o = grad_out.to(dtype) @ module.out_proj.weight.detach().to(dtype)  # dL/do, [B, L, E]
    q.requires_grad_(True)
    k.requires_grad_(True)
    v.requires_grad_(True)
    mask = _merged_mask(args, B, H, L, S, dtype)
    with torch.enable_grad():
        qh = q.view(B, L, H, Dh).transpose(1, 2)
        kh = k.view(B, S, H, Dh).transpose(1, 2)
        vh = v.view(B, S, H, Dh).transpose(1, 2)
        scores = (qh @ kh.transpose(-1, -2)) * (1.0 / math.sqrt(Dh))
        if mask is not None:
            scores = scores + mask
        o = (torch.softmax(scores, dim=-1) @ vh).transpose(1, 2).reshape(B, L, E)
        dq, dk, dv = torch.autograd.grad(o, (q, k, v), g_o)
    o = o.detach()
    bias_name = "in_proj_bias" if module.in_proj_bias is not None else None
    pieces = []
    for (wname, rows), a, g in zip(names, (query, key, value), (dq, dk, dv)):
        pieces.append(Piece(wname, bias_name, rows, a.detach(), g.detach()))
    out_bias = "out_proj.bias" if module.out_proj.bias is not None else None
    pieces.append(Piece("out_proj.weight", out_bias, None, o, grad_out.detach().to(dtype)))
    return pieces


def _param(module: nn.Module, name: str) -> torch.Tensor:
    return module.get_parameter(name)


def _bias_rows(piece: Piece, module: nn.Module) -> slice | None:
    if piece.bias == "in_proj_bias":
        return piece.rows if piece.rows is not None else _in_proj_bias_rows(piece, module)
    return None


def _in_proj_bias_rows(piece: Piece, module: nn.Module) -> slice:
    E = module.embed_dim
    k = {"q_proj_weight": 0, "k_proj_weight": 1, "v_proj_weight": 2}[piece.weight]
    return slice(k * E, (k + 1) * E)


def per_sample_grads(module: nn.Module, pieces: list[Piece], wanted: set[str]) -> dict[str, torch.Tensor]:
    """``{name: [B, *shape]}`` for the trainable parameters in ``wanted``."""
    out: dict[str, torch.Tensor] = {}
    B = pieces[0].a.shape[0]

    def slot(name: str) -> torch.Tensor:
        if name not in out:
            p = _param(module, name)
            out[name] = pieces[0].a.new_zeros((B, *p.shape))
        return out[name]

    for pc in pieces:
        a, g = _rules._linear_flat(pc.a, pc.g)
        if pc.weight in wanted:
            w = torch.bmm(g.transpose(1, 2), a)
            if pc.rows is None:
                slot(pc.weight).add_(w)
            else:
                slot(pc.weight)[:, pc.rows] += w
        if pc.bias is not None and pc.bias in wanted:
            rows = _bias_rows(pc, module)
            if rows is None:
                slot(pc.bias).add_(g.sum(1))
            else:
                slot(pc.bias)[:, rows] += g.sum(1)
    return out


def sq_norms(module: nn.Module, pieces: list[Piece], wanted: set[str]) -> dict[str, torch.Tensor]:
    """``{name: [B]}``: a weight's row blocks are disjoint, so their squared norms add; the
    ghost norm or materialisation is chosen per block as for a Linear layer."""
    out: dict[str, torch.Tensor] = {}
    bias_sums: dict[str, list] = {}
    for pc in pieces:
        a, g = _rules._linear_flat(pc.a, pc.g)
        bias = pc.bias is not None and pc.bias in wanted
        bias_sq = None
        if pc.weight in wanted:
            T, d, p = a.shape[1], a.shape[2], g.shape[2]
            if _rules.use_ghost(T, d, p):
                sq, bias_sq = _rules._ghost_sq_and_bias(a, g, bias)
            else:
                sq = _rules._sq(torch.bmm(g.transpose(1, 2), a))
            out[pc.weight] = out[pc.weight] + sq if pc.weight in out else sq
        if bias:
            sq = bias_sq if bias_sq is not None else _rules._sq(g.sum(1))
            out[pc.bias] = out[pc.bias] + sq if pc.bias in out else sq
    return out


def clipped_sums(module: nn.Module, pieces: list[Piece], scales: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{name: sum_i scales[name][i] g_i}`` by one contraction per row block."""
    out: dict[str, torch.Tensor] = {}
    for pc in pieces:
        a, g = _rules._linear_flat(pc.a, pc.g)
        B, T, d = a.shape
        p = g.shape[-1]
        g2 = g.reshape(B * T, p)
        for name, rows, is_bias in ((pc.weight, pc.rows, False), (pc.bias, _bias_rows(pc, module) if pc.bias else None, True)):
            if name is None or name not in scales:
                continue
            s = scales[name].to(g2)
            s = s.repeat_interleave(T) if T > 1 else s
            val = g2.t() @ s if is_bias else (g2 * s[:, None]).t() @ a.reshape(B * T, d)
            if name not in out:
                out[name] = torch.zeros_like(_param(module, name), dtype=g2.dtype)
            if rows is None:
                out[name] += val
            else:
                out[name][rows] += val
    return out
