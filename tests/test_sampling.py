"""Poisson batch sampler and empty-batch collation."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from dpclip.sampling import PoissonBatchSampler, empty_batch_collate


def test_batches_are_independent_bernoulli_draws():
    n, q, steps = 2000, 0.05, 400
    sampler = PoissonBatchSampler(n, q, steps, torch.Generator().manual_seed(0))
    counts = torch.zeros(n)
    sizes = []
    for batch in sampler:
        assert len(set(batch)) == len(batch) and all(0 <= i < n for i in batch)
        counts[batch] += 1
        sizes.append(len(batch))
    assert len(sizes) == steps == len(sampler)
    mean = sum(sizes) / steps
    assert abs(mean - q * n) < 4 * (q * (1 - q) * n / steps) ** 0.5  # 4 standard errors
    # each index is included with probability q in every step
    assert abs(counts.mean().item() - q * steps) < 0.1
    assert counts.var().item() == pytest.approx(q * (1 - q) * steps, rel=0.15)


def test_reproducible_with_a_seeded_generator_and_default_steps():
    a = list(PoissonBatchSampler(100, 0.1, generator=torch.Generator().manual_seed(3)))
    b = list(PoissonBatchSampler(100, 0.1, generator=torch.Generator().manual_seed(3)))
    assert a == b and len(a) == 10


def test_empty_batches_collate_to_zero_length_tensors():
    dataset = TensorDataset(torch.randn(5, 3, 4), torch.arange(5))
    sampler = PoissonBatchSampler(5, 1e-9, 3, torch.Generator().manual_seed(0))
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=empty_batch_collate(None, dataset))
    batches = list(loader)
    assert len(batches) == 3
    for x, y in batches:
        assert x.shape == (0, 3, 4) and x.dtype == torch.float32
        assert y.shape == (0,) and y.dtype == torch.int64


@pytest.mark.parametrize(
    "args, match",
    [((0, 0.1), "num_samples"), ((10, 0.0), "sample_rate"), ((10, 1.5), "sample_rate"), ((10, 0.1, 0), "steps")],
)
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        PoissonBatchSampler(*args)
