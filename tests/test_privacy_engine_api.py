"""The engine as users meet it: an Opacus script unchanged, resume, budget, refusals."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

from accountants import RDPAccountant
from dpclip import PrivacyBudgetExhausted, PrivacyEngine

ROOT = Path(__file__).resolve().parents[1]

OPACUS_SCRIPT = '''
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
{import_line}


def main(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 2))
    x = torch.randn(256, 10)
    data = TensorDataset(x, (x[:, 0] + 0.5 * x[:, 1] > 0).long())  # learnable: a linear rule
    train_loader = DataLoader(data, batch_size=32, shuffle=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    privacy_engine = PrivacyEngine()
    if mode == "ghost":
        model, optimizer, criterion, train_loader = privacy_engine.make_private(
            module=model, optimizer=optimizer, criterion=criterion, data_loader=train_loader,
            noise_multiplier=1.1, max_grad_norm=1.0, grad_sample_mode="ghost",
        )
    elif mode == "epsilon":
        model, optimizer, train_loader = privacy_engine.make_private_with_epsilon(
            module=model, optimizer=optimizer, data_loader=train_loader, epochs=3,
            target_epsilon=4.0, target_delta=1e-5, max_grad_norm=1.0,
        )
    else:
        model, optimizer, train_loader = privacy_engine.make_private(
            module=model, optimizer=optimizer, data_loader=train_loader, noise_multiplier=1.1, max_grad_norm=1.0,
        )
    for epoch in range(3):
        model.train()
        for x, y in train_loader:
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
        epsilon = privacy_engine.get_epsilon(delta=1e-5)
    model.eval()
    with torch.no_grad():
        accuracy = (model(data.tensors[0]).argmax(1) == data.tensors[1]).float().mean().item()
    return epsilon, accuracy, privacy_engine.accountant.get_epsilon(delta=1e-5)
'''


def _run_script(import_line: str, mode: str):
    namespace: dict = {}
    exec(compile(OPACUS_SCRIPT.format(import_line=import_line), f"<{import_line}>", "exec"), namespace)
    return namespace["main"](mode)


@pytest.mark.reference
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("mode", ["plain", "ghost", "epsilon"])
def test_an_opacus_script_runs_unchanged_and_reports_the_same_epsilon(mode):
    pytest.importorskip("opacus")
    theirs = _run_script("from opacus import PrivacyEngine", mode)
    ours = _run_script("from dpclip import PrivacyEngine", mode)
    assert ours[0] == ours[2]
    assert abs(ours[0] / theirs[0] - 1) < 0.01, (ours, theirs)
    assert ours[1] > 0.75  # it trained (random guessing: 0.5)


RESUME_SCRIPT = textwrap.dedent('''
    import sys
    import torch
    from torch import nn
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset
    from dpclip import PrivacyEngine, Quantile

    def build(seed):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        g = torch.Generator().manual_seed(1)
        data = TensorDataset(torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g))
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        engine = PrivacyEngine()
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=DataLoader(data, batch_size=16), noise_multiplier=1.0,
            max_grad_norm=1.0, clipping="adaptive_layerwise", clip_controller=Quantile(count_noise_multiplier=5.0),
            generator=torch.Generator().manual_seed(seed),
        )
        return model, optimizer, loader, engine

    def train(model, optimizer, loader, epochs):
        for _ in range(epochs):
            for x, y in loader:
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
                optimizer.zero_grad()

    phase, path, out = sys.argv[1:]
    if phase == "first":
        model, optimizer, loader, engine = build(seed=7)
        train(model, optimizer, loader, 2)
        engine.save_checkpoint(path=path, module=model, optimizer=optimizer)
        sys.exit(0)
    if phase == "resume":
        model, optimizer, loader, engine = build(seed=12345)  # everything must come from the checkpoint
        engine.load_checkpoint(path=path, module=model, optimizer=optimizer)
        train(model, optimizer, loader, 1)
    else:
        model, optimizer, loader, engine = build(seed=7)
        train(model, optimizer, loader, 3)
    torch.save({"params": [p.detach() for p in model.parameters()], "epsilon": engine.get_epsilon(1e-5),
                "clip": engine.max_grad_norm, "history": engine.accountant.history}, out)
''')


def test_resume_in_a_fresh_process_continues_the_same_run(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(RESUME_SCRIPT)
    ckpt = tmp_path / "ckpt.pt"

    def run(phase: str) -> dict:
        out = tmp_path / f"{phase}.pt"
        subprocess.run([sys.executable, str(script), phase, str(ckpt), str(out)], check=True, cwd=ROOT, timeout=120)
        return torch.load(out) if phase != "first" else {}

    run("first")
    resumed, full = run("resume"), run("full")
    assert resumed["history"] == full["history"] == [(1.0, 0.25, 12)]
    assert resumed["epsilon"] == full["epsilon"]
    assert resumed["clip"] == full["clip"] and len(set(full["clip"])) > 1  # the thresholds moved and were kept
    for a, b in zip(resumed["params"], full["params"]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _tiny():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(40, 6, generator=g), torch.randint(0, 3, (40,), generator=g))
    return model, data


def test_max_epsilon_stops_before_the_step_that_would_exceed_it():
    model, data = _tiny()
    engine = PrivacyEngine(accountant="rdp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=DataLoader(data, batch_size=10), noise_multiplier=1.0,
        max_grad_norm=1.0, max_epsilon=8.0, target_delta=1e-5, generator=torch.Generator().manual_seed(0),
    )
    steps = 0
    with pytest.raises(PrivacyBudgetExhausted, match="max_epsilon=8") as info:
        for _ in range(100):
            for x, y in loader:
                F.cross_entropy(model(x), y).backward()
                frozen = [p.detach().clone() for p in model.parameters()]
                opt.step()
                opt.zero_grad()
                steps += 1
    assert "not taken" in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.parameters()))  # the refused step moved nothing
    assert engine._attachment.sampler.batch_size == 0  # and kept none of its captures
    assert engine.accountant.history == [(1.0, 0.25, steps)]
    assert steps > 3 and engine.get_epsilon(1e-5) <= 8.0
    one_more = RDPAccountant().step(1.0, 0.25, steps + 1)
    assert one_more.get_epsilon(1e-5) > 8.0
    # the refused step left no captures behind: the next attempt is refused the same way
    opt.zero_grad()
    x, y = next(iter(loader))
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(PrivacyBudgetExhausted, match="max_epsilon=8"):
        opt.step()
    assert engine.accountant.history == [(1.0, 0.25, steps)]


def test_a_weighted_sampler_is_refused_with_the_reason():
    model, data = _tiny()
    sampler = WeightedRandomSampler(torch.ones(40), num_samples=40)
    with pytest.raises(ValueError, match="WeightedRandomSampler.*Poisson"):
        PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(data, batch_size=10, sampler=sampler), noise_multiplier=1.0, max_grad_norm=1.0,
        )


class LoRALinear(nn.Module):
    """PEFT-style wrapper: the base layer's weight is used directly in this module's forward."""

    def __init__(self, base: nn.Linear, rank: int = 2):
        super().__init__()
        self.base = base
        self.A = nn.Parameter(torch.randn(base.in_features, rank) * 0.1)
        self.B = nn.Parameter(torch.randn(rank, base.out_features) * 0.1)

    def forward(self, x):
        return F.linear(x, self.base.weight, self.base.bias) + x @ self.A @ self.B


class LoRAFactors(nn.Module):
    """PEFT-style factors applied by a forward hook on another layer: this module is never called."""

    def __init__(self, d_in: int, d_out: int, rank: int = 2):
        super().__init__()
        self.A = nn.Parameter(torch.randn(d_in, rank) * 0.1)
        self.B = nn.Parameter(torch.randn(rank, d_out) * 0.1)

    def inject(self, module, args, output):
        return output + args[0] @ self.A @ self.B


class HookedAdapter(nn.Module):
    def __init__(self):
        super().__init__()
        self.base = nn.Linear(6, 3)
        self.lora = LoRAFactors(6, 3)
        self.base.register_forward_hook(self.lora.inject)

    def forward(self, x):
        return self.base(x)


def _private_step(model, data, **kwargs):
    engine = PrivacyEngine()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=DataLoader(data, batch_size=16), noise_multiplier=1.0,
        max_grad_norm=1.0, **kwargs,
    )
    for xb, yb in loader:
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        opt.zero_grad()
    return engine


def test_peft_layers_either_get_exact_per_sample_gradients_or_a_clear_error():
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(16, 6), torch.randint(0, 3, (16,)))
    # a wrapper that uses its base's weight: the torch.func fallback covers the whole wrapper
    # (the first step's audit checks that the per-sample gradients add up to autograd's)
    engine = _private_step(nn.Sequential(LoRALinear(nn.Linear(6, 3))), data, poisson_sampling=False)
    assert engine.steps == 1
    # factors injected by a hook: their module is never called, so they get no per-sample gradient
    with pytest.raises(ValueError, match=r"lora\.A, lora\.B do not add up.*call that module.*requires_grad=False"):
        _private_step(HookedAdapter(), data, poisson_sampling=False)
    frozen = HookedAdapter()
    frozen.lora.requires_grad_(False)  # the fix the message gives
    assert math.isfinite(_private_step(frozen, data).get_epsilon(1e-5))


def test_a_negative_noise_multiplier_is_refused_with_the_fix():
    model, data = _tiny()
    with pytest.raises(ValueError, match=r"noise_multiplier must be >= 0.*-0\.5"):
        PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(data, batch_size=10), noise_multiplier=-0.5, max_grad_norm=1.0,
        )


def test_state_dict_is_plain_data_and_refuses_a_mismatched_engine():
    model, data = _tiny()
    engine = PrivacyEngine()
    engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=10), noise_multiplier=1.0, max_grad_norm=[1.0] * 4,
        clipping="per_layer",
    )
    state = engine.state_dict()
    json.dumps({k: v for k, v in state.items() if k not in ("generator", "sample_generator")})
    other_model, _ = _tiny()
    other = PrivacyEngine()
    other.make_private(
        module=other_model, optimizer=torch.optim.SGD(other_model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=10), noise_multiplier=1.0, max_grad_norm=1.0,
    )
    with pytest.raises(ValueError, match="clipping='per_layer'"):
        other.load_state_dict(state)


def test_bad_bounds_are_listed_with_the_other_problems():
    model, data = _tiny()
    with pytest.raises(ValueError) as info:
        PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(data, batch_size=10, sampler=WeightedRandomSampler(torch.ones(40), 40)),
            noise_multiplier=1.0, max_grad_norm=[1.0, 2.0], clipping="per_layer", loss_reduction="avg",
        )
    text = str(info.value)
    assert "one max_grad_norm per trainable parameter tensor" in text and "(4 here)" in text
    assert "WeightedRandomSampler" in text and "loss_reduction" in text


def test_secure_mode_trains_and_keeps_its_randomness_out_of_checkpoints():
    from dpclip.noise import SecureGaussianNoise

    model, data = _tiny()
    with pytest.raises(ValueError, match="secure_mode=True draws its own"):
        PrivacyEngine(secure_mode=True).make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(data, batch_size=10), noise_multiplier=1.0, max_grad_norm=1.0,
            generator=torch.Generator().manual_seed(0),
        )
    engine = PrivacyEngine(secure_mode=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=DataLoader(data, batch_size=10), noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    for x, y in loader:
        F.cross_entropy(model(x), y).backward()
        opt.step()
        released = torch.cat([p.grad.flatten() for p in model.parameters()]).double() * 10  # undo / batch size
        opt.zero_grad()
    assert engine.steps == 4 and math.isfinite(engine.get_epsilon(1e-5))
    state = engine.state_dict()
    assert state["generator"] is None and state["sample_generator"] is None
    # the update lies on the secure grid: (grid * integer) / expected batch size, per coordinate
    plan = SecureGaussianNoise(1.0).plan(1.0, sum(p.numel() for p in model.parameters()))
    ratio = released / plan.grid
    assert torch.allclose(ratio, ratio.round(), rtol=1e-6, atol=1e-9)
    assert float(ratio.abs().max()) > 100  # a fine grid: the check above is not trivially met


def _ahead_run(steps: int, *, start=None, state=None, sleep: float = 0.0, return_engine: bool = False):
    """A 42k-parameter MLP trained ``steps`` steps with noise (large enough for the noise to be
    drawn ahead); ``state``: (engine state, model state, optimizer state) to resume from."""
    import time

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, 10))
    g = torch.Generator().manual_seed(4)
    data = TensorDataset(torch.randn(64, 200, generator=g), torch.randint(0, 10, (64,), generator=g))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    engine = PrivacyEngine(accountant="rdp")
    model, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=DataLoader(data, batch_size=16), noise_multiplier=1.1,
        max_grad_norm=1.0, poisson_sampling=False, generator=torch.Generator().manual_seed(9),
    )
    if state is not None:
        engine.load_state_dict(state[0])
        model.load_state_dict(state[1])
        opt.load_state_dict(state[2])
    done = 0
    while done < steps:
        for x, y in loader:
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad()
            time.sleep(sleep)
            done += 1
            if done == steps:
                break
    params = [p.detach().clone() for p in model.parameters()]
    if return_engine:
        return params, (engine.state_dict(), model.state_dict(), opt.state_dict())
    return params


@pytest.mark.skipif(not __import__("dpclip").noise.NoiseAhead.available(), reason="no noise drawn ahead here")
def test_noise_drawn_ahead_changes_nothing_but_the_time(monkeypatch):
    """The gradient noise drawn on the background thread (design P14) gives the run the thread
    never helps (its draws cancelled), the run without the feature (keys drawn in each release:
    the same generator draws in the same order, no controller here), and a run resumed from a
    checkpoint taken between steps (the next step's key travels in the state): all bit for bit.
    The thread does take part (numbers taken from its buffer)."""
    import dpclip.noise as noise_module
    import dpclip.privacy_engine as pe

    taken = []
    real_add = noise_module.add_keyed_

    def counting_add(dests, std, key, ahead=None):
        taken.append(real_add(dests, std, key, ahead))
        return taken[-1]

    monkeypatch.setattr(noise_module, "add_keyed_", counting_add)
    helped = _ahead_run(8, sleep=0.05)
    assert max(taken) > 0  # on an idle core 50 ms is ample; a saturated machine could starve it
    monkeypatch.setattr(noise_module.NoiseAhead, "start", lambda self, *a: self.cancel() or False)
    taken.clear()
    unhelped = _ahead_run(8)
    assert max(taken) == 0
    monkeypatch.undo()
    monkeypatch.setattr(pe, "NOISE_AHEAD", False)
    without = _ahead_run(8)
    monkeypatch.undo()
    first, state = _ahead_run(4, return_engine=True)  # one pass over the loader: resumed at its start
    assert state[0]["noise_key"] is not None
    resumed = _ahead_run(4, state=state)
    for a, b, c, d in zip(helped, unhelped, without, resumed):
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)
    assert not all(torch.equal(a, b) for a, b in zip(first, helped))  # the last steps did move


def test_a_pending_noise_key_is_used_once_and_dropped_by_secure_mode():
    """The key drawn ahead for the next release is spent by it (never reused), and secure mode
    neither draws nor saves one."""
    params, state = _ahead_run(2, return_engine=True)
    engine_state = state[0]
    if __import__("dpclip").noise.NoiseAhead.available():
        assert isinstance(engine_state["noise_key"], int) and 0 <= engine_state["noise_key"] < 1 << 64
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 200), nn.ReLU(), nn.Linear(200, 10))
    engine = PrivacyEngine(secure_mode=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    data = TensorDataset(torch.randn(32, 200), torch.randint(0, 10, (32,)))
    model, opt, loader = engine.make_private(module=model, optimizer=opt, data_loader=DataLoader(data, batch_size=16),
                                             noise_multiplier=1.0, max_grad_norm=1.0)
    x, y = next(iter(loader))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert engine._attachment.ahead is None and engine.state_dict()["noise_key"] is None
