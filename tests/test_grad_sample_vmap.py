"""torch.func per-sample gradients (dpclip.grad_sample.vmap) against the float64 per-sample loop."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpclip.grad_sample.vmap import (
    RandomnessError,
    module_vjp_per_sample,
    per_sample_grads_vmap,
    rnn_per_sample_grads,
)
from tests.oracles import per_sample_grads_loop

DT = torch.float64
B = 5


def ce(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def assert_grads_equal(got: dict, want: dict, atol=1e-10, rtol=1e-8):
    assert set(got) == set(want), (sorted(got), sorted(want))
    for n in want:
        assert got[n].shape == want[n].shape, (n, got[n].shape, want[n].shape)
        torch.testing.assert_close(got[n], want[n], atol=atol, rtol=rtol, msg=n)


# ---------------------------------------------------------------------------------- models


class Scale(nn.Module):
    """A custom layer that uses its parameters directly in forward (no rule exists for it)."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d))
        self.bias = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return torch.tanh(x * self.weight) + self.bias**2


class Composite(nn.Module):
    """A custom module owning a child Linear and a parameter of its own."""

    def __init__(self, d):
        super().__init__()
        self.inner = nn.Linear(d, d)
        self.gate = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return self.inner(x) * torch.sigmoid(self.gate)


def mlp():
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)


def cnn():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 3),
    ).to(DT)


class EmbNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, tok):
        return self.head(self.norm(self.emb(tok)).mean(1))


class CustomNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.scale = Scale(6)
        self.comp = Composite(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.comp(self.scale(self.lin(x))))


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.mix = nn.Linear(6, 6)
        self.out = nn.Linear(6, 10, bias=False)
        self.out.weight = self.emb.weight  # tied: one tensor, two uses

    def forward(self, tok):
        return self.out(torch.tanh(self.mix(self.emb(tok).mean(1))))


class AttnNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h, _ = self.attn(x, x, x, need_weights=False)
        return self.head(h.mean(1))


class RNNNet(nn.Module):
    def __init__(self, cls, batch_first, num_layers=1, bidirectional=False):
        super().__init__()
        self.batch_first = batch_first
        self.rnn = cls(3, 4, num_layers=num_layers, batch_first=batch_first,
                       bidirectional=bidirectional)
        self.head = nn.Linear(4 * (2 if bidirectional else 1), 3)

    def forward(self, x):  # x is [B, T, 3] in both layouts; the model transposes
        seq = x if self.batch_first else x.transpose(0, 1)
        out, _ = self.rnn(seq)
        last = out[:, -1] if self.batch_first else out[-1]
        return self.head(last)


def data_vec(d=4, n=B):
    return torch.randn(n, d, dtype=DT), torch.randint(0, 3, (n,))


# ---------------------------------------------------------------------------- whole model


@pytest.mark.parametrize(
    "make, make_x",
    [
        (mlp, lambda: torch.randn(B, 4, dtype=DT)),
        (cnn, lambda: torch.randn(B, 2, 5, 5, dtype=DT)),
        (lambda: EmbNet().to(DT), lambda: torch.randint(0, 10, (B, 7))),
        (lambda: CustomNet().to(DT), lambda: torch.randn(B, 4, dtype=DT)),
        (lambda: AttnNet().to(DT), lambda: torch.randn(B, 3, 4, dtype=DT)),
    ],
    ids=["mlp", "cnn", "embedding", "custom", "attention"],
)
@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_whole_model_matches_loop(make, make_x):
    torch.manual_seed(0)
    model, x = make(), make_x()
    y = torch.randint(0, 3, (B,))
    want = per_sample_grads_loop(model, ce, x, y)
    got = per_sample_grads_vmap(model, ce, x, y)
    assert_grads_equal(got, want)
    assert all(p.grad is None for p in model.parameters())


def test_chunk_size_and_batch_of_one():
    torch.manual_seed(1)
    model = cnn()
    x, y = torch.randn(B, 2, 5, 5, dtype=DT), torch.randint(0, 3, (B,))
    want = per_sample_grads_loop(model, ce, x, y)
    assert_grads_equal(per_sample_grads_vmap(model, ce, x, y, chunk_size=2), want)
    one = per_sample_grads_vmap(model, ce, x[:1], y[:1])
    assert_grads_equal(one, {n: g[:1] for n, g in want.items()})
    empty = per_sample_grads_vmap(model, ce, x[:0], y[:0])
    assert all(g.shape == (0, *p.shape) for (n, g), p in zip(empty.items(), model.parameters()))


def test_tied_weights_get_both_uses():
    torch.manual_seed(2)
    model = TiedLM().to(DT)
    tok, y = torch.randint(0, 10, (B, 4)), torch.randint(0, 10, (B,))
    got = per_sample_grads_vmap(model, ce, tok, y)
    assert "emb.weight" in got and "out.weight" not in got
    assert_grads_equal(got, per_sample_grads_loop(model, ce, tok, y))
    # both uses contribute: the output projection alone gives a different gradient
    untied = TiedLM().to(DT)
    untied.load_state_dict(model.state_dict())
    untied.out.weight = nn.Parameter(model.emb.weight.detach().clone())
    g2 = per_sample_grads_loop(untied, ce, tok, y)
    torch.testing.assert_close(got["emb.weight"], g2["emb.weight"] + g2["out.weight"])


def test_frozen_parameters_excluded():
    torch.manual_seed(3)
    model = mlp()
    model[0].weight.requires_grad_(False)
    x, y = data_vec()
    got = per_sample_grads_vmap(model, ce, x, y)
    assert set(got) == {"0.bias", "2.weight", "2.bias"}
    assert_grads_equal(got, per_sample_grads_loop(model, ce, x, y))


def test_buffers_pass_through_in_eval_batchnorm():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3)).to(DT)
    model.train()
    model(torch.randn(20, 4, dtype=DT))  # non-trivial running statistics
    model.eval()
    x, y = data_vec()
    want = per_sample_grads_loop(model, ce, x, y)
    assert_grads_equal(per_sample_grads_vmap(model, ce, x, y), want)


def test_dropout_in_train_mode_is_a_clear_error():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 3)).to(DT)
    x, y = data_vec()
    with pytest.raises(RandomnessError, match="randomness='different'"):
        per_sample_grads_vmap(model, ce, x, y)
    got = per_sample_grads_vmap(model, ce, x, y, randomness="different")
    assert got["0.weight"].shape == (B, 8, 4)
    model.eval()
    want = per_sample_grads_loop(model, ce, x, y)
    assert_grads_equal(per_sample_grads_vmap(model, ce, x, y), want)


def test_functional_dropout_caught_at_run_time():
    class F_Drop(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return F.dropout(self.lin(x), 0.3, training=True)

    x, y = data_vec()
    with pytest.raises(RandomnessError, match="random"):
        per_sample_grads_vmap(F_Drop().to(DT), ce, x, y)


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
def test_whole_model_with_rnn_uses_exact_loop(cls):
    torch.manual_seed(6)
    model = RNNNet(cls, batch_first=True).to(DT)
    x, y = torch.randn(B, 4, 3, dtype=DT), torch.randint(0, 3, (B,))
    want = per_sample_grads_loop(model, ce, x, y)
    assert_grads_equal(per_sample_grads_vmap(model, ce, x, y), want)


# ---------------------------------------------------------------------------- per module


def capture(model, module, x, y):
    """Run the batch (sum loss) with hooks on ``module``: its inputs, kwargs and grad_output."""
    got = {}

    def fwd(mod, args, kwargs, out):
        got["inputs"] = tuple(a.detach() if torch.is_tensor(a) else a for a in args)
        got["kwargs"] = kwargs

    def bwd(mod, grad_in, grad_out):
        got["grad_output"] = grad_out

    h1 = module.register_forward_hook(fwd, with_kwargs=True)
    h2 = module.register_full_backward_hook(bwd)
    try:
        with warnings.catch_warnings():
            # full backward hooks warn when no module input requires grad: expected here
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            ce(model(x), y).backward()
    finally:
        h1.remove()
        h2.remove()
        model.zero_grad(set_to_none=True)
    return got["inputs"], got["kwargs"], got["grad_output"]


def restrict(grads, prefix):
    return {n[len(prefix) + 1 :]: g for n, g in grads.items() if n.startswith(prefix + ".")}


def check_module(model, prefix, x, y, **kw):
    module = model.get_submodule(prefix)
    want = restrict(per_sample_grads_loop(model, ce, x, y), prefix)
    inputs, kwargs, grad_output = capture(model, module, x, y)
    got = module_vjp_per_sample(module, inputs, grad_output, kwargs=kwargs, **kw)
    assert_grads_equal(got, want)
    return got


@pytest.mark.parametrize("prefix", ["scale", "comp", "lin", "head"])
def test_module_fallback_custom_and_linear(prefix):
    torch.manual_seed(7)
    model = CustomNet().to(DT)
    x, y = data_vec()
    got = check_module(model, prefix, x, y)
    if prefix == "comp":  # a composite module owns its children's parameters
        assert set(got) == {"gate", "inner.weight", "inner.bias"}


def test_module_fallback_conv_and_groupnorm():
    torch.manual_seed(8)
    model = cnn()
    x, y = torch.randn(B, 2, 5, 5, dtype=DT), torch.randint(0, 3, (B,))
    check_module(model, "0", x, y)
    check_module(model, "1", x, y)


def test_module_fallback_params_subset_and_frozen():
    torch.manual_seed(9)
    model = CustomNet().to(DT)
    x, y = data_vec()
    comp = model.comp
    inputs, kwargs, go = capture(model, comp, x, y)
    want = restrict(per_sample_grads_loop(model, ce, x, y), "comp")
    sub = module_vjp_per_sample(comp, inputs, go, params={"gate": comp.gate})
    assert set(sub) == {"gate"}
    torch.testing.assert_close(sub["gate"], want["gate"])
    comp.inner.weight.requires_grad_(False)
    got = module_vjp_per_sample(comp, inputs, go)
    assert set(got) == {"gate", "inner.bias"}
    with pytest.raises(KeyError):
        module_vjp_per_sample(comp, inputs, go, params={"nope": comp.gate})


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_module_fallback_multihead_attention():
    torch.manual_seed(10)
    model = AttnNet().to(DT)
    x, y = torch.randn(B, 3, 4, dtype=DT), torch.randint(0, 3, (B,))
    got = check_module(model, "attn", x, y)
    assert set(got) == {"in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"}


def test_module_fallback_dropout_inside_module_is_refused():
    torch.manual_seed(11)
    model = AttnNet().to(DT)
    model.attn.dropout = 0.5
    x, y = torch.randn(B, 3, 4, dtype=DT), torch.randint(0, 3, (B,))
    inputs, kwargs, go = capture(model, model.attn, x, y)
    with pytest.raises(RandomnessError, match="different mask"):
        module_vjp_per_sample(model.attn, inputs, go, kwargs=kwargs)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU, nn.RNN])
def test_module_fallback_rnn(cls, batch_first):
    torch.manual_seed(12)
    model = RNNNet(cls, batch_first).to(DT)
    x, y = torch.randn(B, 4, 3, dtype=DT), torch.randint(0, 3, (B,))
    got = check_module(model, "rnn", x, y)
    assert set(got) == {"weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"}


def test_module_fallback_rnn_two_layers_bidirectional_with_h0_and_hn_grad():
    torch.manual_seed(13)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.GRU(3, 4, num_layers=2, bidirectional=True)  # batch dim 1
            self.h0 = nn.Linear(3, 4)
            self.head = nn.Linear(8 + 4, 3)

        def forward(self, x):  # x [B, T, 3]
            seq = x.transpose(0, 1)
            h0 = torch.tanh(self.h0(x[:, 0])).unsqueeze(0).expand(4, -1, -1).contiguous()
            out, hn = self.rnn(seq, h0)
            return self.head(torch.cat([out[-1], hn[-1]], dim=1))

    model = Net().to(DT)
    x, y = torch.randn(B, 4, 3, dtype=DT), torch.randint(0, 3, (B,))
    got = check_module(model, "rnn", x, y)
    assert len(got) == 16


def test_rnn_direct_call_with_tuple_grad_and_none():
    torch.manual_seed(14)
    lstm = nn.LSTM(3, 4, batch_first=True).to(DT)
    x = torch.randn(B, 6, 3, dtype=DT)
    g = torch.randn(B, 6, 4, dtype=DT)
    got = rnn_per_sample_grads(lstm, (x,), (g, None))
    for i in range(B):
        lstm.zero_grad()
        out, _ = lstm(x[i : i + 1])
        (out * g[i : i + 1]).sum().backward()
        for n, p in lstm.named_parameters():
            torch.testing.assert_close(got[n][i], p.grad)
    # the same through the generic entry point, and a bare tensor grad_output
    same = module_vjp_per_sample(lstm, (x,), g)
    assert_grads_equal(same, got)


def test_module_fallback_tuple_output_with_unused_entry():
    """grad_output (g, None): the unused output contributes nothing (None means zeros)."""
    torch.manual_seed(15)

    class TwoOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            h = x @ self.weight
            return torch.tanh(h), h.pow(2).sum(-1)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.two = TwoOut()
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            a, _unused = self.two(x)
            return self.head(a)

    model = Net().to(DT)
    x, y = data_vec()
    check_module(model, "two", x, y)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_module_fallback_attention_with_weights_returned():
    torch.manual_seed(16)

    class Net(AttnNet):
        def forward(self, x):
            h, w = self.attn(x, x, x)  # need_weights=True: (output, averaged weights)
            return self.head(h.mean(1)) + w.sum((1, 2))[:, None]

    model = Net().to(DT)
    x, y = torch.randn(B, 3, 4, dtype=DT), torch.randint(0, 3, (B,))
    check_module(model, "attn", x, y)

    class NetUnused(AttnNet):
        def forward(self, x):
            h, _w = self.attn(x, x, x)
            return self.head(h.mean(1))

    model = NetUnused().to(DT)
    check_module(model, "attn", x, y)


@pytest.mark.parametrize("cls", [nn.GRU, nn.RNN])
def test_module_fallback_rnn_batch_first_with_hn_grad(cls):
    """Output on dim 0 but h_n on dim 1 (batch_first=True), both receiving gradient."""
    torch.manual_seed(17)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = cls(3, 4, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            out, hn = self.rnn(x)
            return self.head(torch.cat([out.mean(1), hn[0]], dim=1))

    model = Net().to(DT)
    x, y = torch.randn(B, 4, 3, dtype=DT), torch.randint(0, 3, (B,))
    check_module(model, "rnn", x, y)


@pytest.mark.parametrize("prefix", ["comp", "rnn"])
def test_module_fallback_runs_inside_the_backward_hook(prefix):
    """The real use: called from the module's full backward hook, during loss.backward()."""
    torch.manual_seed(18)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(3, 6, batch_first=True)
            self.comp = Composite(6)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            out, _ = self.rnn(x)
            return self.head(self.comp(out[:, -1]))

    model = Net().to(DT)
    module = model.get_submodule(prefix)
    x, y = torch.randn(B, 4, 3, dtype=DT), torch.randint(0, 3, (B,))
    want = restrict(per_sample_grads_loop(model, ce, x, y), prefix)
    store = {}
    h1 = module.register_forward_hook(lambda m, a, o: store.update(inputs=a))
    h2 = module.register_full_backward_hook(
        lambda m, gi, go: store.update(got=module_vjp_per_sample(m, store["inputs"], go))
    )
    calls = []  # a child's hook (the engine's activation capture, say) must not re-fire
    h3 = model.comp.inner.register_forward_hook(lambda m, a, o: calls.append(1))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        ce(model(x), y).backward()
    assert len(calls) == 1
    assert len(module._forward_hooks) == 1 and len(module._backward_hooks) == 1  # restored
    for h in (h1, h2, h3):
        h.remove()
    assert_grads_equal(store["got"], want)
