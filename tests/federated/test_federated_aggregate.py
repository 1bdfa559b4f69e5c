"""The DP-FedAvg server step against hand-computed oracles, and its noise."""

from __future__ import annotations

import math

import pytest
import torch

from dpclip.controllers import ClipStatistics, Fixed, Quantile, gradient_noise_multiplier
from dpclip.federated.aggregate import dp_aggregate, group_norms


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _deltas():
    # three clients, two tensors "a" (2 values) and "b" (1 value)
    # client 0: a = (3, 0), b = (4,)   -> norm 5
    # client 1: a = (0.6, 0), b = (0.8,) -> norm 1
    # client 2: all zero              -> norm 0 (never divided by)
    a = torch.tensor([[3.0, 0.0], [0.6, 0.0], [0.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[4.0], [0.8], [0.0]], dtype=torch.float64)
    return {"a": a, "b": b}


def test_flat_clip_sum_divided_by_expected_count_sigma0():
    out = dp_aggregate(_deltas(), (2.0,), noise_multiplier=0.0, expected_clients=4.0, generator=_gen())
    # scales 2/5, 1, 1: sum a = (1.2 + 0.6, 0) = (1.8, 0); b = 1.6 + 0.8 = 2.4; divided by 4 (not by 3)
    assert torch.allclose(out.update["a"], torch.tensor([0.45, 0.0], dtype=torch.float64), atol=1e-15)
    assert torch.allclose(out.update["b"], torch.tensor([0.6], dtype=torch.float64), atol=1e-15)
    assert out.sensitivity == 2.0 and out.noise_std == 0.0 and out.expected_clients == 4.0
    assert out.clip == out.next_clip == (2.0,) and out.stats is None


def test_per_layer_clip_sigma0():
    groups = (("a",), ("b",))
    out = dp_aggregate(_deltas(), (1.5, 0.5), noise_multiplier=0.0, expected_clients=2.0, generator=_gen(),
                       groups=groups)
    # a-norms 3, 0.6, 0 -> scales 0.5, 1, 1: sum a = (1.5 + 0.6, 0); b-norms 4, 0.8, 0 -> scales 1/8, 5/8, 1
    assert torch.allclose(out.update["a"], torch.tensor([2.1 / 2, 0.0], dtype=torch.float64), atol=1e-15)
    assert torch.allclose(out.update["b"], torch.tensor([(0.5 + 0.5) / 2], dtype=torch.float64), atol=1e-15)
    assert out.sensitivity == pytest.approx(math.sqrt(1.5**2 + 0.5**2))
    norms = group_norms(_deltas(), groups)
    assert torch.allclose(norms, torch.tensor([[3.0, 4.0], [0.6, 0.8], [0.0, 0.0]], dtype=torch.float64))


def test_infinite_clip_and_no_noise_is_the_plain_sum():
    d = _deltas()
    out = dp_aggregate(d, (math.inf,), noise_multiplier=0.0, expected_clients=3.0, generator=_gen())
    assert torch.equal(out.update["a"], d["a"].sum(0) / 3) and torch.equal(out.update["b"], d["b"].sum(0) / 3)
    with pytest.raises(ValueError, match="unbounded"):
        dp_aggregate(d, (math.inf,), noise_multiplier=1.0, expected_clients=3.0, generator=_gen())


@pytest.mark.parametrize("clip", [(0.7,), (0.3, 0.4)])
def test_noise_std_is_sigma_times_sensitivity_over_expected(clip):
    sigma, expected = 1.3, 2.5
    groups = None if len(clip) == 1 else (("a",), ("b",))
    sensitivity = math.sqrt(sum(c * c for c in clip))
    zeros = {"a": torch.zeros(2, 60000), "b": torch.zeros(2, 40000)}  # two clients with zero updates
    g = _gen(3)
    draws = torch.cat([
        torch.cat([v.flatten() for v in dp_aggregate(zeros, clip, noise_multiplier=sigma, expected_clients=expected,
                                                     generator=g, groups=groups).update.values()])
        for _ in range(5)
    ]).double()
    want = sigma * sensitivity / expected
    assert abs(float(draws.std()) / want - 1) < 0.02
    assert abs(float(draws.mean())) < 4 * want / draws.numel() ** 0.5


def test_noise_added_even_without_clients():
    empty = {"a": torch.zeros(0, 5), "b": torch.zeros(0, 3, 2)}
    out = dp_aggregate(empty, (1.0,), noise_multiplier=1.0, expected_clients=2.0, generator=_gen())
    assert out.update["a"].shape == (5,) and out.update["b"].shape == (3, 2)
    assert float(out.update["a"].abs().sum()) > 0
    quiet = dp_aggregate(empty, (1.0,), noise_multiplier=0.0, expected_clients=2.0, generator=_gen())
    assert float(quiet.update["a"].abs().sum()) == 0


def test_same_generator_state_same_release():
    d = {k: v.float() for k, v in _deltas().items()}
    a = dp_aggregate(d, (1.0,), noise_multiplier=0.8, expected_clients=3.0, generator=_gen(7))
    b = dp_aggregate(d, (1.0,), noise_multiplier=0.8, expected_clients=3.0, generator=_gen(7))
    assert all(torch.equal(a.update[k], b.update[k]) for k in d)


def test_quantile_controller_reads_exact_counts_without_noise():
    ctrl = Quantile(target_unclipped_quantile=0.5, learning_rate=0.2)
    out = dp_aggregate(_deltas(), (2.0,), noise_multiplier=0.0, expected_clients=4.0, generator=_gen(),
                       controller=ctrl)
    # norms 5, 1, 0 against C = 2: two unclipped, over the expected 4 clients -> 0.5: C stays
    assert isinstance(out.stats, ClipStatistics)
    assert out.stats.unclipped_fraction == (0.5,)
    assert out.next_clip == pytest.approx((2.0,))
    out = dp_aggregate(_deltas(), (0.5,), noise_multiplier=0.0, expected_clients=4.0, generator=_gen(),
                       controller=ctrl)
    assert out.stats.unclipped_fraction == (0.25,)  # only the zero update
    assert out.next_clip == pytest.approx((0.5 * math.exp(-0.2 * (0.25 - 0.5)),))


def test_controller_budget_split():
    ctrl = Quantile(count_noise_multiplier=4.0)
    out = dp_aggregate(_deltas(), (1.0,), noise_multiplier=1.0, expected_clients=4.0, generator=_gen(), controller=ctrl)
    assert out.noise_multiplier == 1.0
    assert out.gradient_noise_multiplier == pytest.approx(gradient_noise_multiplier(1.0, 4.0))
    assert out.gradient_noise_multiplier == pytest.approx((1 - 1 / 16) ** -0.5)
    assert out.noise_std == pytest.approx(out.gradient_noise_multiplier * 1.0)
    with pytest.raises(ValueError, match="count_noise_multiplier"):
        dp_aggregate(_deltas(), (1.0,), noise_multiplier=1.0, expected_clients=4.0, generator=_gen(),
                     controller=Quantile(count_noise_multiplier=0.9))
    fixed = dp_aggregate(_deltas(), (1.0,), noise_multiplier=1.0, expected_clients=4.0, generator=_gen(),
                         controller=Fixed())
    assert fixed.gradient_noise_multiplier == 1.0 and fixed.stats is None


def test_fixed_noise_std_regime_records_std_over_sensitivity():
    out = dp_aggregate(_deltas(), (0.5,), noise_multiplier=123.0, expected_clients=4.0, generator=_gen(),
                       fixed_noise_std=2.0)
    assert out.noise_multiplier == pytest.approx(4.0) and out.noise_std == pytest.approx(2.0)


def test_bad_arguments_name_the_fix():
    with pytest.raises(ValueError, match="expected_clients"):
        dp_aggregate(_deltas(), (1.0,), noise_multiplier=0.0, expected_clients=0.0, generator=_gen())
    with pytest.raises(ValueError, match="one threshold per group"):
        dp_aggregate(_deltas(), (1.0, 2.0), noise_multiplier=0.0, expected_clients=1.0, generator=_gen())
    with pytest.raises(ValueError, match="missing \\['b'\\]"):
        dp_aggregate(_deltas(), (1.0,), noise_multiplier=0.0, expected_clients=1.0, generator=_gen(),
                     groups=(("a",),))
