"""Poisson sampling: the batch sampler that the accountants model.

The accountants (``accountants.rdp``, ``accountants.prv``) bound the privacy loss of the
Poisson-subsampled Gaussian mechanism: every example joins each batch independently
with probability ``sample_rate`` (Abadi et al. 2016; Mironov, Talwar, Zhang 2019). A
shuffled loader with fixed-size batches is a different mechanism, so dpclip replaces the
user's sampler with this one rather than pretending the two are the same.

A Poisson batch can be empty; ``EmptyBatchCollate`` turns an empty list of samples into
tensors with a zero batch dimension, so the training step still runs (and still adds
noise and records an accounting step).
"""

from __future__ import annotations

import math

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.data._utils.collate import default_collate

__all__ = ["PoissonBatchSampler", "EmptyBatchCollate", "StepPlan", "LogicalBatchSampler", "BatchMemoryManager", "empty_batch_collate", "loader_like"]


class PoissonBatchSampler(Sampler[list[int]]):
    """Yields ``steps`` batches; each index is in each batch with probability ``sample_rate``.

    Args:
        num_samples: dataset size N.
        sample_rate: q in (0, 1]; the expected batch size is ``q * N``.
        steps: batches per epoch (default ``round(1 / q)``: one expected pass over the data).
        generator: an explicit ``torch.Generator`` (seeded by the caller); its state moves
            with every batch, so saving it saves the sampler's position.
        rank, world_size: sample only the shard ``rank::world_size`` of the indices (one
            process of a distributed run, :mod:`dpclip.distributed`). Each process samples its
            own shard independently at ``sample_rate``, so the union over the processes is a
            Poisson sample of the whole data set at ``sample_rate``: what the accountant
            models. Each process needs its own generator stream.
    """

    def __init__(
        self, num_samples: int, sample_rate: float, steps: int | None = None, generator: torch.Generator | None = None,
        *, rank: int = 0, world_size: int = 1,
    ) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
            raise ValueError(f"num_samples must be a positive integer (the dataset size); got {num_samples!r}")
        if not 0.0 < float(sample_rate) <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1] (expected batch size / dataset size); got {sample_rate}")
        if steps is None:
            steps = max(1, round(1.0 / float(sample_rate)))
        if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
            raise ValueError(f"steps must be a positive integer (batches per epoch); got {steps!r}")
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size <= 0:
            raise ValueError(f"world_size must be a positive integer; got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an integer in [0, world_size={world_size}); got {rank!r}")
        self.num_samples = num_samples
        self.sample_rate = float(sample_rate)
        self.steps = steps
        self.generator = generator if generator is not None else torch.Generator()
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        if self.world_size == 1:
            for _ in range(self.steps):
                draws = torch.rand(self.num_samples, generator=self.generator)
                yield torch.nonzero(draws < self.sample_rate, as_tuple=False).flatten().tolist()
            return
        shard = torch.arange(self.rank, self.num_samples, self.world_size)
        for _ in range(self.steps):
            draws = torch.rand(len(shard), generator=self.generator)
            yield shard[draws < self.sample_rate].tolist()


@dataclass(frozen=True)
class EmptyBatchCollate:
    """Collate function that also handles an empty batch.

    ``collate`` is the loader's own function; ``example`` is one collated batch of a single
    sample (e.g. ``collate([dataset[0]])``), whose structure and per-sample shapes an empty
    batch copies with a zero batch dimension.
    """

    collate: Callable[[list[Any]], Any]
    example: Any

    def __call__(self, samples: Sequence[Any]) -> Any:
        if len(samples) > 0:
            return self.collate(list(samples))
        return _empty_like(self.example)


@dataclass
class StepPlan:
    """What the engine needs to know about each physical batch the loader hands out.

    The loader's :class:`LogicalBatchSampler` appends ``(is_last, size)`` when it yields a
    physical batch; the engine pops one entry per ``optimizer.step()``. A physical batch
    with ``is_last`` closes its logical batch: only then is noise added, the optimizer
    allowed to move and one accounting step recorded. The entries are in the order the
    batches were yielded, so prefetching workers do not reorder them. A new pass over the
    loader (``iter(loader)``) clears the plan and sets ``restarted``: the engine then drops
    the clipped sums of a logical batch the user left unfinished (never released, so
    never accounted) instead of mixing them with another Poisson draw.
    """

    entries: deque = field(default_factory=deque)
    restarted: bool = False

    def new_pass(self) -> None:
        self.entries.clear()
        self.restarted = True

    def push(self, is_last: bool, size: int) -> None:
        self.entries.append((bool(is_last), int(size)))

    def pop(self) -> tuple[bool, int] | None:
        return self.entries.popleft() if self.entries else None


class LogicalBatchSampler(Sampler[list[int]]):
    """Poisson logical batches, each handed out as one or more physical batches.

    * per-sample clipping with virtual batches (``max_physical_batch_size``): the logical
      batch is cut into consecutive physical batches of at most that size (how it is cut
      does not matter for privacy: every sample is clipped on its own);
    * batch clipping with micro-batches (``unit_of``): example ``i`` belongs to the
      micro-batch unit ``unit_of[i]`` (drawn once, uniformly, independent of the data), and
      each logical batch is handed out one unit at a time, empty units skipped. Adding or
      removing one example then changes exactly one unit of one step, so the clipped unit
      sums have sensitivity ``2 C`` (DESIGN.md §5) and the sampling stays Poisson;
    * otherwise one physical batch per logical batch.

    A logical batch with no example is handed out as one empty batch, so the step (noise and
    accounting) still happens.
    """

    def __init__(
        self,
        poisson: PoissonBatchSampler | Sampler[list[int]],
        plan: StepPlan,
        max_physical_batch_size: int | None = None,
        unit_of: torch.Tensor | None = None,
    ) -> None:
        if max_physical_batch_size is not None and unit_of is not None:
            raise ValueError(
                "batch clipping hands out one micro-batch unit per physical batch (batch_clip_size); "
                "max_physical_batch_size would split a unit and change what is clipped. Lower batch_clip_size instead"
            )
        if max_physical_batch_size is not None:
            if isinstance(max_physical_batch_size, bool) or not isinstance(max_physical_batch_size, int) or (
                max_physical_batch_size <= 0
            ):
                raise ValueError(
                    f"max_physical_batch_size must be a positive integer (samples per forward pass); "
                    f"got {max_physical_batch_size!r}"
                )
        self.poisson = poisson
        self.plan = plan
        self.max_physical_batch_size = max_physical_batch_size
        self.unit_of = unit_of
        self.units = int(unit_of.max()) + 1 if unit_of is not None and unit_of.numel() else 1

    @property
    def sample_rate(self) -> float | None:
        """The Poisson sample rate (``None`` when the logical batches are the user's own)."""
        return getattr(self.poisson, "sample_rate", None)

    def with_physical_size(self, max_physical_batch_size: int) -> "LogicalBatchSampler":
        """The same logical batches (same generator and plan), cut to ``max_physical_batch_size``."""
        return LogicalBatchSampler(self.poisson, self.plan, max_physical_batch_size, self.unit_of)

    def __len__(self) -> int:
        """Logical batches per pass times the expected number of physical batches in each (rounded up)."""
        per_step = 1
        if isinstance(self.poisson, PoissonBatchSampler):
            expected = self.poisson.sample_rate * self.poisson.num_samples
        else:
            expected = getattr(self.poisson, "batch_size", 1) or 1
        if self.unit_of is not None:
            per_step = self.units
        elif self.max_physical_batch_size is not None:
            per_step = max(1, math.ceil(expected / self.max_physical_batch_size))
        return len(self.poisson) * per_step

    def split(self, batch: list[int]) -> list[list[int]]:
        """The physical batches of one logical batch (at least one, possibly empty)."""
        if not batch:
            return [[]]
        if self.unit_of is not None:
            ids = self.unit_of[torch.as_tensor(batch, dtype=torch.long)]
            order = torch.argsort(ids, stable=True)
            ids_sorted = ids[order].tolist()
            items = [batch[i] for i in order.tolist()]
            chunks: list[list[int]] = []
            previous = None
            for unit, item in zip(ids_sorted, items):
                if unit != previous:
                    chunks.append([])
                    previous = unit
                chunks[-1].append(item)
            return chunks
        if self.max_physical_batch_size is not None:
            k = self.max_physical_batch_size
            return [batch[i : i + k] for i in range(0, len(batch), k)]
        return [batch]

    def __iter__(self) -> Iterator[list[int]]:
        self.plan.new_pass()
        for batch in self.poisson:
            chunks = self.split(batch)
            for j, chunk in enumerate(chunks):
                self.plan.push(j == len(chunks) - 1, len(chunk))
                yield chunk


def _empty_like(batch: Any) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.new_empty((0, *batch.shape[1:]))
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_empty_like(b) for b in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_empty_like(b) for b in batch)
    if isinstance(batch, dict):
        return {k: _empty_like(v) for k, v in batch.items()}
    raise TypeError(
        f"cannot build an empty batch for a {type(batch).__name__}; return tensors (or tuples/dicts of "
        "tensors) from the dataset, or pass a collate_fn that accepts an empty list"
    )


def empty_batch_collate(collate_fn: Callable[[list[Any]], Any] | None, dataset: Any) -> EmptyBatchCollate:
    """Wrap ``collate_fn`` (default: torch's) so that an empty Poisson batch collates too."""
    collate = collate_fn if collate_fn is not None else default_collate
    return EmptyBatchCollate(collate, collate([dataset[0]]))


def loader_like(user: DataLoader, batch_sampler: Sampler[list[int]], collate_fn: Callable[[list[Any]], Any]) -> DataLoader:
    """A loader over ``user``'s dataset with ``batch_sampler`` and ``collate_fn``, and ``user``'s worker settings."""
    kwargs: dict[str, Any] = dict(
        batch_sampler=batch_sampler,
        collate_fn=collate_fn,
        num_workers=user.num_workers,
        pin_memory=user.pin_memory,
        timeout=user.timeout,
        worker_init_fn=user.worker_init_fn,
        multiprocessing_context=user.multiprocessing_context,
        persistent_workers=user.persistent_workers,
    )
    if user.num_workers > 0:
        kwargs["prefetch_factor"] = user.prefetch_factor
    return DataLoader(user.dataset, **kwargs)


class BatchMemoryManager:
    """Virtual batches: the same logical (Poisson) batches, in physical batches that fit in memory.

    Opacus-compatible::

        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=64, optimizer=optimizer) as physical:
            for x, y in physical:
                loss_fn(model(x), y).backward()
                optimizer.step()        # moves the model only after the last physical batch
                optimizer.zero_grad()

    ``data_loader`` must be the loader ``make_private`` returned. Each physical batch's
    clipped per-sample gradients are added up; the optimizer step of the last physical batch
    of a logical batch adds the noise, sets ``p.grad`` and records the one accounting step;
    the others leave every ``p.grad`` at ``None``, so torch's optimizers skip them. The result
    equals one step on the whole logical batch. ``optimizer`` is accepted for Opacus
    compatibility and not needed.
    """

    def __init__(self, *, data_loader: DataLoader, max_physical_batch_size: int, optimizer: Any = None) -> None:
        sampler = getattr(data_loader, "batch_sampler", None)
        if not isinstance(sampler, LogicalBatchSampler):
            raise ValueError(
                "BatchMemoryManager needs the data loader that make_private returned (it knows where each "
                f"logical batch ends); got a loader with a {type(sampler).__name__}"
            )
        self._loader = loader_like(data_loader, sampler.with_physical_size(max_physical_batch_size), data_loader.collate_fn)

    def __enter__(self) -> DataLoader:
        return self._loader

    def __exit__(self, *exc: Any) -> None:
        return None
