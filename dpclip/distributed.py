"""Data-parallel DP-SGD over ``torch.distributed`` (one process per device or CPU group).

Wrap the model in :class:`DPDDP` (Opacus's ``DifferentiallyPrivateDistributedDataParallel``
under the same short name) and call ``make_private`` on every process with the same settings::

    torch.distributed.init_process_group("gloo")          # or "nccl" on GPUs
    model = DPDDP(Net())                                  # rank 0's weights go to every process
    model, optimizer, loader = PrivacyEngine().make_private(
        module=model, optimizer=optimizer, data_loader=loader,   # loader: the whole data set
        noise_multiplier=1.0, max_grad_norm=1.0)

What each step does (``dpclip/privacy_engine.py``):

1. **Sampling.** Process ``r`` of ``W`` samples the shard ``r::W`` of the data set, each
   example independently with probability ``q = batch_size / len(dataset)`` (the user's
   loader's ``batch_size`` is the *global* expected batch size), from its own generator
   stream. The union over processes is a Poisson sample of the whole data set at rate ``q``,
   which is what the accountant models.
2. **Clipping.** Each process clips its own examples' gradients (any engine mode).
3. **Sum.** The clipped sums are added across processes (``all_reduce``, one flat buffer).
4. **Noise, once.** Process 0 adds ``N(0, (sigma * sensitivity)^2)`` (plain or secure) and
   broadcasts the noisy sum, so the noise is drawn once per step, never once per process
   (that would be ``sqrt(W)`` times too much) and never skipped; every process then holds the
   same gradient, divides by the expected global batch size ``q N`` and takes the same
   optimizer step, so the replicas stay equal.
5. **Controllers.** The per-example norms are gathered from every process; process 0
   privatises the statistics and moves the thresholds, and broadcasts them.
6. **Accounting.** Every process records the same steps, so each reports the same epsilon.

Not supported (refused by ``make_private`` with the reason): ``torch.nn.parallel.
DistributedDataParallel`` itself (its reducer averages *unclipped* gradients during the
backward pass; use :class:`DPDDP`), ``clipping="batch"`` (a micro-batch unit would span
processes) and ``poisson_sampling=False`` (every process would read the same batches).

Design notes: docs/design.md P8.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DPDDP", "DifferentiallyPrivateDistributedDataParallel", "all_gather_rows", "all_reduce_sum_",
           "broadcast_", "world"]


class DPDDP(nn.Module):
    """Marks ``module`` for distributed private training and makes the replicas start equal.

    At construction the parameters and buffers of process 0 are broadcast to every process
    (``torch.distributed`` must be initialised). ``forward`` is the module's own: no gradient
    hook is installed here; ``make_private`` synchronises the *clipped* sums itself.

    Args:
        module: the model, already on this process's device.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "DPDDP needs torch.distributed to be initialised in this process. Fix: call "
                "torch.distributed.init_process_group(backend) first (gloo on CPU, nccl on GPUs)"
            )
        self.module = module
        with torch.no_grad():
            broadcast_([t for t in module.parameters()] + [b for b in module.buffers()])

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        return self.module(*args, **kwargs)


DifferentiallyPrivateDistributedDataParallel = DPDDP  # Opacus's name


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process (``(0, 1)`` without ``torch.distributed``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.zeros(0)


def _unflat_(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def all_reduce_sum_(tensors: list[torch.Tensor]) -> None:
    """Sum each tensor over the processes, in place (one collective per dtype)."""
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        group = [t for t in tensors if t.dtype == dtype]
        flat = _flat(group)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        _unflat_(flat, group)


def broadcast_(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Overwrite each tensor with process ``src``'s values, in place (one collective per dtype)."""
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        group = [t for t in tensors if t.dtype == dtype]
        flat = _flat(group)
        dist.broadcast(flat, src=src)
        _unflat_(flat, group)


def all_gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x [n_r, ...]`` of every process along dim 0, in rank order: ``[sum n_r, ...]``.

    The row counts may differ between processes (Poisson batches)."""
    _, size = world()
    n = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    counts = [torch.zeros_like(n) for _ in range(size)]
    dist.all_gather(counts, n)
    counts_i = [int(c.item()) for c in counts]
    most = max(counts_i) if counts_i else 0
    padded = x.new_zeros((most, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.zeros_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts_i)])
