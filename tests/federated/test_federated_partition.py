"""Partitions: sizes, disjointness, coverage, label skew, reproducibility; the generator-driven Gamma sampler."""

from __future__ import annotations

import pytest
import torch

from dpclip.federated.partitions import (
    dirichlet_partition,
    iid_partition,
    label_counts,
    parse_partition,
    partition,
    sample_gamma,
    shard_partition,
)
from dpclip.federated.spec import PartitionSpec


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _balanced_labels(classes: int = 10, per_class: int = 100) -> torch.Tensor:
    return torch.arange(classes).repeat_interleave(per_class)[torch.randperm(classes * per_class, generator=_gen(9))]


def _check_exact_cover(parts, n):
    allidx = torch.cat(parts)
    assert allidx.numel() == n
    assert torch.equal(torch.sort(allidx).values, torch.arange(n))
    for p in parts:
        assert p.dtype == torch.int64
        assert torch.equal(p, torch.sort(p).values)


def test_iid_sizes_cover_and_reproducible():
    parts = iid_partition(1003, 10, _gen())
    _check_exact_cover(parts, 1003)
    sizes = [p.numel() for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 1003
    again = iid_partition(1003, 10, _gen())
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    other = iid_partition(1003, 10, _gen(1))
    assert not all(torch.equal(a, b) for a, b in zip(parts, other))


def test_dirichlet_covers_and_skews_labels():
    labels = _balanced_labels(10, 200)
    skewed = dirichlet_partition(labels, 20, 0.1, _gen())
    flat = dirichlet_partition(labels, 20, 1000.0, _gen())
    for parts in (skewed, flat):
        _check_exact_cover(parts, labels.numel())
        assert min(p.numel() for p in parts) >= 1
    # share of each client's data in its most common label: near 1/10 when IID-like, large when skewed
    def top_share(parts):
        counts = label_counts(labels, parts, 10).double()
        return float((counts.max(1).values / counts.sum(1)).mean())

    assert top_share(skewed) > 0.6
    assert top_share(flat) < 0.2
    # the number of labels holding >= 5% of a client's data
    def labels_used(parts):
        counts = label_counts(labels, parts, 10).double()
        return float(((counts / counts.sum(1, keepdim=True)) >= 0.05).sum(1).double().mean())

    assert labels_used(skewed) < 4 < 9 < labels_used(flat)


def test_dirichlet_min_size_and_impossible_request():
    labels = _balanced_labels(10, 20)
    parts = dirichlet_partition(labels, 10, 0.5, _gen(), min_size=5)
    assert min(p.numel() for p in parts) >= 5
    with pytest.raises(ValueError, match="raise alpha"):
        dirichlet_partition(labels, 50, 0.01, _gen(), min_size=4, max_tries=3)
    with pytest.raises(ValueError, match="alpha must be"):
        dirichlet_partition(labels, 10, 0.0, _gen())


def test_shards_give_at_most_k_labels_when_aligned():
    labels = _balanced_labels(10, 100)  # 1000 examples, 50 clients x 2 shards of 10: every shard one label
    parts = shard_partition(labels, 50, 2, _gen())
    _check_exact_cover(parts, 1000)
    assert all(p.numel() == 20 for p in parts)
    per_client = (label_counts(labels, parts, 10) > 0).sum(1)
    assert int(per_client.max()) <= 2
    assert float(per_client.double().mean()) > 1.5  # two shards of one label are rare


def test_shards_unaligned_at_most_2k_labels():
    labels = _balanced_labels(10, 97)
    parts = shard_partition(labels, 30, 3, _gen(3))
    _check_exact_cover(parts, 970)
    assert int((label_counts(labels, parts, 10) > 0).sum(1).max()) <= 6


def test_partition_spec_parsing_and_dispatch():
    assert parse_partition("iid") == PartitionSpec("iid")
    assert parse_partition("dirichlet:0.5") == PartitionSpec("dirichlet", 0.5)
    assert parse_partition("shards:2") == PartitionSpec("shards", 2)
    assert str(parse_partition("dirichlet:0.5")) == "dirichlet:0.5"
    for bad in ("dirichlet", "dirichlet:-1", "shards:0", "shards:x", "random", "iid:3"):
        with pytest.raises(ValueError, match="use iid, dirichlet:ALPHA"):
            parse_partition(bad)
    labels = _balanced_labels(10, 30)
    a = partition(labels, 6, "shards:2", _gen(5))
    b = shard_partition(labels, 6, 2, _gen(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_errors_name_the_value():
    with pytest.raises(ValueError, match="num_clients=11 exceeds the 10 examples"):
        iid_partition(10, 11, _gen())
    with pytest.raises(TypeError, match="torch.Generator"):
        iid_partition(10, 2, 0)
    with pytest.raises(TypeError, match="1-D integer"):
        dirichlet_partition(torch.rand(10), 2, 1.0, _gen())


@pytest.mark.parametrize("shape", [0.3, 2.5])
def test_gamma_sampler_moments(shape):
    draws = sample_gamma(torch.full((40000,), shape, dtype=torch.float64), _gen(11))
    assert draws.min() > 0
    # mean = var = shape for Gamma(shape, 1); standard errors ~ sqrt(shape / n), ~ sqrt(2 shape^2 + 6 shape) / sqrt(n)
    assert abs(float(draws.mean()) - shape) < 4 * (shape / 40000) ** 0.5
    assert abs(float(draws.var()) / shape - 1) < 0.06
