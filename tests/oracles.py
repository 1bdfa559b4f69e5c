"""Shared float64 oracles for per-sample gradients.

The reference is the naive loop: one forward and one backward pass per sample.
It is slow and obviously correct, which is what an oracle should be.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["per_sample_grads_loop", "flat_norms"]


def per_sample_grads_loop(model: nn.Module, loss_fn, inputs, targets) -> dict[str, torch.Tensor]:
    """Exact per-sample gradients by looping over the batch.

    For each sample ``i`` the gradient of ``loss_fn(model(inputs[i:i+1]), targets[i:i+1])``
    (the per-sample loss; ``loss_fn`` should reduce by sum) is taken with respect to every
    trainable named parameter of ``model``. Returns ``{name: [B, *param.shape]}``.
    Parameters that receive no gradient for a sample get zeros. With ``B == 0`` each entry
    is an empty ``[0, *shape]`` tensor. The model's ``.grad`` fields are left cleared.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    batch = len(inputs)
    out: dict[str, list[torch.Tensor]] = {n: [] for n in params}
    with torch.enable_grad():
        for i in range(batch):
            model.zero_grad(set_to_none=True)
            loss = loss_fn(model(inputs[i : i + 1]), targets[i : i + 1])
            loss.backward()
            for n, p in params.items():
                g = p.grad
                out[n].append(torch.zeros_like(p) if g is None else g.detach().clone())
    model.zero_grad(set_to_none=True)
    return {
        n: (torch.stack(gs) if gs else params[n].new_zeros((0, *params[n].shape)))
        for n, gs in out.items()
    }


def flat_norms(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-sample L2 norm over all parameters: ``[B]``."""
    gs = list(grads.values())
    if not gs:
        raise ValueError("flat_norms needs at least one gradient tensor")
    sq = sum(g.flatten(1).pow(2).sum(1) for g in gs)
    return sq.sqrt()
