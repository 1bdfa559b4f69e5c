"""Batched per-sample gradients of nn.RNN / nn.LSTM / nn.GRU (dpclip.grad_sample.rnn).

Checked against the float64 per-sample loop oracle (whole model, one forward/backward per
sample) and against the exact per-sample loop ``rnn_per_sample_grads`` it replaces.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpclip.grad_sample import rnn as rnn_mod
from dpclip.grad_sample.hooks import GradSampler
from dpclip.grad_sample.rnn import (
    rnn_per_sample_grads_batched,
    rnn_per_sample_sq_norms,
    unsupported_reason,
)
from dpclip.grad_sample.vmap import (
    RandomnessError,
    module_vjp_per_sample,
    rnn_per_sample_grads,
)
from tests.oracles import per_sample_grads_loop

DT = torch.float64
T = 4


def assert_grads_equal(got: dict, want: dict, atol=1e-10, rtol=1e-8):
    assert set(got) == set(want), (sorted(got), sorted(want))
    for n in want:
        assert got[n].shape == want[n].shape, (n, got[n].shape, want[n].shape)
        torch.testing.assert_close(got[n], want[n], atol=atol, rtol=rtol, msg=n)


@pytest.fixture
def no_loop(monkeypatch):
    """Fail if the batched path hands the call to the per-sample loop."""

    def boom(*a, **k):
        raise AssertionError("fell back to the per-sample loop")

    monkeypatch.setattr(rnn_mod, "rnn_per_sample_grads", boom)


class Net(nn.Module):
    """Input [B, T, 3] -> scalar per sample; uses output, h_n (and c_n), optional learned h0."""

    def __init__(self, make, *, batch_first, use_h0=False, use_hn=True):
        super().__init__()
        self.rnn = make()
        self.batch_first = batch_first
        self.use_h0, self.use_hn = use_h0, use_hn
        r = self.rnn
        self.D = 2 if r.bidirectional else 1
        self.h_out = r.proj_size if isinstance(r, nn.LSTM) and r.proj_size > 0 else r.hidden_size
        self.h0 = nn.Linear(3, r.num_layers * self.D * self.h_out)
        self.c0 = nn.Linear(3, r.num_layers * self.D * r.hidden_size)
        self.head = nn.Linear(self.D * self.h_out, 2)

    def forward(self, x):
        B = x.shape[0]
        seq = x if self.batch_first else x.transpose(0, 1)
        hx = None
        if self.use_h0:
            L = self.rnn.num_layers * self.D
            h0 = torch.tanh(self.h0(x[:, 0])).view(B, L, -1).transpose(0, 1).contiguous()
            if isinstance(self.rnn, nn.LSTM):
                c0 = self.c0(x[:, 0]).view(B, L, -1).transpose(0, 1).contiguous()
                hx = (h0, c0)
            else:
                hx = h0
        out, state = self.rnn(seq) if hx is None else self.rnn(seq, hx)
        if not self.batch_first:
            out = out.transpose(0, 1)
        y = self.head(out).pow(2).sum((1, 2))
        if self.use_hn:
            if isinstance(self.rnn, nn.LSTM):
                hn, cn = state
                y = y + (hn.sin().sum((0, 2)) + (cn * cn).sum((0, 2)))
            else:
                y = y + state.sin().sum((0, 2))
        return y


def loss_sum(out, _y):
    return out.sum()


def capture(model, x):
    """The RNN's positional inputs, kwargs and output gradient from one batched backward."""
    got = {}

    def fwd(mod, args, kwargs, out):
        got["inputs"] = tuple(
            a.detach() if torch.is_tensor(a)
            else tuple(t.detach() for t in a) if isinstance(a, tuple) else a
            for a in args
        )
        got["kwargs"] = kwargs
        got["out"] = out
        leaves = [out[0]] + (list(out[1]) if isinstance(out[1], tuple) else [out[1]])
        got["leaves"] = leaves
        for t in leaves:
            t.retain_grad()

    h = model.rnn.register_forward_hook(fwd, with_kwargs=True)
    try:
        model(x).sum().backward()
    finally:
        h.remove()
        model.zero_grad(set_to_none=True)
    g = [t.grad for t in got["leaves"]]
    grad_output = (g[0], (g[1], g[2])) if len(g) == 3 else (g[0], g[1])
    return got["inputs"], got["kwargs"], grad_output


CONFIGS = {
    "lstm": lambda bf, **k: nn.LSTM(3, 4, batch_first=bf, **k),
    "gru": lambda bf, **k: nn.GRU(3, 4, batch_first=bf, **k),
    "rnn_tanh": lambda bf, **k: nn.RNN(3, 4, batch_first=bf, **k),
    "rnn_relu": lambda bf, **k: nn.RNN(3, 4, nonlinearity="relu", batch_first=bf, **k),
}

VARIANTS = {
    "plain": {},
    "2layers_bidir": dict(num_layers=2, bidirectional=True),
    "nobias": dict(bias=False),
    "2layers_nobias": dict(num_layers=2, bias=False),
    "bidir": dict(bidirectional=True),
}


def check(model, x, *, batched_kwargs=None):
    want = per_sample_grads_loop(model, loss_sum, x, torch.zeros(len(x)))
    want = {n[4:]: g for n, g in want.items() if n.startswith("rnn.")}
    inputs, kwargs, go = capture(model, x)
    loop = rnn_per_sample_grads(model.rnn, inputs, go, kwargs=kwargs)
    got = rnn_per_sample_grads_batched(model.rnn, inputs, go, kwargs=kwargs)
    assert_grads_equal(loop, want)
    assert_grads_equal(got, want)
    return got


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", list(CONFIGS))
def test_against_oracle(kind, batch_first, variant, no_loop):
    torch.manual_seed(1)
    model = Net(
        lambda: CONFIGS[kind](batch_first, **VARIANTS[variant]), batch_first=batch_first
    ).to(DT)
    check(model, torch.randn(5, T, 3, dtype=DT))


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("batch_first", [True, False])
def test_with_h0_and_state_losses(kind, batch_first, no_loop):
    torch.manual_seed(2)
    model = Net(
        lambda: CONFIGS[kind](batch_first, num_layers=2, bidirectional=True),
        batch_first=batch_first,
        use_h0=True,
    ).to(DT)
    check(model, torch.randn(4, T, 3, dtype=DT))


@pytest.mark.parametrize("batch_first", [True, False])
def test_lstm_proj_size(batch_first, no_loop):
    torch.manual_seed(3)
    model = Net(
        lambda: nn.LSTM(3, 5, proj_size=2, num_layers=2, bidirectional=True,
                        batch_first=batch_first),
        batch_first=batch_first,
        use_h0=True,
    ).to(DT)
    got = check(model, torch.randn(4, T, 3, dtype=DT))
    assert "weight_hr_l1_reverse" in got


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_batch_of_one(kind, no_loop):
    torch.manual_seed(4)
    model = Net(lambda: CONFIGS[kind](True, num_layers=2), batch_first=True, use_h0=True)
    check(model.to(DT), torch.randn(1, T, 3, dtype=DT))


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_empty_batch(kind):
    rnn = CONFIGS[kind](True).to(DT)
    x = torch.zeros(0, T, 3, dtype=DT)
    got = rnn_per_sample_grads_batched(rnn, (x,), (torch.zeros(0, T, 4, dtype=DT), None))
    want = rnn_per_sample_grads(rnn, (x,), (torch.zeros(0, T, 4, dtype=DT), None))
    assert_grads_equal(got, want)
    assert all(g.shape[0] == 0 for g in got.values())


def test_grad_output_forms(no_loop):
    """Bare tensor, (g, None), (g, (None, gc)), all-None; hx as keyword."""
    torch.manual_seed(5)
    lstm = nn.LSTM(3, 4, num_layers=2).to(DT)
    x = torch.randn(T, 3, 3, dtype=DT)
    hx = (torch.randn(2, 3, 4, dtype=DT), torch.randn(2, 3, 4, dtype=DT))
    g = torch.randn(T, 3, 4, dtype=DT)
    gc = torch.randn(2, 3, 4, dtype=DT)
    for go in (g, (g, None), (g, (None, gc)), (None, (None, gc))):
        want = rnn_per_sample_grads(lstm, (x, hx), go)
        assert_grads_equal(rnn_per_sample_grads_batched(lstm, (x, hx), go), want)
        assert_grads_equal(rnn_per_sample_grads_batched(lstm, (x,), go, kwargs={"hx": hx}), want)
    zero = rnn_per_sample_grads_batched(lstm, (x, hx), (None, None))
    assert all(torch.equal(v, torch.zeros_like(v)) for v in zero.values())


def test_params_subset(no_loop):
    torch.manual_seed(6)
    gru = nn.GRU(3, 4, bidirectional=True).to(DT)
    x, g = torch.randn(T, 3, 3, dtype=DT), torch.randn(T, 3, 8, dtype=DT)
    sub = {"weight_hh_l0_reverse": gru.weight_hh_l0_reverse, "bias_ih_l0": gru.bias_ih_l0}
    got = rnn_per_sample_grads_batched(gru, (x,), g, params=sub)
    assert_grads_equal(got, rnn_per_sample_grads(gru, (x,), g, params=sub))


def test_sq_norms(no_loop):
    torch.manual_seed(7)
    lstm = nn.LSTM(3, 4, batch_first=True).to(DT)
    x, g = torch.randn(3, T, 3, dtype=DT), torch.randn(3, T, 4, dtype=DT)
    want = rnn_per_sample_grads(lstm, (x,), g)
    got = rnn_per_sample_sq_norms(lstm, (x,), g)
    for n in want:
        torch.testing.assert_close(got[n], want[n].flatten(1).pow(2).sum(1))


def test_float32_close_to_loop(no_loop):
    torch.manual_seed(8)
    lstm = nn.LSTM(3, 8, num_layers=2, batch_first=True)
    x, g = torch.randn(4, 10, 3), torch.randn(4, 10, 8)
    assert_grads_equal(
        rnn_per_sample_grads_batched(lstm, (x,), g),
        rnn_per_sample_grads(lstm, (x,), g),
        atol=1e-5,
        rtol=1e-4,
    )


def test_unsupported_go_to_the_loop():
    torch.manual_seed(9)
    lstm = nn.LSTM(3, 4, num_layers=2, dropout=0.5).to(DT)  # train mode
    x = torch.randn(T, 2, 3, dtype=DT)
    assert "dropout" in unsupported_reason(lstm, (x,))
    with pytest.raises(RandomnessError):
        module_vjp_per_sample(lstm, (x,), torch.randn(T, 2, 4, dtype=DT))
    lstm.eval()
    assert unsupported_reason(lstm, (x,)) is None
    packed = nn.utils.rnn.pack_padded_sequence(x, [T, T - 1])
    assert "Packed" in unsupported_reason(lstm, (packed,))
    with pytest.raises(TypeError, match="PackedSequence"):
        module_vjp_per_sample(lstm, (packed,), None)
    assert "3-D" in unsupported_reason(lstm, (x[:, 0],))

    class MyLSTM(nn.LSTM):
        pass

    assert "exactly" in unsupported_reason(MyLSTM(3, 4), (x,))
    assert "dtype" in unsupported_reason(nn.LSTM(3, 4).half(), (x.half(),))


def test_mismatch_falls_back_to_loop_with_warning(monkeypatch):
    torch.manual_seed(10)
    gru = nn.GRU(3, 4).to(DT)
    x, g = torch.randn(T, 2, 3, dtype=DT), torch.randn(T, 2, 4, dtype=DT)
    want = rnn_per_sample_grads(gru, (x,), g)
    real = rnn_mod._recompute

    def wrong(*a):
        out, hn, cn, rec = real(*a)
        return out + 1e-3, hn, cn, rec

    monkeypatch.setattr(rnn_mod, "_recompute", wrong)
    with pytest.warns(RuntimeWarning, match="differs"):
        got = rnn_per_sample_grads_batched(gru, (x,), g)
    assert_grads_equal(got, want)


def test_grad_sampler_uses_batched_path(no_loop):
    """The hooks engine (fallback unit) reaches the batched path and agrees with the oracle."""
    torch.manual_seed(11)
    model = Net(lambda: nn.LSTM(3, 4, num_layers=2, batch_first=True), batch_first=True,
                use_h0=True).to(DT)
    x = torch.randn(5, T, 3, dtype=DT)
    want = per_sample_grads_loop(model, loss_sum, x, torch.zeros(5))
    with GradSampler(model, loss_reduction="sum") as gs:
        model(x).sum().backward()
        got = gs.per_sample_grads()
        norms = gs.per_sample_sq_norms()
    names = {p: n for n, p in model.named_parameters()}
    assert_grads_equal({names[p]: g for p, g in got.items()}, want, atol=1e-9)
    for p, sq in norms.items():
        torch.testing.assert_close(sq, want[names[p]].flatten(1).pow(2).sum(1))


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("variant", ["plain", "2layers_bidir", "nobias"])
@pytest.mark.parametrize("ghost", ["auto", "always"])
def test_grad_sampler_book_keeping_without_per_sample_tensors(kind, variant, ghost, monkeypatch, no_loop):
    """Norms and clipped sums of a recurrent unit come from its Linear pieces (rnn.expand):
    the [B, *weight] gradients are never formed, and both agree with the float64 oracle."""
    torch.manual_seed(3)
    model = Net(lambda: CONFIGS[kind](True, **VARIANTS[variant]), batch_first=True, use_h0=True).to(DT)
    x = torch.randn(6, T, 3, dtype=DT)
    want = per_sample_grads_loop(model, loss_sum, x, torch.zeros(6))

    def boom(*a, **k):
        raise AssertionError("materialised the recurrent unit's per-sample gradients")

    monkeypatch.setattr(rnn_mod, "rnn_per_sample_grads_batched", boom)
    scales = torch.rand(6, dtype=DT)
    with GradSampler(model, loss_reduction="sum", ghost=ghost) as gs:
        model(x).sum().backward()
        norms = gs.per_sample_sq_norms()
        sums = gs.clipped_sums({p: scales for p in gs.parameters})
    names = {p: n for n, p in model.named_parameters()}
    for p, sq in norms.items():
        torch.testing.assert_close(sq, want[names[p]].flatten(1).pow(2).sum(1), rtol=1e-9, atol=1e-12)
    for p, s in sums.items():
        torch.testing.assert_close(s, torch.tensordot(scales, want[names[p]], dims=1), rtol=1e-9, atol=1e-12)


def test_lstm_proj_size_book_keeping(monkeypatch, no_loop):
    torch.manual_seed(4)
    model = Net(lambda: nn.LSTM(3, 5, proj_size=2, num_layers=2, batch_first=True), batch_first=True).to(DT)
    x = torch.randn(4, T, 3, dtype=DT)
    want = per_sample_grads_loop(model, loss_sum, x, torch.zeros(4))
    monkeypatch.setattr(rnn_mod, "rnn_per_sample_grads_batched", lambda *a, **k: (_ for _ in ()).throw(AssertionError()))
    with GradSampler(model, loss_reduction="sum") as gs:
        model(x).sum().backward()
        norms = gs.per_sample_sq_norms()
        sums = gs.clipped_sums({p: torch.ones(4, dtype=DT) for p in gs.parameters})
    names = {p: n for n, p in model.named_parameters()}
    for p in norms:
        torch.testing.assert_close(norms[p], want[names[p]].flatten(1).pow(2).sum(1), rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(sums[p], want[names[p]].sum(0), rtol=1e-9, atol=1e-12)


def test_subclass_still_materialises():
    """A subclass of nn.LSTM (its forward may differ) gets no pieces: its per-sample gradients
    are materialised through the per-sample loop, and the norms still match the oracle."""

    class MyLSTM(nn.LSTM):
        pass

    torch.manual_seed(5)
    model = Net(lambda: MyLSTM(3, 4, batch_first=True), batch_first=True).to(DT)
    x = torch.randn(3, T, 3, dtype=DT)
    want = per_sample_grads_loop(model, loss_sum, x, torch.zeros(3))
    calls = []
    real = rnn_mod.rnn_per_sample_grads

    def counted(*a, **k):
        calls.append(1)
        return real(*a, **k)

    import dpclip.grad_sample.vmap as vmap_mod

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rnn_mod, "rnn_per_sample_grads", counted)
        mp.setattr(vmap_mod, "rnn_per_sample_grads", counted)
        with GradSampler(model, loss_reduction="sum") as gs:
            model(x).sum().backward()
            norms = gs.per_sample_sq_norms()
    assert calls, "the subclass should have gone to the per-sample loop"
    names = {p: n for n, p in model.named_parameters()}
    for p in norms:
        torch.testing.assert_close(norms[p], want[names[p]].flatten(1).pow(2).sum(1), rtol=1e-9, atol=1e-12)
