"""Every clipping mode of ``make_private`` against a float64 per-sample loop oracle.

With ``noise_multiplier=0`` the update the user's optimizer applies must equal, to 1e-9
relative, the oracle's: per-sample gradients by a loop (``tests/oracles.py``), the mode's
clipping rule, the sum over the batch divided by the expected batch size. The models cover
every engine path: rules (Linear, Conv2d, GroupNorm, LayerNorm, Embedding), the torch.func
fallback (MultiheadAttention) and the recurrent path (LSTM). Batch clipping is checked
against ordinary autograd on each micro-batch, including a model with BatchNorm.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from dpclip import BatchMemoryManager, PrivacyEngine, Quantile
from tests.oracles import per_sample_grads_loop

N = 8  # samples; batch_size=N gives sample_rate 1, so the Poisson batch is the whole data set


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class CNN(nn.Module):
    def __init__(self, norm: str = "group"):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.norm = nn.GroupNorm(2, 4) if norm == "group" else nn.BatchNorm2d(4, track_running_stats=False)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(F.relu(self.norm(self.conv(x))).flatten(1))


class ConvPaths(nn.Module):
    """Every conv path of the rules in one model (docs/design.md E16-E18): a one-channel 8x8
    stride-2 layer (per-sample gradients by a forward conv, formed in the backward hook), a
    W2-like 16->32 4x4 stride-2 layer (per-sample gradients from patches, kept for the clipped
    sum), a depthwise 3x3 (forward conv, groups) and a 32->32 3x3 with zero padding (the Gram
    norm from the unpadded input, summed over contiguous blocks)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 8, stride=2, padding=3)
        self.c2 = nn.Conv2d(16, 32, 4, stride=2)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.c3 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 3)

    def forward(self, x):
        h = F.max_pool2d(torch.tanh(self.c1(x)), 2, 1)  # [B, 16, 13, 13]
        h = torch.tanh(self.dw(torch.tanh(self.c2(h))))  # [B, 32, 5, 5]
        return self.fc(torch.tanh(self.c3(h)).mean((2, 3)))


class Transformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)).mean(1))


class LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        out, _ = self.lstm(self.emb(x))
        return self.head(out[:, -1])


def _inputs(kind: str, n: int, g: torch.Generator) -> torch.Tensor:
    if kind == "mlp":
        return torch.randn(n, 6, generator=g, dtype=torch.float64)
    if kind.startswith("cnn"):
        return torch.randn(n, 1, 6, 6, generator=g, dtype=torch.float64)
    if kind == "conv_paths":
        return torch.randn(n, 1, 28, 28, generator=g, dtype=torch.float64)
    return torch.randint(0, 20, (n, 5), generator=g)


MODELS = {"mlp": MLP, "cnn": CNN, "conv_paths": ConvPaths, "transformer": Transformer, "lstm": LSTMNet}


def _setup(kind: str, n: int = N, seed: int = 0):
    torch.manual_seed(seed)
    model = (CNN("batch") if kind == "cnn_bn" else MODELS[kind]()).double()
    g = torch.Generator().manual_seed(seed + 1)
    x = _inputs(kind, n, g)
    y = torch.randint(0, 3, (n,), generator=g)
    return model, TensorDataset(x, y)


def _layer_groups(model: nn.Module) -> list[list[str]]:
    """Parameter names grouped by the module that holds them, in model.parameters() order."""
    groups: dict[str, list[str]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(name.rpartition(".")[0], []).append(name)
    return list(groups.values())


def _oracle(model, x, y, kind: str, bounds, expected: float):
    """The mode's clipped, summed, scaled gradient from the per-sample loop: ``{name: tensor}``."""
    grads = per_sample_grads_loop(model, lambda out, t: F.cross_entropy(out, t, reduction="sum"), x, y)
    names = list(grads)
    groups = [names] if kind in ("flat", "automatic") else _layer_groups(model)
    norms = torch.stack([torch.sqrt(sum(grads[n].flatten(1).pow(2).sum(1) for n in grp)) for grp in groups], 1)
    if kind == "automatic":
        scales = 1.0 / (norms + 0.01)
    else:
        scales = torch.clamp(torch.tensor(bounds, dtype=norms.dtype) / norms, max=1.0)
    out = {}
    for k, grp in enumerate(groups):
        for n in grp:
            s = scales[:, k].view(-1, *[1] * (grads[n].dim() - 1))
            out[n] = (s * grads[n]).sum(0) / expected
    return out, norms


def _run_step(model, opt, loader):
    """One pass over a one-step loader; returns the gradient applied (lr = 1) per parameter name."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for xb, yb in loader:
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        opt.zero_grad()
    return {n: before[n] - p.detach() for n, p in model.named_parameters()}


PER_SAMPLE_MODES = ["flat", "per_layer", "automatic", "adaptive_layerwise"]


@pytest.mark.parametrize("model_kind", list(MODELS))
@pytest.mark.parametrize("clipping", PER_SAMPLE_MODES)
def test_each_per_sample_mode_matches_the_oracle(model_kind, clipping):
    model, data = _setup(model_kind)
    reference = copy.deepcopy(model)
    C = 0.5
    L = len(_layer_groups(model))
    bounds = [C] if clipping == "flat" else [C / math.sqrt(L)] * L
    engine = PrivacyEngine()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    kwargs = {"clip_controller": Quantile(count_noise_multiplier=100.0)} if clipping == "adaptive_layerwise" else {}
    model, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=DataLoader(data, batch_size=N), noise_multiplier=0.0,
        max_grad_norm=C, clipping=clipping, generator=torch.Generator().manual_seed(0), **kwargs,
    )
    x, y = data.tensors
    for step in range(2 if clipping == "adaptive_layerwise" else 1):
        want, norms = _oracle(reference, x, y, clipping, bounds, float(N))
        got = _run_step(model, opt, loader)
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-9, atol=1e-12, msg=f"{n} at step {step}")
        with torch.no_grad():
            for n, p in reference.named_parameters():
                p.sub_(want[n])
        if clipping == "adaptive_layerwise":  # Quantile's update from the (noise-free, sigma = 0) counts
            frac = (norms <= torch.tensor(bounds, dtype=norms.dtype)).sum(0).double() / N
            bounds = [b * math.exp(-0.2 * (float(f) - 0.5)) for b, f in zip(bounds, frac)]
            assert engine.max_grad_norm == pytest.approx(tuple(bounds), rel=1e-12)


class KernelPaths(nn.Module):
    """The layers dpclip's C kernels take in float32 (docs/design.md E20-E22): a W2-like
    1->16 8x8 stride-2 conv (column kernel), GroupNorm, a 16->32 4x4 stride-2 conv (output
    kernel in the ghost branch), an RGB-like 3->16 3x3 conv (position kernel), the same at
    stride 2 (output kernel), LayerNorm, and a Linear over 4 positions (ghost norm by the Gram
    kernel)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 8, stride=2, padding=3)
        self.gn = nn.GroupNorm(4, 16)
        self.c2 = nn.Conv2d(16, 32, 4, stride=2)
        self.rgb = nn.Conv2d(3, 16, 3, padding=1)
        self.rgb2 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.ln = nn.LayerNorm(16)
        self.seq = nn.Linear(16, 24)
        self.fc = nn.Linear(32 + 16 + 24 + 8, 3)

    def forward(self, x):
        h = F.max_pool2d(torch.tanh(self.gn(self.c1(x[:, :1]))), 2, 1)  # [B, 16, 13, 13]
        a = torch.tanh(self.c2(h)).mean((2, 3))  # [B, 32]
        r = torch.tanh(self.rgb(x[:, :3]))  # [B, 16, 28, 28]
        b = self.ln(r.mean((2, 3)))  # [B, 16]
        tokens = F.adaptive_avg_pool2d(r, 2).flatten(2).transpose(1, 2)  # [B, 4, 16]
        c = torch.tanh(self.seq(tokens)).mean(1)  # [B, 24]
        d = torch.tanh(self.rgb2(x[:, :3])).mean((2, 3))  # [B, 8]
        return self.fc(torch.cat([a, b, c, d], 1))


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_float32_kernels_through_make_private_match_the_float64_oracle(clipping, monkeypatch):
    """make_private in float32 on a model whose layers take the conv and norm kernels (each
    kernel must be used) gives the float64 oracle's clipped sum within float32 rounding."""
    from dpclip.grad_sample import rules as rules_mod

    if (rules_mod._convpsg is None or not rules_mod._convpsg.available() or rules_mod._normpsg is None
            or rules_mod._gram is None or not rules_mod._gram.available()):
        pytest.skip("dpclip's kernels are not built or this CPU has no AVX2")
    used = {"conv": set(), "conv_t": 0, "norm": 0, "gram": 0}
    run, psg_t, norm_run = rules_mod._conv_kernel_run, rules_mod._conv_psg_t, rules_mod._norm_kernel_run
    gram = rules_mod._gram_kernel
    monkeypatch.setattr(rules_mod, "_gram_kernel", lambda *a, **k: used.__setitem__("gram", used["gram"] + 1) or gram(*a, **k))
    monkeypatch.setattr(rules_mod, "_conv_kernel_run", lambda fn, *a: used["conv"].add(fn.__name__) or run(fn, *a))
    monkeypatch.setattr(rules_mod, "_conv_psg_t", lambda *a: used.__setitem__("conv_t", used["conv_t"] + 1) or psg_t(*a))
    monkeypatch.setattr(rules_mod, "_norm_kernel_run", lambda *a: used.__setitem__("norm", used["norm"] + 1) or norm_run(*a))
    torch.manual_seed(0)
    model = KernelPaths()
    reference = copy.deepcopy(model).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, 3, 28, 28, generator=g)
    y = torch.randint(0, 3, (N,), generator=g)
    C = 0.5
    L = len(_layer_groups(model))
    bounds = [C] if clipping == "flat" else [C / math.sqrt(L)] * L
    engine = PrivacyEngine()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=DataLoader(TensorDataset(x, y), batch_size=N), noise_multiplier=0.0,
        max_grad_norm=C, clipping=clipping, generator=torch.Generator().manual_seed(0),
    )
    want, _ = _oracle(reference, x.double(), y, clipping, bounds, float(N))
    got = _run_step(model, opt, loader)
    for n in want:
        scale = want[n].abs().max().item()
        # the float32 forward and backward themselves are off by up to 3.5e-5 of the largest
        # entry here (gn.weight), with torch's norm path as with the kernel
        torch.testing.assert_close(got[n].double(), want[n], rtol=1e-4, atol=1e-4 * scale, msg=n)
    assert used["conv"] >= {"conv2d_psg", "conv2d_psg_t", "conv2d_psg_p"} and used["conv_t"] >= 2
    assert used["norm"] >= 2
    assert used["gram"] >= 1


@pytest.mark.parametrize("model_kind", list(MODELS) + ["cnn_bn"])
@pytest.mark.parametrize("per_layer", [False, True])
def test_batch_clipping_matches_autograd_on_each_micro_batch(model_kind, per_layer):
    model, data = _setup(model_kind, n=12)
    reference = copy.deepcopy(model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    C = 0.05
    max_grad_norm = [C] * len(trainable) if per_layer else C
    engine = PrivacyEngine()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=DataLoader(data, batch_size=12), noise_multiplier=0.0,
        max_grad_norm=max_grad_norm, clipping="batch", batch_clip_size=3, generator=torch.Generator().manual_seed(0),
    )
    units = 4  # round(12 / 3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    want = {n: torch.zeros_like(p) for n, p in reference.named_parameters()}
    chunks = list(loader)
    assert sum(len(xb) for xb, _ in chunks) == 12 and 1 <= len(chunks) <= units
    for j, (xb, yb) in enumerate(chunks):
        F.cross_entropy(model(xb), yb).backward()
        opt.step()
        opt.zero_grad()
        moved = any(not torch.equal(before[n], p) for n, p in model.named_parameters())
        assert moved == (j == len(chunks) - 1)  # the model moves once per logical batch
        reference.zero_grad()
        F.cross_entropy(reference(xb), yb).backward()
        grads = {n: p.grad.detach().clone() for n, p in reference.named_parameters()}
        if per_layer:
            for n in trainable:
                want[n] += grads[n] * min(1.0, C / float(grads[n].norm()))
        else:
            total = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
            for n in trainable:
                want[n] += grads[n] * min(1.0, C / total)
    for n, p in model.named_parameters():
        torch.testing.assert_close(before[n] - p.detach(), want[n] / units, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", ["auto", "hooks", "vmap", "bookkeeping"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("clipping", ["flat", "per_layer", "batch"])
def test_no_noise_and_no_clipping_is_plain_training(mode, optimizer, clipping):
    model, data = _setup("mlp", n=16)
    plain = copy.deepcopy(model)
    make = (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)) if optimizer == "sgd" else (
        lambda ps: torch.optim.Adam(ps, lr=0.01)
    )
    opt, plain_opt = make(model.parameters()), make(plain.parameters())
    bound = math.inf if clipping != "per_layer" else [math.inf] * 4
    model, opt, loader = PrivacyEngine().make_private(
        module=model, optimizer=opt, data_loader=DataLoader(data, batch_size=4), noise_multiplier=0.0,
        max_grad_norm=bound, poisson_sampling=False, grad_sample_mode=mode, clipping=clipping,
    )
    for _ in range(2):
        for xb, yb in loader:
            for m, o in ((model, opt), (plain, plain_opt)):
                F.cross_entropy(m(xb), yb).backward()
                o.step()
                o.zero_grad()
    for a, b in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "clipping, kwargs, sensitivity, divisor",
    [
        ("flat", {"max_grad_norm": 1.5}, 1.5, 10.0),
        ("per_layer", {"max_grad_norm": [1.0, 2.0]}, math.sqrt(5.0), 10.0),
        ("automatic", {"max_grad_norm": 1.0}, 1.0, 10.0),
        ("batch", {"max_grad_norm": 1.5, "batch_clip_size": 2}, 3.0, 5.0),
        ("adaptive_layerwise", {"max_grad_norm": [1.0, 2.0], "clip_controller": Quantile(learning_rate=1e-12, count_noise_multiplier=4.0)},
         math.sqrt(5.0), 10.0),
    ],
)
def test_noise_std_is_sigma_times_the_sensitivity(clipping, kwargs, sensitivity, divisor):
    model = nn.Linear(30, 20).double()
    data = TensorDataset(torch.zeros(100, 30, dtype=torch.float64), torch.zeros(100, 20, dtype=torch.float64))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = PrivacyEngine()
    model, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=DataLoader(data, batch_size=10), noise_multiplier=2.0,
        clipping=clipping, generator=torch.Generator().manual_seed(3), **kwargs,
    )
    draws = []
    for _ in range(6):
        before = model.weight.detach().clone()
        for xb, yb in loader:
            (0.0 * model(xb).sum()).backward()  # zero gradients: every update is pure noise
            opt.step()
            opt.zero_grad()
        draws.append(before - model.weight.detach())
    assert engine.steps == 60
    sigma = 2.0
    if clipping == "adaptive_layerwise":  # the counts take their share: sigma_grad = (sigma^-2 - 4^-2)^-1/2
        sigma = (2.0**-2 - 4.0**-2) ** -0.5
    expected_std = sigma * sensitivity / divisor * math.sqrt(10)  # each draw sums the 10 steps of an epoch
    assert float(torch.stack(draws).std()) == pytest.approx(expected_std, rel=0.03)
    assert engine.accountant.history == [(2.0, 0.1, 60)]


def test_virtual_batches_give_the_same_run_as_whole_batches():
    def run(physical: int | None):
        model, data = _setup("mlp", n=40)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        engine = PrivacyEngine()
        model, opt, loader = engine.make_private(
            module=model, optimizer=opt, data_loader=DataLoader(data, batch_size=10), noise_multiplier=0.7,
            max_grad_norm=0.5, generator=torch.Generator().manual_seed(11),
        )
        sizes = []
        for _ in range(2):
            if physical is None:
                batches = loader
            else:
                batches = BatchMemoryManager(data_loader=loader, max_physical_batch_size=physical, optimizer=opt)
                batches = batches.__enter__()
            for xb, yb in batches:
                sizes.append(len(xb))
                F.cross_entropy(model(xb), yb).backward()
                opt.step()
                opt.zero_grad()
        return [p.detach().clone() for p in model.parameters()], engine, sizes

    whole, e1, s1 = run(None)
    virtual, e2, s2 = run(3)
    assert max(s2) <= 3 < max(s1) and sum(s1) == sum(s2)
    for a, b in zip(whole, virtual):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert e1.accountant.history == e2.accountant.history == [(0.7, 0.25, 8)]


def test_batch_clipping_refuses_batchnorm_that_would_learn_from_private_data():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()
    data = TensorDataset(torch.randn(8, 1, 6, 6, dtype=torch.float64), torch.randint(0, 3, (8,)))
    with pytest.raises(ValueError, match="track_running_stats=False.*momentum=0.0"):
        PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(data, batch_size=4), noise_multiplier=1.0, max_grad_norm=1.0, clipping="batch",
        )
    model[1].momentum = 0.0  # frozen running statistics: allowed, and they stay frozen
    stats = model[1].running_mean.clone()
    _, opt, loader = PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=4), noise_multiplier=1.0, max_grad_norm=1.0, clipping="batch",
    )
    for xb, yb in loader:
        if len(xb) > 1:
            F.cross_entropy(model(xb), yb).backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(model[1].running_mean, stats)


def test_per_layer_bounds_by_module_name():
    model, data = _setup("mlp")
    reference = copy.deepcopy(model)
    engine = PrivacyEngine()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model, opt, loader = engine.make_private(
        module=model, optimizer=opt, data_loader=DataLoader(data, batch_size=N), noise_multiplier=0.0,
        max_grad_norm={"fc1": 0.2, "fc2": 0.3}, clipping="per_layer", generator=torch.Generator().manual_seed(0),
    )
    want, _ = _oracle(reference, *data.tensors, "per_layer", [0.2, 0.3], float(N))
    got = _run_step(model, opt, loader)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="no bound for the trainable parameters.*fc2"):
        PrivacyEngine().make_private(
            module=_setup("mlp")[0], optimizer=torch.optim.SGD(_setup("mlp")[0].parameters(), lr=1.0),
            data_loader=DataLoader(data, batch_size=N), noise_multiplier=1.0, max_grad_norm={"fc1": 0.2},
            clipping="per_layer",
        )
