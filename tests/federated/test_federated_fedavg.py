"""DP-FedAvg simulation: plain FedAvg at sigma = 0 and C = inf, vmap == loop, accounting, local DP-SGD."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from accountants import PRVAccountant, RDPAccountant
from dpclip.controllers import Fixed, Quantile
from dpclip.federated.datasets import build_model, synthetic
from dpclip.federated.fedavg import FedAvgConfig, LocalDP, simulate, vmap_problem
from dpclip.federated.partitions import dirichlet_partition, iid_partition


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def task():
    data = synthetic(1200, 400, _gen(0), features=16, classes=4)
    model = build_model("mlp", data, _gen(1), hidden=16)
    return data, model


def test_sigma0_no_clipping_equals_plain_fedavg(task):
    data, model = task
    clients, rounds, epochs, lr = 4, 3, 2, 0.3
    parts = iid_partition(len(data.train_y), clients, _gen(2))  # 300 examples each
    config = FedAvgConfig(rounds=rounds, clients_per_round=clients, local_epochs=epochs, local_batch_size=300,
                          local_lr=lr, noise_multiplier=0.0, clip=math.inf, server_momentum=0.0, server_lr=1.0)
    result = simulate(model, (data.train_x, data.train_y), parts, config, _gen(3))
    assert result.participants == (clients,) * rounds  # q = 1: everyone, every round

    # reference: McMahan et al. 2017 FedAvg with full-batch local GD and an n_k-weighted model average
    glob = copy.deepcopy(model)
    for _ in range(rounds):
        states, weights = [], []
        for idx in parts:
            local = copy.deepcopy(glob)
            opt = torch.optim.SGD(local.parameters(), lr=lr)
            for _ in range(epochs):
                opt.zero_grad()
                F.cross_entropy(local(data.train_x[idx]), data.train_y[idx]).backward()
                opt.step()
            states.append(local.state_dict())
            weights.append(len(idx))
        total = sum(weights)
        glob.load_state_dict({k: sum(w * s[k] for w, s in zip(weights, states)) / total for k in states[0]})
    for k, v in glob.state_dict().items():
        assert torch.allclose(result.state_dict[k], v, atol=2e-6), k
    assert math.isinf(result.epsilon)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_vmap_path_equals_loop_path(task, clipping):
    data, model = task
    parts = dirichlet_partition(data.train_y[:400], 8, 0.5, _gen(4))  # unequal sizes: clients drop out of vmap
    assert vmap_problem(model) is None
    results = {}
    for path in ("vmap", "loop"):
        config = FedAvgConfig(rounds=2, clients_per_round=5, local_epochs=2, local_batch_size=20, local_lr=0.2,
                              noise_multiplier=0.7, clip=0.8, clipping=clipping,
                              controller=Quantile(count_noise_multiplier=3.0), client_path=path,
                              server_optimizer="adam", server_lr=0.05)
        results[path] = simulate(model, (data.train_x[:400], data.train_y[:400]), parts, config, _gen(5))
    v, l = results["vmap"], results["loop"]
    assert (v.client_path, l.client_path) == ("vmap", "loop")
    sizes = sorted(len(p) for p in parts)
    assert sizes[-1] > 2 * sizes[0]  # the clients really have different numbers of local steps
    assert v.participants == l.participants
    for k in v.state_dict:
        assert torch.allclose(v.state_dict[k], l.state_dict[k], atol=1e-5), k
    for a, b in zip(v.clip_history, l.clip_history):
        assert a == pytest.approx(b, rel=1e-6)
    assert v.epsilon == l.epsilon


def test_epsilon_equals_independent_accountants(task):
    data, model = task
    parts = iid_partition(len(data.train_y), 20, _gen(6))
    sigma, m, rounds, delta = 0.9, 4, 6, 1e-5
    config = FedAvgConfig(rounds=rounds, clients_per_round=m, noise_multiplier=sigma, clip=1.0, delta=delta,
                          controller=Quantile(count_noise_multiplier=2.0), local_batch_size=100)
    result = simulate(model, (data.train_x, data.train_y), parts, config, _gen(7))
    q = m / 20
    assert result.sample_rate == q
    # the accountant records the round's sigma, not the aggregate's lowered share
    assert result.accountant_history == ((sigma, q, rounds),)
    assert result.gradient_noise_multiplier == pytest.approx((sigma**-2 - 2.0**-2) ** -0.5)
    assert result.epsilon == PRVAccountant().step(noise_multiplier=sigma, sample_rate=q, steps=rounds).get_epsilon(delta)
    rdp = simulate(model, (data.train_x, data.train_y), parts,
                   FedAvgConfig(rounds=rounds, clients_per_round=m, noise_multiplier=sigma, delta=delta,
                                accountant="rdp", local_batch_size=100), _gen(7))
    assert rdp.epsilon == pytest.approx(RDPAccountant().step(sigma, q, rounds).get_epsilon(delta), rel=1e-12)


@pytest.mark.reference
def test_epsilon_against_dp_accounting(task):
    dp_accounting = pytest.importorskip("dp_accounting")
    data, model = task
    parts = iid_partition(len(data.train_y), 10, _gen(8))
    sigma, q, rounds, delta = 1.1, 0.3, 5, 1e-5
    result = simulate(model, (data.train_x, data.train_y), parts,
                      FedAvgConfig(rounds=rounds, clients_per_round=3, noise_multiplier=sigma, delta=delta,
                                   accountant="rdp", local_batch_size=200), _gen(9))
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), rounds)
    assert result.epsilon == pytest.approx(acc.get_epsilon(delta), rel=1e-3)
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    pld.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), rounds)
    prv = simulate(model, (data.train_x, data.train_y), parts,
                   FedAvgConfig(rounds=rounds, clients_per_round=3, noise_multiplier=sigma, delta=delta,
                                local_batch_size=200), _gen(9))
    assert prv.epsilon == pytest.approx(pld.get_epsilon(delta), rel=0.01)


def test_fixed_controller_keeps_clip_and_noise_changes_the_model(task):
    data, model = task
    parts = iid_partition(len(data.train_y), 10, _gen(10))
    base = dict(rounds=3, clients_per_round=5, clip=0.5, controller=Fixed(), local_batch_size=40)
    quiet = simulate(model, (data.train_x, data.train_y), parts, FedAvgConfig(noise_multiplier=0.0, **base), _gen(11))
    noisy = simulate(model, (data.train_x, data.train_y), parts, FedAvgConfig(noise_multiplier=2.0, **base), _gen(11))
    assert quiet.clip_history == noisy.clip_history == ((0.5,),) * 3
    assert quiet.participants == noisy.participants  # the noise generator is separate from the sampling
    assert any(not torch.allclose(quiet.state_dict[k], noisy.state_dict[k]) for k in quiet.state_dict)


def test_quantile_controller_shrinks_an_oversized_clip_until_updates_are_clipped(task):
    data, model = task
    parts = iid_partition(len(data.train_y), 20, _gen(12))
    config = FedAvgConfig(rounds=16, clients_per_round=20, noise_multiplier=0.0, clip=1.0, local_lr=0.1,
                          local_batch_size=60, controller=Quantile(target_unclipped_quantile=0.5, learning_rate=0.5))
    result = simulate(model, (data.train_x, data.train_y), parts, config, _gen(13))
    clips = [c[0] for c in result.clip_history]
    # all 20 updates unclipped (exact counts at sigma = 0): C shrinks by exp(-0.5 * (1 - 0.5)) per round
    assert clips[1] == pytest.approx(math.exp(-0.25))
    # it then oscillates around the median update norm (~0.07 here): more than half clipped -> C grows
    grew = [b > a for a, b in zip(clips, clips[1:])]
    assert not any(grew[:8]) and any(grew)
    assert 0.03 < clips[-1] < 0.15


def test_local_dp_sgd_reports_sample_level_epsilon(task):
    data, model = task
    parts = dirichlet_partition(data.train_y[:200], 4, 1.0, _gen(14), min_size=20)
    config = FedAvgConfig(rounds=2, clients_per_round=2, local_epochs=1, local_batch_size=10, local_lr=0.1,
                          noise_multiplier=0.8, clip=1.0, local_dp=LocalDP(noise_multiplier=1.2, max_grad_norm=1.0))
    result = simulate(model, (data.train_x[:200], data.train_y[:200]), parts, config, _gen(15))
    assert result.client_path == "loop"
    # the worst client over all rounds: (sigma_l, 10 / n_k, rounds * ceil(n_k / 10)), by hand
    candidates = [(1.2, 10 / len(p), 2 * -(-len(p) // 10)) for p in parts]
    eps = [PRVAccountant().step(*c).get_epsilon(1e-5) for c in candidates]
    assert result.sample_epsilon == pytest.approx(max(eps))
    assert result.sample_accountant_history == (candidates[eps.index(max(eps))],)
    assert math.isfinite(result.epsilon)


def test_refusals_name_the_fix(task):
    data, _ = task
    parts = iid_partition(len(data.train_y), 4, _gen(16))
    bn = nn.Sequential(nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="GroupNorm"):
        simulate(bn, (data.train_x, data.train_y), parts, FedAvgConfig(rounds=1, clients_per_round=2), _gen())
    drop = nn.Sequential(nn.Linear(16, 8), nn.Dropout(0.5), nn.Linear(8, 4))
    assert "Dropout" in vmap_problem(drop)
    with pytest.raises(ValueError, match="client_path='loop'"):
        simulate(drop, (data.train_x, data.train_y), parts,
                 FedAvgConfig(rounds=1, clients_per_round=2, client_path="vmap"), _gen())
    with pytest.raises(ValueError, match="exceeds the 4 clients"):
        simulate(nn.Linear(16, 4), (data.train_x, data.train_y), parts, FedAvgConfig(rounds=1, clients_per_round=5),
                 _gen())
    with pytest.raises(ValueError, match="server_optimizer"):
        FedAvgConfig(rounds=1, clients_per_round=1, server_optimizer="rmsprop")
    with pytest.raises(TypeError, match="controller interface"):
        FedAvgConfig(rounds=1, clients_per_round=1, controller=object())
