"""Clipping rules and the Gaussian noise."""

from __future__ import annotations

import math

import pytest
import torch

from dpclip.clipping import AutomaticClipping, FlatClipping, PerLayerClipping, clip_factor
from dpclip.noise import GaussianNoise


def test_flat_clipping_is_exact_and_safe():
    norms = torch.tensor([[0.0], [0.5], [1.0], [4.0]], dtype=torch.float64)
    scales = FlatClipping(1.0)(norms)
    assert scales.flatten().tolist() == [1.0, 1.0, 1.0, 0.25]
    assert torch.all(clip_factor(norms, math.inf) == 1)
    assert FlatClipping(2.5).sensitivity == 2.5


def test_clipped_norms_never_exceed_the_bound():
    norms = torch.rand(100, 3, dtype=torch.float64) * 10
    rule = PerLayerClipping((1.0, 2.0, 0.5))
    clipped = norms * rule(norms)
    assert torch.all(clipped <= torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64) + 1e-12)
    assert rule.sensitivity == pytest.approx(math.sqrt(1 + 4 + 0.25))
    auto = AutomaticClipping()
    assert torch.all(norms * auto(norms) < 1) and auto.sensitivity == 1.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bound", [1e-3, 0.7, 1.0, 3.0])
def test_clip_factor_is_the_exact_quotient(dtype, bound):
    """min(1, C / n) as one rounded division (not C times a rounded reciprocal), exactly 1 up
    to the bound, the same for a float bound and a tensor of bounds."""
    norms = torch.cat([torch.rand(500, 1, dtype=dtype) * 4 * bound, torch.tensor([[0.0], [bound], [math.inf]], dtype=dtype)])
    got = clip_factor(norms, bound)
    c = torch.tensor(bound, dtype=dtype)
    want = torch.where(norms > c, c / norms, torch.ones_like(norms))
    assert got.dtype == dtype and torch.equal(got, want)
    assert torch.equal(clip_factor(norms, torch.tensor([bound], dtype=dtype)), want)
    assert got[-3:].flatten().tolist() == [1.0, 1.0, 0.0]


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_bad_bounds(bad):
    with pytest.raises(ValueError, match="max_grad_norm"):
        FlatClipping(bad)
    with pytest.raises(ValueError, match="max_grad_norm"):
        PerLayerClipping((1.0, bad))


def test_noise_has_the_declared_std_and_is_reproducible():
    noise = GaussianNoise(2.0)
    sums = {"w": torch.zeros(200_000, dtype=torch.float64)}
    a = noise.add(sums, 0.5, torch.Generator().manual_seed(1))["w"]
    b = noise.add(sums, 0.5, torch.Generator().manual_seed(1))["w"]
    assert torch.equal(a, b)
    assert a.std().item() == pytest.approx(1.0, rel=0.01)
    assert abs(a.mean().item()) < 0.01
    assert torch.equal(GaussianNoise(0.0).add(sums, 1.0, torch.Generator())["w"], sums["w"])
    with pytest.raises(ValueError, match="noise_multiplier"):
        GaussianNoise(-1.0)
