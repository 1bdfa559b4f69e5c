"""PrivacyEngine / make_private on the user's ordinary loop, against a per-sample oracle."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from accountants import PRVAccountant
from dpclip.controllers import Quantile
from dpclip.privacy_engine import NotPoissonSampledError, PrivacyEngine, make_private
from tests.oracles import per_sample_grads_loop


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _data(n: int = 32):
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))


def _one_step(model, optimizer, x, y):
    before = [p.detach().clone() for p in model.parameters()]
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    lr = optimizer.param_groups[0]["lr"]
    return [(b - p.detach()) / lr for b, p in zip(before, model.parameters())]  # the gradient that was applied


def test_no_noise_no_clipping_equals_plain_sgd():
    data = _data()
    private_model, plain_model = _model(), _model()
    opt = torch.optim.SGD(private_model.parameters(), lr=0.1)
    engine = PrivacyEngine()
    loader = DataLoader(data, batch_size=8)
    private_model, opt, loader = engine.make_private(
        module=private_model, optimizer=opt, data_loader=loader, noise_multiplier=0.0,
        max_grad_norm=math.inf, poisson_sampling=False,
    )
    plain_opt = torch.optim.SGD(plain_model.parameters(), lr=0.1)
    for x, y in loader:
        got = _one_step(private_model, opt, x, y)
        want = _one_step(plain_model, plain_opt, x, y)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["auto", "hooks", "bookkeeping", "vmap"])
def test_clipped_gradient_matches_the_oracle(mode):
    data = _data(16)
    model = _model()
    reference = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = PrivacyEngine()
    model, opt, _ = engine.make_private(
        module=model, optimizer=opt, data_loader=DataLoader(data, batch_size=16), noise_multiplier=0.0,
        max_grad_norm=0.3, poisson_sampling=False, grad_sample_mode=mode,
    )
    x, y = data.tensors
    got = _one_step(model, opt, x, y)
    loss = lambda out, t: nn.functional.cross_entropy(out, t, reduction="sum")  # noqa: E731
    grads = per_sample_grads_loop(reference, loss, x, y)
    names = [n for n, _ in reference.named_parameters()]
    norms = torch.sqrt(sum(grads[n].flatten(1).pow(2).sum(1) for n in names))
    scale = torch.clamp(0.3 / norms, max=1.0)
    for n, g in zip(names, got):
        want = (scale.view(-1, *[1] * (grads[n].dim() - 1)) * grads[n]).sum(0) / 16
        torch.testing.assert_close(g, want, rtol=1e-9, atol=1e-12)


def test_noise_std_and_accounting_on_poisson_batches():
    torch.manual_seed(0)
    model = nn.Linear(200, 50).double()
    data = TensorDataset(torch.zeros(100, 200, dtype=torch.float64), torch.zeros(100, 50, dtype=torch.float64))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = PrivacyEngine(accountant="prv")
    model, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=DataLoader(data, batch_size=10), noise_multiplier=2.0,
        max_grad_norm=1.5, generator=torch.Generator().manual_seed(5),
    )
    applied = []
    sizes = []
    for x, y in loader:
        sizes.append(len(x))
        before = model.weight.detach().clone()
        (0.0 * model(x).sum()).backward()  # zero gradients: the update is pure noise
        opt.step()
        opt.zero_grad()
        applied.append(before - model.weight.detach())
    assert len(applied) == len(loader) == 10 and len(set(sizes)) > 1  # batch sizes vary
    noise = torch.stack(applied)
    assert noise.std().item() == pytest.approx(2.0 * 1.5 / 10, rel=0.03)  # sigma * C / expected batch size
    assert engine.accountant.history == [(2.0, 0.1, 10)]
    reference = PRVAccountant()
    reference.step(2.0, 0.1, 10)
    assert engine.get_epsilon(1e-5) == reference.get_epsilon(1e-5)


def test_empty_poisson_batch_still_adds_noise_and_counts():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = PrivacyEngine()
    data = _data(8)
    model, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=DataLoader(data, batch_size=1), noise_multiplier=1.0,
        max_grad_norm=1.0, generator=torch.Generator().manual_seed(0),
    )
    loader.batch_sampler.poisson.sample_rate = 1e-12  # force empty batches (the accountant keeps 1/8: pessimistic)
    for x, y in loader:
        assert x.shape[0] == 0
        before = [p.detach().clone() for p in model.parameters()]
        nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
        opt.step()
        opt.zero_grad()
        assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert engine.accountant.history == [(1.0, 1 / 8, 8)]


def test_adam_and_the_function_form():
    data = _data()
    model = _model()
    private = make_private(
        model, torch.optim.Adam(model.parameters(), lr=1e-2), DataLoader(data, batch_size=8),
        noise_multiplier=1.0, max_grad_norm=1.0,
    )
    assert private.model is model
    for x, y in private.data_loader:
        nn.functional.cross_entropy(private.model(x), y).backward()
        private.optimizer.step()
        private.optimizer.zero_grad()
    assert 0 < private.epsilon(1e-5) < math.inf


def test_shuffled_batches_are_not_given_an_epsilon():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine()
    model, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=DataLoader(_data(), batch_size=8, shuffle=True),
        noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False,
    )
    x, y = next(iter(loader))
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    with pytest.raises(NotPoissonSampledError, match="poisson_sampling=True"):
        engine.get_epsilon(1e-5)


def test_every_problem_is_listed_at_once():
    with pytest.raises(ValueError) as info:
        PrivacyEngine().make_private(
            module=_model(), optimizer=torch.optim.SGD(_model().parameters(), lr=0.1),
            data_loader=DataLoader(_data(), batch_size=8), noise_multiplier=-1.0, max_grad_norm=1.0,
            clipping="nonsense", grad_sample_mode="fast", loss_reduction="avg",
        )
    text = str(info.value)
    for word in ("noise_multiplier", "clipping", "grad_sample_mode", "loss_reduction"):
        assert word in text


def test_optimizer_parameters_outside_the_module_are_refused():
    model, other = _model(), _model(1)
    with pytest.raises(ValueError, match="not parameters of the module"):
        PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(other.parameters(), lr=0.1),
            data_loader=DataLoader(_data(), batch_size=8), noise_multiplier=1.0, max_grad_norm=1.0,
        )


def test_detach_restores_plain_training():
    data = _data()
    model, plain = _model(), _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine()
    engine.make_private(
        module=model, optimizer=opt, data_loader=DataLoader(data, batch_size=8), noise_multiplier=1.0,
        max_grad_norm=0.01,
    )
    engine.detach()
    x, y = data.tensors
    got = _one_step(model, opt, x, y)
    want = _one_step(plain, torch.optim.SGD(plain.parameters(), lr=0.1), x, y)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    assert all(not m._forward_hooks for m in model.modules())


class _TiedOutsideOwner(nn.Module):
    """The output layer reuses the embedding's weight in the parent's forward: not a module call."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4).double()
        self.mix = nn.Linear(4, 4).double()

    def forward(self, x):
        h = torch.tanh(self.mix(self.emb(x).mean(1)))
        return nn.functional.linear(h, self.emb.weight)


def test_a_parameter_used_outside_its_module_is_caught_on_the_first_step():
    model = _TiedOutsideOwner()
    data = TensorDataset(torch.randint(0, 10, (16, 5)), torch.randint(0, 10, (16,)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine()
    model, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=DataLoader(data, batch_size=16), noise_multiplier=1.0,
        max_grad_norm=1.0, poisson_sampling=False,
    )
    x, y = data.tensors
    nn.functional.cross_entropy(model(x), y).backward()
    with pytest.raises(ValueError, match="emb.weight.*outside the module"):
        opt.step()


def test_a_loss_term_outside_the_outputs_is_caught():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine()
    model, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=DataLoader(_data(), batch_size=8), noise_multiplier=1.0,
        max_grad_norm=1.0, poisson_sampling=False,
    )
    x, y = next(iter(loader))
    penalty = sum(p.pow(2).sum() for p in model.parameters())
    (nn.functional.cross_entropy(model(x), y) + 0.1 * penalty).backward()
    with pytest.raises(ValueError, match="weight_decay"):
        opt.step()


def test_unsupported_modules_are_all_listed_with_their_fix():
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 8),
        nn.BatchNorm1d(8), nn.Linear(8, 2),
    )
    data = TensorDataset(torch.randn(8, 1, 8, 8), torch.randint(0, 2, (8,)))
    with pytest.raises(ValueError) as info:
        PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(data, batch_size=4), noise_multiplier=1.0, max_grad_norm=1.0,
        )
    text = str(info.value)
    assert "1 (BatchNorm2d)" in text and "4 (BatchNorm1d)" in text and "GroupNorm" in text


def test_refused_layer_settings_are_listed():
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0), nn.Flatten(), nn.Linear(12, 2))
    data = TensorDataset(torch.randint(0, 10, (8, 3)), torch.randint(0, 2, (8,)))
    with pytest.raises(ValueError, match="max_norm"):
        PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(data, batch_size=4), noise_multiplier=1.0, max_grad_norm=1.0,
        )


def test_param_grads_are_skipped_after_the_audited_step(monkeypatch):
    """From the second step on autograd skips the rule units' ordinary gradients; same training."""
    from dpclip.grad_sample.hooks import GradSampler

    def train(skip: bool):
        if not skip:
            monkeypatch.setattr(GradSampler, "set_skip_param_grads", lambda self, enabled: None)
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        engine = PrivacyEngine()
        model, opt, loader = engine.make_private(
            module=model, optimizer=opt, data_loader=DataLoader(_data(), batch_size=8), noise_multiplier=1.0,
            max_grad_norm=0.5, poisson_sampling=False, generator=torch.Generator().manual_seed(5),
        )
        flags = [p.requires_grad for p in model.parameters()]
        grads_after_backward = []
        for x, y in loader:
            nn.functional.cross_entropy(model(x), y).backward()
            grads_after_backward.append([p.grad is None for p in model.parameters()])
            opt.step()
            assert all(p.grad is not None for p in model.parameters())
            opt.zero_grad()
            assert [p.requires_grad for p in model.parameters()] == flags
        engine.detach()
        assert [p.requires_grad for p in model.parameters()] == flags
        assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
        monkeypatch.undo()
        return [p.detach().clone() for p in model.parameters()], grads_after_backward

    got, none_got = train(skip=True)
    want, none_want = train(skip=False)
    assert none_got[0] == [False] * 4  # the audited first step sees every gradient
    # then both Linears are skipped: the second (its input requires grad) by freezing its weights for
    # the call, the first also, re-attached through a no-op anchor node (docs/design.md E8, E11)
    assert all(flags == [True, True, True, True] for flags in none_got[1:])
    assert all(flags == [False] * 4 for flags in none_want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_make_private_with_epsilon_spends_the_budget_and_no_more(accountant):
    model = _model()
    engine = PrivacyEngine(accountant=accountant)
    model, opt, loader = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        data_loader=DataLoader(_data(64), batch_size=16), target_epsilon=2.0, target_delta=1e-5,
        epochs=3, max_grad_norm=1.0, generator=torch.Generator().manual_seed(0),
    )
    for _ in range(3):
        for x, y in loader:
            nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
            opt.step()
            opt.zero_grad()
    assert engine.accountant.history[0][1:] == (0.25, 12)
    assert 2.0 * 0.99 <= engine.get_epsilon(1e-5) <= 2.0


def test_make_private_with_epsilon_refuses_shuffled_batches():
    model = _model()
    with pytest.raises(ValueError, match="poisson_sampling=True"):
        PrivacyEngine().make_private_with_epsilon(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
            data_loader=DataLoader(_data(64), batch_size=16), target_epsilon=2.0, target_delta=1e-5,
            epochs=3, max_grad_norm=1.0, poisson_sampling=False,
        )
