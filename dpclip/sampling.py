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

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Sampler
from torch.utils.data._utils.collate import default_collate

__all__ = ["PoissonBatchSampler", "EmptyBatchCollate"]


class PoissonBatchSampler(Sampler[list[int]]):
    """Yields ``steps`` batches; each index is in each batch with probability ``sample_rate``.

    Args:
        num_samples: dataset size N.
        sample_rate: q in (0, 1]; the expected batch size is ``q * N``.
        steps: batches per epoch (default ``round(1 / q)``: one expected pass over the data).
        generator: an explicit ``torch.Generator`` (seeded by the caller); its state moves
            with every batch, so saving it saves the sampler's position.
    """

    def __init__(
        self, num_samples: int, sample_rate: float, steps: int | None = None, generator: torch.Generator | None = None
    ) -> None:
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
            raise ValueError(f"num_samples must be a positive integer (the dataset size); got {num_samples!r}")
        if not 0.0 < float(sample_rate) <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1] (expected batch size / dataset size); got {sample_rate}")
        if steps is None:
            steps = max(1, round(1.0 / float(sample_rate)))
        if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
            raise ValueError(f"steps must be a positive integer (batches per epoch); got {steps!r}")
        self.num_samples = num_samples
        self.sample_rate = float(sample_rate)
        self.steps = steps
        self.generator = generator if generator is not None else torch.Generator()

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            draws = torch.rand(self.num_samples, generator=self.generator)
            yield torch.nonzero(draws < self.sample_rate, as_tuple=False).flatten().tolist()


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
