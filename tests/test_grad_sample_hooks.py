"""GradSampler (hooks during the ordinary backward) and clip_and_sum against the float64 loop oracle.

Every test runs one ordinary forward/backward of a batch with a ``GradSampler`` attached and
compares per-sample gradients, per-sample squared norms, clipped sums and ``clip_and_sum``
with ``tests.oracles.per_sample_grads_loop`` (one forward/backward per sample).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpclip.grad_sample.bookkeeping import clip_and_sum
from dpclip.grad_sample.hooks import GradSampler, Unit, find_units, uncovered_parameters
from dpclip.grad_sample.rules import RULES
from tests.oracles import per_sample_grads_loop

DT = torch.float64
TOL = dict(atol=1e-9, rtol=1e-8)


# ---------------------------------------------------------------------------------- losses


def ce_sum(out, y):
    """Sum over the batch (and over positions for sequence outputs) of cross-entropy."""
    if out.dim() == 3:
        return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="sum")
    return F.cross_entropy(out, y, reduction="sum")


def ce_mean(out, y):
    """The batch mean of the per-sample losses (per-sample loss = sum over positions)."""
    return ce_sum(out, y) / out.shape[0]


LOSSES = {"sum": ce_sum, "mean": ce_mean}


# ---------------------------------------------------------------------------------- models


class Composite(nn.Module):
    """Uses its own parameter directly plus a child Linear: a fallback unit."""

    def __init__(self, d):
        super().__init__()
        self.inner = nn.Linear(d, d)
        self.gate = nn.Parameter(torch.randn(d))

    def forward(self, x):
        return torch.tanh(self.inner(x)) * torch.sigmoid(self.gate) + self.gate**2


class CustomNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 5)
        self.comp = Composite(5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.comp(self.lin(x)))


class SeqNet(nn.Module):
    """Embedding + LayerNorm + Linear over a sequence: per-token logits [B, T, C]."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 4)

    def forward(self, tok):
        return self.head(torch.tanh(self.norm(self.emb(tok))))


class AttnNet(nn.Module):
    def __init__(self, batch_first=True):
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=batch_first)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.proj(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head((a + h).mean(1))


class LSTMNet(nn.Module):
    def __init__(self, batch_first=True):
        super().__init__()
        self.batch_first = batch_first
        self.lstm = nn.LSTM(3, 4, batch_first=batch_first)
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # x [B, T, 3]
        seq = x if self.batch_first else x.transpose(0, 1)
        out, (hn, cn) = self.lstm(seq)
        last = out[:, -1] if self.batch_first else out[-1]
        return self.head(torch.cat([last, hn[0] * cn[0]], dim=1))


class TiedLM(nn.Module):
    """Embedding weight assigned to the output Linear: one Parameter, two rule units."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 5)
        self.mix = nn.Linear(5, 5)
        self.out = nn.Linear(5, 7, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, tok):
        return self.out(torch.tanh(self.mix(self.emb(tok))))


class TiedHead(nn.Module):
    """A custom output layer holding the embedding's Parameter and calling F.linear."""

    def __init__(self, emb: nn.Embedding):
        super().__init__()
        self.weight = emb.weight
        self.bias = nn.Parameter(torch.randn(emb.num_embeddings))

    def forward(self, h):
        return F.linear(h, self.weight, self.bias)


class TiedLMFunctional(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 5)
        self.norm = nn.LayerNorm(5)
        self.head = TiedHead(self.emb)

    def forward(self, tok):
        return self.head(self.norm(self.emb(tok)))


class Twice(nn.Module):
    """The same Linear applied twice in one forward (plus a shared-instance Sequential)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 5)
        self.shared = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.shared(self.inp(x)))
        return self.head(torch.tanh(self.shared(h)) + h)


def mlp():
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))


def cnn():
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3),
    )


def randomise(model: nn.Module, seed: int = 1) -> nn.Module:
    """float64, every parameter random (so affine norm parameters are not ones / zeros)."""
    model = model.to(DT)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=DT) * 0.5)
    return model


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def vec_data(B, d=4, C=3, seed=0):
    g = gen(seed)
    return torch.randn(B, d, generator=g, dtype=DT), torch.randint(0, C, (B,), generator=g)


def tok_data(B, T=5, V=7, C=None, seed=0):
    g = gen(seed)
    return torch.randint(0, V, (B, T), generator=g), torch.randint(0, C or V, (B, T), generator=g)


CASES = {
    "mlp": (lambda: mlp(), lambda B: vec_data(B)),
    "cnn": (lambda: cnn(), lambda B: (torch.randn(B, 2, 4, 4, generator=gen(), dtype=DT),
                                      torch.randint(0, 3, (B,), generator=gen(1)))),
    "seq": (lambda: SeqNet(), lambda B: tok_data(B, C=4)),
    "custom": (lambda: CustomNet(), lambda B: vec_data(B)),
    "attn": (lambda: AttnNet(), lambda B: (torch.randn(B, 3, 3, generator=gen(), dtype=DT),
                                           torch.randint(0, 3, (B,), generator=gen(1)))),
    "lstm": (lambda: LSTMNet(), lambda B: (torch.randn(B, 4, 3, generator=gen(), dtype=DT),
                                           torch.randint(0, 3, (B,), generator=gen(1)))),
    "lstm_seq_first": (lambda: LSTMNet(batch_first=False),
                       lambda B: (torch.randn(B, 4, 3, generator=gen(), dtype=DT),
                                  torch.randint(0, 3, (B,), generator=gen(1)))),
    "tied": (lambda: TiedLM(), lambda B: tok_data(B)),
    "tied_functional": (lambda: TiedLMFunctional(), lambda B: tok_data(B)),
    "twice": (lambda: Twice(), lambda B: vec_data(B)),
}


# ---------------------------------------------------------------------------------- checking


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def run(model, x, y, loss="mean", ghost="auto"):
    """One ordinary forward/backward with a sampler attached; returns the live sampler."""
    gs = GradSampler(model, loss_reduction=loss, ghost=ghost)
    model.zero_grad(set_to_none=True)
    LOSSES[loss](model(x), y).backward()
    return gs


def sq(g):
    return g.flatten(1).pow(2).sum(1)


def check(model, x, y, loss="mean", ghost="auto", seed=3):
    params = trainable(model)
    oracle = per_sample_grads_loop(model, ce_sum, x, y)
    B = len(x)
    gs = run(model, x, y, loss, ghost)
    try:
        assert gs.batch_size == B
        psg = gs.per_sample_grads()
        assert set(map(id, psg)) == set(map(id, params.values()))
        for n, p in params.items():
            assert psg[p].shape == (B, *p.shape), n
            torch.testing.assert_close(psg[p], oracle[n], **TOL, msg=n)
        norms = gs.per_sample_sq_norms()
        for n, p in params.items():
            assert norms[p].shape == (B,), n
            torch.testing.assert_close(norms[p], sq(oracle[n]), **TOL, msg=n)
        g = gen(seed)
        scales = {p: torch.rand(B, generator=g, dtype=DT) for p in params.values()}
        sums = gs.clipped_sums(scales)
        for n, p in params.items():
            want = torch.einsum("b,b...->...", scales[p], oracle[n])
            assert sums[p].shape == p.shape
            torch.testing.assert_close(sums[p], want, **TOL, msg=n)
    finally:
        gs.remove()
    return gs


# ---------------------------------------------------------------------------------- units


def test_find_units_structure():
    model = CustomNet()
    units = find_units(model)
    assert [u.name for u in units] == ["lin", "comp", "head"]
    assert units[0].rule is RULES[nn.Linear] and units[2].rule is RULES[nn.Linear]
    comp = units[1]
    assert isinstance(comp, Unit) and comp.rule is None
    assert [n for n, _ in comp.params] == ["gate", "inner.weight", "inner.bias"]
    assert uncovered_parameters(model, units) == []

    attn = find_units(AttnNet())
    assert [u.name for u in attn] == ["proj", "attn", "head"]
    assert {n for n, _ in attn[1].params} == {
        "in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"}

    # a root Linear, frozen params, and a module without any trainable params
    lin = nn.Linear(2, 2)
    assert [(u.name, [n for n, _ in u.params]) for u in find_units(lin)] == [("", ["weight", "bias"])]
    lin.bias.requires_grad_(False)
    assert [n for n, _ in find_units(lin)[0].params] == ["weight"]
    lin.weight.requires_grad_(False)
    assert find_units(lin) == [] and find_units(nn.ReLU()) == []
    assert uncovered_parameters(lin, []) == []
    assert uncovered_parameters(nn.Linear(2, 2), []) == ["weight", "bias"]

    # a shared instance is one unit; a tied Parameter is in both units
    m = Twice()
    assert [u.name for u in find_units(m)] == ["inp", "shared", "head"]
    tied = find_units(TiedLM())
    assert [u.name for u in tied] == ["emb", "mix", "out"]
    assert tied[0].params[0][1] is tied[2].params[0][1]


def test_find_units_propagates_refusals():
    with pytest.raises(ValueError, match="max_norm"):
        find_units(nn.Sequential(nn.Embedding(4, 2, max_norm=1.0)))


# ---------------------------------------------------------------------------------- oracle


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize("loss", ["mean", "sum"])
@pytest.mark.parametrize("case", list(CASES))
def test_against_oracle(case, loss):
    make, data = CASES[case]
    model = randomise(make())
    x, y = data(4)
    check(model, x, y, loss=loss)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize("case", ["mlp", "cnn", "seq", "custom", "attn", "lstm", "tied", "twice"])
@pytest.mark.parametrize("B", [1, 0])
def test_small_batches(case, B):
    make, data = CASES[case]
    model = randomise(make())
    x, y = data(B)
    check(model, x, y, loss="sum")
    if B == 1:
        check(model, x, y, loss="mean")


@pytest.mark.parametrize("case", ["mlp", "cnn", "seq", "tied", "twice"])
def test_ghost_always_and_never_agree(case):
    make, data = CASES[case]
    model = randomise(make())
    x, y = data(3)
    results = []
    for ghost in ("always", "never", "auto"):
        check(model, x, y, ghost=ghost)
        with run(model, x, y, ghost=ghost) as gs:
            results.append(gs.per_sample_sq_norms())
    for p in results[0]:
        torch.testing.assert_close(results[0][p], results[1][p], **TOL)
        torch.testing.assert_close(results[0][p], results[2][p], **TOL)


def test_ghost_always_restores_the_rule_switch():
    from dpclip.grad_sample import rules

    before = rules.use_ghost
    model = randomise(mlp())
    with run(model, *vec_data(3), ghost="always") as gs:
        gs.per_sample_sq_norms()
    assert rules.use_ghost is before


def test_tied_cross_term_is_included():
    """The tied weight's norm is not the sum of the two uses' norms (cross term)."""
    model = randomise(TiedLM())
    x, y = tok_data(3)
    oracle = per_sample_grads_loop(model, ce_sum, x, y)
    w = model.emb.weight
    with run(model, x, y, loss="sum") as gs:
        got = gs.per_sample_sq_norms()[w]
        torch.testing.assert_close(got, sq(oracle["emb.weight"]), **TOL)
        torch.testing.assert_close(gs.per_sample_grads()[w], oracle["emb.weight"], **TOL)
        # the two uses separately, from the rules: their norms do not add up to the total
        per_use = []
        for unit, calls in zip(gs.units, gs._calls):
            if unit.name in ("emb", "out"):
                (call,) = calls
                if call.psg is not None:  # the plan materialised this call when its gradient came
                    per_use.append(sq(call.psg["weight"]))
                else:
                    per_use.append(unit.rule.sq_norms(unit.module, call.inputs[0], call.grads[0])["weight"])
        assert len(per_use) == 2
        assert not torch.allclose(per_use[0] + per_use[1], got)


def test_frozen_parameters_skipped():
    model = randomise(CustomNet())
    model.lin.bias.requires_grad_(False)
    model.comp.inner.weight.requires_grad_(False)
    model.head.weight.requires_grad_(False)
    x, y = vec_data(4)
    gs = check(model, x, y)
    covered = {id(p) for p in gs.parameters}
    assert id(model.lin.bias) not in covered and id(model.head.weight) not in covered
    assert id(model.comp.inner.weight) not in covered and id(model.comp.inner.bias) in covered


def test_inplace_relu_after_linear():
    model = randomise(nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)))
    check(model, *vec_data(5))


def test_unused_call_output_contributes_nothing():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 5)
            self.aux = nn.Linear(5, 2)  # called, output not in the loss
            self.head = nn.Linear(5, 3)

        def forward(self, x):
            h = torch.tanh(self.body(x))
            self.aux(h)
            return self.head(self.body(x) * 0.5 + h)  # body called twice; both used

    model = randomise(Net())
    check(model, *vec_data(4))
    with run(model, *vec_data(4)) as gs:
        assert torch.all(gs.per_sample_grads()[model.aux.weight] == 0)


# ---------------------------------------------------------------------------------- clip_and_sum


def oracle_clip(oracle, params, groups, clipper):
    names = {id(p): n for n, p in params.items()}
    norms = torch.stack(
        [sum(sq(oracle[names[id(p)]]) for p in g).sqrt() for g in groups], dim=1)
    scales = clipper(norms)
    out = {}
    for k, g in enumerate(groups):
        for p in g:
            out[p] = torch.einsum("b,b...->...", scales[:, k], oracle[names[id(p)]])
    return out, norms


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize("case", ["mlp", "cnn", "seq", "custom", "attn", "tied", "twice"])
@pytest.mark.parametrize("loss", ["mean", "sum"])
def test_clip_and_sum(case, loss):
    make, data = CASES[case]
    model = randomise(make())
    x, y = data(5)
    params = trainable(model)
    oracle = per_sample_grads_loop(model, ce_sum, x, y)
    oracle_norms = sq(torch.cat([g.flatten(1) for g in oracle.values()], 1)).sqrt()
    C = float(oracle_norms.median())  # some samples clipped, some not
    flat = lambda n: torch.clamp(C / n.clamp_min(1e-12), max=1.0)  # noqa: E731
    with run(model, x, y, loss=loss) as gs:
        # flat clipping
        sums, norms = clip_and_sum(gs, flat)
        want, want_norms = oracle_clip(oracle, params, [list(params.values())], flat)
        assert norms.shape == (5, 1)
        torch.testing.assert_close(norms[:, 0], oracle_norms, **TOL)
        torch.testing.assert_close(norms, want_norms, **TOL)
        assert set(map(id, sums)) == set(map(id, params.values()))
        for p in params.values():
            torch.testing.assert_close(sums[p], want[p], **TOL)
        # per-layer groups: one per unit, shared parameters in the first unit that has them
        groups, placed = [], set()
        for u in gs.units:
            g = [p for _, p in u.params if id(p) not in placed]
            placed.update(map(id, g))
            if g:
                groups.append(g)
        sums, norms = clip_and_sum(gs, flat, groups)
        want, want_norms = oracle_clip(oracle, params, groups, flat)
        assert norms.shape == (5, len(groups))
        torch.testing.assert_close(norms, want_norms, **TOL)
        for p in params.values():
            torch.testing.assert_close(sums[p], want[p], **TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["mlp", "cnn", "tied"])
@pytest.mark.parametrize("loss", ["mean", "sum"])
def test_flat_clipping_scales_in_one_call(dtype, case, loss, monkeypatch):
    """FlatClipping's norms and scales come from one C call (``_gram.flat_scales``, design E26):
    the same as the generic torch path to one unit in the last place (torch's vectorised sqrt
    is not correctly rounded; the call's is), the float64 oracle, the loss factor and the
    constant scale included; the one group in another order than the sampler's; B = 0."""
    import dpclip.grad_sample.bookkeeping as bk
    from dpclip.clipping import FlatClipping

    if bk._gram is None:
        pytest.skip("dpclip was installed without its C kernels")
    make, data = CASES[case]
    model = randomise(make()).to(dtype)
    x, y = data(6)
    x = x.to(dtype) if x.is_floating_point() else x
    oracle = per_sample_grads_loop(randomise(make()), ce_sum, *data(6))
    oracle_norms = sq(torch.cat([g.flatten(1) for g in oracle.values()], 1)).sqrt()
    clipper = FlatClipping(float(oracle_norms.median()))
    calls = []
    real = bk._gram.flat_scales
    monkeypatch.setattr(bk, "_gram", type("G", (), {"flat_scales": staticmethod(lambda *a: calls.append(1) or real(*a))}))
    with run(model, x, y, loss=loss) as gs:
        order = list(reversed(gs.parameters))
        for groups in (None, [order]):
            fast_sums, fast_norms = clip_and_sum(gs, clipper, groups, scale=0.25)
            monkeypatch.setattr(bk, "_gram", None)
            slow_sums, slow_norms = clip_and_sum(gs, clipper, groups, scale=0.25)
            monkeypatch.setattr(bk, "_gram", type("G", (), {"flat_scales": staticmethod(lambda *a: calls.append(1) or real(*a))}))
            ulp = dict(rtol=4 * torch.finfo(dtype).eps, atol=0.0)
            torch.testing.assert_close(fast_norms, slow_norms, **ulp)
            tol = TOL if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(fast_norms[:, 0].double(), oracle_norms, **tol)
            for p in gs.parameters:
                torch.testing.assert_close(fast_sums[p], slow_sums[p], rtol=8 * torch.finfo(dtype).eps, atol=1e-7)
    assert len(calls) == 2  # both runs took the call
    with run(randomise(make()).to(dtype), *[(t.to(dtype) if t.is_floating_point() else t) for t in data(0)], loss=loss) as gs:
        sums, norms = clip_and_sum(gs, clipper)
        assert norms.shape == (0, 1) and all(torch.equal(sums[p], torch.zeros_like(p)) for p in gs.parameters)


def test_flat_scales_refuses_bad_arguments():
    import dpclip.grad_sample.bookkeeping as bk

    if bk._gram is None:
        pytest.skip("dpclip was installed without its C kernels")
    out = torch.empty(4)
    with pytest.raises(ValueError, match="flat_scales"):
        bk._gram.flat_scales([], 4, False, 1.0, 1.0, 1.0, out.data_ptr(), out.data_ptr())
    with pytest.raises(ValueError, match="flat_scales"):
        bk._gram.flat_scales([out.data_ptr()], 4, False, 1.0, 0.0, 1.0, out.data_ptr(), out.data_ptr())
    with pytest.raises(ValueError, match="flat_scales"):
        bk._gram.flat_scales([0], 4, False, 1.0, 1.0, 1.0, out.data_ptr(), out.data_ptr())


@pytest.mark.parametrize("case", ["mlp", "cnn", "tied"])
@pytest.mark.parametrize("loss", ["mean", "sum"])
def test_bookkeep_is_the_norms_then_the_clipped_sums(case, loss):
    """GradSampler.bookkeep hands its callback the squared norms without the loss factor
    (and the factor), and sums with scales that already include it: the same as
    per_sample_sq_norms() then clipped_sums(scales / factor)."""
    make, data = CASES[case]
    model = randomise(make())
    x, y = data(5)
    with run(model, x, y, loss=loss) as gs:
        want_sq = gs.per_sample_sq_norms()
        seen = {}

        def scales_for(sq, batch, factor):
            seen.update(batch=batch, factor=factor)
            assert set(map(id, sq)) <= set(map(id, gs.parameters))
            for p in gs.parameters:
                got = sq[p] * factor**2 if p in sq else torch.zeros(batch, dtype=x.dtype)
                torch.testing.assert_close(got, want_sq[p], rtol=1e-12, atol=1e-12)
            scales = {p: torch.linspace(0.1, 1.0, batch, dtype=x.dtype) * (k + 1) for k, p in enumerate(gs.parameters)}
            return scales, "extra"

        sums, extra = gs.bookkeep(scales_for)
        assert extra == "extra" and seen == {"batch": 5, "factor": 5.0 if loss == "mean" else 1.0}
        want = gs.clipped_sums(
            {p: torch.linspace(0.1, 1.0, 5, dtype=x.dtype) * (k + 1) / seen["factor"] for k, p in enumerate(gs.parameters)}
        )
        for p in gs.parameters:
            torch.testing.assert_close(sums[p], want[p], rtol=1e-12, atol=1e-12)


def test_clip_and_sum_empty_batch_and_errors():
    model = randomise(mlp())
    x, y = vec_data(0)
    with run(model, x, y, loss="sum") as gs:
        sums, norms = clip_and_sum(gs, lambda n: torch.clamp(1.0 / n, max=1.0))
        assert norms.shape == (0, 1)
        for p in model.parameters():
            assert torch.equal(sums[p], torch.zeros_like(p))
        ps = list(model.parameters())
        with pytest.raises(ValueError, match="exactly one group"):
            clip_and_sum(gs, lambda n: n, [ps, ps[:1]])
        with pytest.raises(ValueError, match="in no group"):
            clip_and_sum(gs, lambda n: n, [ps[:1]])
        with pytest.raises(ValueError, match="not covered"):
            clip_and_sum(gs, lambda n: n, [ps, [nn.Parameter(torch.zeros(2))]])
        with pytest.raises(ValueError, match="shape"):
            clip_and_sum(gs, lambda n: n[:, :0], None)


# ---------------------------------------------------------------------------------- hygiene


def snapshot(model):
    return (
        {n: (set(vars(m)), dict(m._forward_hooks), dict(m._backward_hooks),
             dict(m._forward_pre_hooks), dict(m._backward_pre_hooks))
         for n, m in model.named_modules()},
        {n: (set(vars(p)), p._backward_hooks) for n, p in model.named_parameters()},
    )


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize("case", ["mlp", "custom", "attn", "lstm", "tied"])
def test_remove_leaves_nothing(case):
    make, data = CASES[case]
    model = randomise(make())
    before = snapshot(model)
    x, y = data(3)
    gs = run(model, x, y)
    assert any(m._forward_hooks for m in model.modules())
    gs.per_sample_grads()
    gs.remove()
    assert snapshot(model) == before
    for m in model.modules():
        assert not m._forward_hooks and not m._backward_hooks
    for p in model.parameters():
        assert not p._backward_hooks
    # after remove, forward/backward captures nothing
    LOSSES["mean"](model(x), y).backward()
    assert gs.batch_size == 0
    # the context manager removes too
    with GradSampler(model) as gs2:
        assert any(m._forward_hooks for m in model.modules())
    assert all(not m._forward_hooks for m in model.modules())
    del gs2


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize("case", ["mlp", "cnn", "custom", "attn", "lstm", "tied", "twice"])
def test_outputs_and_grads_unchanged_by_hooks(case):
    make, data = CASES[case]
    model = randomise(make())
    x, y = data(4)
    model.zero_grad(set_to_none=True)
    out_plain = model(x)
    ce_mean(out_plain, y).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    with run(model, x, y) as gs:
        out_hooked = model(x)  # a second forward: not backwarded, contributes nothing
        torch.testing.assert_close(out_hooked, out_plain, rtol=0, atol=0)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, plain[n], rtol=0, atol=0, msg=n)
        # the batch mean of per-sample grads (mean loss) is the ordinary gradient
        psg = gs.per_sample_grads()
        for n, p in model.named_parameters():
            torch.testing.assert_close(psg[p].mean(0), plain[n], **TOL, msg=n)


def test_no_capture_without_grad():
    model = randomise(mlp())
    x, y = vec_data(4)
    with GradSampler(model) as gs:
        with torch.no_grad():
            model(x)
        with torch.inference_mode():
            model(x)
        model.eval()
        with torch.no_grad():
            model(x)
        assert all(not calls for calls in gs._calls)
        assert gs.batch_size == 0
        for p, g in gs.per_sample_grads().items():
            assert g.shape == (0, *p.shape)
        model.train()
        ce_mean(model(x), y).backward()
        assert gs.batch_size == 4


def test_second_backward_without_clear_is_an_error():
    model = randomise(mlp())
    x, y = vec_data(4)
    oracle = per_sample_grads_loop(model, ce_sum, x, y)
    with run(model, x, y) as gs:
        ce_mean(model(x), y).backward()
        with pytest.raises(RuntimeError, match="clear"):
            gs.per_sample_grads()
        gs.clear()
        assert gs.batch_size == 0
        model.zero_grad(set_to_none=True)
        ce_sum(model(x), y).backward()
        gs.loss_reduction = "sum"
        psg = gs.per_sample_grads()
        torch.testing.assert_close(psg[model[0].weight], oracle["0.weight"], **TOL)


def test_retain_graph_double_backward_accumulates():
    model = randomise(mlp())
    x, y = vec_data(4)
    oracle = per_sample_grads_loop(model, ce_sum, x, y)
    with GradSampler(model, loss_reduction="sum") as gs:
        loss = ce_sum(model(x), y)
        loss.backward(retain_graph=True)
        loss.backward()
        psg = gs.per_sample_grads()
        for n, p in trainable(model).items():
            torch.testing.assert_close(psg[p], 2 * oracle[n], **TOL)


def test_refusals_and_argument_checks():
    with pytest.raises(ValueError, match="batch_first"):
        GradSampler(AttnNet(batch_first=False))
    with pytest.raises(ValueError, match="loss_reduction"):
        GradSampler(mlp(), loss_reduction="avg")
    with pytest.raises(ValueError, match="ghost"):
        GradSampler(mlp(), ghost="sometimes")
    model = randomise(mlp())
    with run(model, *vec_data(3)) as gs:
        with pytest.raises(KeyError):
            gs.clipped_sums({nn.Parameter(torch.zeros(2)): torch.ones(3)})
        with pytest.raises(ValueError, match="shape"):
            gs.clipped_sums({model[0].weight: torch.ones(4)})
        # a subset of parameters is fine
        sub = gs.clipped_sums({model[0].bias: torch.ones(3, dtype=DT)})
        assert list(sub) == [model[0].bias]


def test_device_and_dtype_follow_the_model():
    model = mlp()  # float32
    x, y = vec_data(3)
    with run(model, x.float(), y) as gs:
        for p, g in gs.per_sample_grads().items():
            assert g.dtype == torch.float32 and g.device == p.device
        for p, n in gs.per_sample_sq_norms().items():
            assert n.dtype == torch.float32


def test_no_backward_hook_warnings():
    model = randomise(CustomNet())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with run(model, *vec_data(3)) as gs:
            gs.per_sample_sq_norms()


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_parametrized_module_is_a_fallback_unit():
    from torch.nn.utils import parametrizations

    model = randomise(nn.Sequential(parametrizations.weight_norm(nn.Linear(4, 5)), nn.Tanh(),
                                    nn.Linear(5, 3)))
    units = find_units(model)
    assert units[0].name == "0" and units[0].rule is None
    assert {n for n, _ in units[0].params} == {
        "bias", "parametrizations.weight.original0", "parametrizations.weight.original1"}
    check(model, *vec_data(4))


@pytest.mark.parametrize("case", ["mlp", "custom", "tied"])
def test_empty_batch_with_mean_loss(case):
    make, data = CASES[case]
    model = randomise(make())
    x, y = data(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 0/0 in the mean loss: its (empty) grads are fine
        with run(model, x, y, loss="mean") as gs:
            assert gs.batch_size == 0
            for p, g in gs.per_sample_grads().items():
                assert g.shape == (0, *p.shape)
            for p, n in gs.per_sample_sq_norms().items():
                assert n.shape == (0,)
            sums = gs.clipped_sums({p: torch.zeros(0, dtype=DT) for p in gs.parameters})
            for p, s in sums.items():
                assert torch.equal(s, torch.zeros_like(p))


class MaskedAttn(nn.Module):
    """key_padding_mask built from the input, passed positionally (batched on dim 0)."""

    def __init__(self, keyword=False):
        super().__init__()
        self.keyword = keyword
        self.attn = nn.MultiheadAttention(3, 1, batch_first=True)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        mask = x[..., 0] > 0.3
        mask[:, 0] = False  # never mask every key of a sample
        if self.keyword:
            a, _ = self.attn(x, x, x, key_padding_mask=mask, need_weights=False)
        else:
            a, _ = self.attn(x, x, x, mask, False)
        return self.head(a.mean(1))


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_attention_with_positional_key_padding_mask():
    model = randomise(MaskedAttn())
    x = torch.randn(4, 5, 3, generator=gen(), dtype=DT)
    y = torch.randint(0, 2, (4,), generator=gen(1))
    check(model, x, y)
    # a keyword key_padding_mask: fine for the batched recomputation (mha.py) ...
    model = randomise(MaskedAttn(keyword=True))
    check(model, x, y)
    # ... but the torch.func fallback passes keyword arguments unbatched: refused
    gs = GradSampler(model, use_rules=False)
    try:
        ce_mean(model(x), y).backward()
        with pytest.raises(ValueError, match="positionally"):
            gs.per_sample_grads()
    finally:
        gs.remove()


def test_no_capture_inside_torch_func_transforms():
    from dpclip.grad_sample.vmap import per_sample_grads_vmap

    model = randomise(mlp())
    x, y = vec_data(3)
    with GradSampler(model) as gs:
        got = per_sample_grads_vmap(model, ce_sum, x, y)
        assert all(not calls for calls in gs._calls)
        assert got["0.weight"].shape == (3, 6, 4)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing(reentrant):
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 6))
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            if self.training and x.shape[0] > 1:  # the oracle's batches of one skip it
                h = checkpoint(self.body, x, use_reentrant=reentrant)
            else:
                h = self.body(x)
            return self.head(torch.tanh(h))

    model = randomise(Net())
    x, y = vec_data(4)
    if reentrant:
        x = x.requires_grad_(True)  # the reentrant variant needs an input that requires grad
    check(model, x, y)


def test_batchnorm_is_refused_by_the_sampler():
    import pytest as _pytest
    from torch import nn as _nn

    from dpclip.grad_sample.hooks import GradSampler as _GradSampler

    with _pytest.raises(ValueError, match="GroupNorm"):
        _GradSampler(_nn.Sequential(_nn.Linear(3, 3), _nn.BatchNorm1d(3)))


# ---------------------------------------------------------------------------------- skip_param_grads


def _requires_grad(model):
    return {n: p.requires_grad for n, p in model.named_parameters()}


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
@pytest.mark.parametrize("loss", ["mean", "sum"])
@pytest.mark.parametrize("case", list(CASES))
def test_skip_param_grads_is_exact(case, loss):
    """Same per-sample grads, norms and clipped sums; skipped parameters get no .grad."""
    make, data = CASES[case]
    model = randomise(make())
    x, y = data(4)
    oracle = per_sample_grads_loop(model, ce_sum, x, y)
    params = trainable(model)
    flags = _requires_grad(model)
    model.zero_grad(set_to_none=True)
    out_plain = model(x)
    with GradSampler(model, loss_reduction=loss, skip_param_grads=True) as gs:
        assert gs.skip_param_grads
        out = model(x)
        assert _requires_grad(model) == flags  # restored right after each call
        torch.testing.assert_close(out, out_plain, rtol=0, atol=0)
        LOSSES[loss](out, y).backward()
        assert _requires_grad(model) == flags
        skipped = {id(p) for s in gs._skippable for _, p in s}
        for n, p in params.items():
            if p.grad is None:  # only a skippable parameter may lose its ordinary gradient
                assert id(p) in skipped, n
        B = len(x)
        psg = gs.per_sample_grads()
        norms = gs.per_sample_sq_norms()
        scales = {p: torch.rand(B, generator=gen(3), dtype=DT) for p in params.values()}
        sums = gs.clipped_sums(scales)
        for n, p in params.items():
            torch.testing.assert_close(psg[p], oracle[n], **TOL, msg=n)
            torch.testing.assert_close(norms[p], sq(oracle[n]), **TOL, msg=n)
            want = torch.einsum("b,b...->...", scales[p], oracle[n])
            torch.testing.assert_close(sums[p], want, **TOL, msg=n)
    assert _requires_grad(model) == flags
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_skip_param_grads_which_parameters():
    # mlp with anchor_first_layers: both Linears skip; the first one's input does not require
    # grad, so its output is re-attached to the graph through a no-op node (no weight and no
    # input gradient)
    model = randomise(mlp())
    x, y = vec_data(4)
    with GradSampler(model, skip_param_grads=True, anchor_first_layers=True):
        ce_mean(model(x), y).backward()
    assert model[0].weight.grad is None and model[0].bias.grad is None
    assert model[2].weight.grad is None and model[2].bias.grad is None
    # without anchor_first_layers (the default) the first Linear keeps its ordinary gradient
    model.zero_grad(set_to_none=True)
    with GradSampler(model, skip_param_grads=True):
        ce_mean(model(x), y).backward()
    assert model[0].weight.grad is not None and model[0].bias.grad is not None
    assert model[2].weight.grad is None and model[2].bias.grad is None
    # a previous .grad is left untouched
    model[2].weight.grad = torch.ones_like(model[2].weight)
    with GradSampler(model, skip_param_grads=True):
        ce_mean(model(x), y).backward()
    assert torch.equal(model[2].weight.grad, torch.ones_like(model[2].weight))
    # tied parameters (two units) and fallback units keep normal autograd
    model = randomise(TiedLM())
    tok, y = tok_data(4)
    with GradSampler(model, skip_param_grads=True) as gs:
        ce_mean(model(tok), y).backward()
        assert model.emb.weight.grad is not None  # shared by emb and out
        assert model.mix.weight.grad is None and model.mix.bias.grad is None
        assert all(id(p) != id(model.emb.weight) for s in gs._skippable for _, p in s)
    model = randomise(CustomNet())
    x, y = vec_data(4)
    with GradSampler(model, skip_param_grads=True):
        ce_mean(model(x), y).backward()
    assert all(p.grad is not None for p in model.comp.parameters())
    assert model.head.weight.grad is None


def test_skip_param_grads_toggle_and_no_grad():
    model = randomise(mlp())
    x, y = vec_data(4)
    with GradSampler(model) as gs:
        assert not gs.skip_param_grads
        gs.set_skip_param_grads(True)
        assert gs.skip_param_grads
        gs.set_skip_param_grads(True)  # idempotent: one pair of hooks per unit
        assert len(model[2]._forward_pre_hooks) == 1
        with torch.no_grad():
            model(x)
        ce_mean(model(x), y).backward()
        assert model[2].weight.grad is None
        gs.clear()
        gs.set_skip_param_grads(False)
        assert not model[2]._forward_pre_hooks
        ce_mean(model(x), y).backward()
        assert model[2].weight.grad is not None
    # a removed sampler cannot be switched back on
    gs.set_skip_param_grads(True)
    assert not gs.skip_param_grads and not model[2]._forward_pre_hooks


def test_skip_param_grads_restores_requires_grad_when_forward_raises():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 6)
            self.b = nn.Linear(6, 3)

        def forward(self, x):
            return self.b(self.a(x)[:, :5])  # wrong width for b: raises inside b's forward

    model = randomise(Boom())
    flags = _requires_grad(model)
    x, _ = vec_data(4)
    with GradSampler(model, skip_param_grads=True) as gs:
        with pytest.raises(RuntimeError):
            model(x)
        assert _requires_grad(model) == flags
        assert all(not stack for stack in gs._frozen)
        # a failing forward pre-hook registered after ours: the forward hook still restores
        def bad(module, args):
            raise ValueError("boom")

        h = model.b.register_forward_pre_hook(bad)
        with pytest.raises(ValueError, match="boom"):
            model.b(torch.randn(2, 6, dtype=DT, requires_grad=True))
        h.remove()
        assert _requires_grad(model) == flags
    assert _requires_grad(model) == flags


def test_skip_param_grads_leaves_functional_call_alone():
    from torch.func import functional_call

    model = randomise(mlp())
    x, y = vec_data(4)
    with GradSampler(model, skip_param_grads=True):
        w = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
        ce_mean(functional_call(model, w, (x,)), y).backward()
        assert all(t.grad is not None for t in w.values())


@pytest.mark.parametrize("reentrant", [False, True])
def test_skip_param_grads_with_activation_checkpointing(reentrant):
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(4, 4)
            self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 6))
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            h = torch.tanh(self.inp(x))
            if self.training and x.shape[0] > 1:
                h = checkpoint(self.body, h, use_reentrant=reentrant)
            else:
                h = self.body(h)
            return self.head(torch.tanh(h))

    model = randomise(Net())
    x, y = vec_data(4)
    oracle = per_sample_grads_loop(model, ce_sum, x, y)
    flags = _requires_grad(model)
    with GradSampler(model, skip_param_grads=True) as gs:
        ce_mean(model(x), y).backward()
        assert _requires_grad(model) == flags
        assert model.body[3].weight.grad is None and model.head.weight.grad is None
        psg = gs.per_sample_grads()
        norms = gs.per_sample_sq_norms()
        for n, p in trainable(model).items():
            torch.testing.assert_close(psg[p], oracle[n], **TOL, msg=n)
            torch.testing.assert_close(norms[p], sq(oracle[n]), **TOL, msg=n)


class InplaceNet(nn.Module):
    """First layers followed by in-place ReLUs: the re-attached (anchored) outputs are modified in place."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect")
        self.gn = nn.GroupNorm(1, 3)
        self.lin = nn.Linear(3 * 4 * 4, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h = nn.functional.relu(self.conv(x), inplace=True)
        h = nn.functional.relu(self.gn(h), inplace=True)
        return self.head(nn.functional.relu(self.lin(h.flatten(1)), inplace=True))


@pytest.mark.parametrize("loss", ["mean", "sum"])
def test_skip_param_grads_first_layer_anchor_and_release(loss):
    """With skip_param_grads: a first layer gets no autograd gradient at all, in-place ops on its
    output still work, materialised calls drop their captures, and results stay exact."""
    model = randomise(InplaceNet())
    x = torch.randn(5, 2, 4, 4, generator=gen(), dtype=DT)
    y = torch.randint(0, 3, (5,), generator=gen(1))
    oracle = per_sample_grads_loop(model, ce_sum, x, y)
    params = trainable(model)
    model.zero_grad(set_to_none=True)
    with GradSampler(model, loss_reduction=loss, skip_param_grads=True, anchor_first_layers=True) as gs:
        LOSSES[loss](model(x), y).backward()
        assert all(p.grad is None for p in model.parameters())
        by_name = dict(zip((u.name for u in gs.units), gs._calls))
        for name in ("conv", "gn"):  # planned materialisation: captures released
            (call,) = by_name[name]
            assert call.released and call.psg is not None and call.inputs == () and call.grads == [None]
        psg = gs.per_sample_grads()
        norms = gs.per_sample_sq_norms()
        scales = {p: torch.rand(5, generator=gen(3), dtype=DT) for p in params.values()}
        sums = gs.clipped_sums(scales)
        for n, p in params.items():
            torch.testing.assert_close(psg[p], oracle[n], **TOL, msg=n)
            torch.testing.assert_close(norms[p], sq(oracle[n]), **TOL, msg=n)
            torch.testing.assert_close(sums[p], torch.einsum("b,b...->...", scales[p], oracle[n]), **TOL, msg=n)
        gs.clear()
        # a second backward through the same graph cannot reuse released captures
        out = LOSSES[loss](model(x), y)
        out.backward(retain_graph=True)
        with pytest.raises(RuntimeError, match="retain_graph"):
            out.backward()
    assert all(p.requires_grad for p in model.parameters())


def test_planned_materialisation_matches_other_modes():
    """auto (some calls materialised when their gradient arrives), always and never agree,
    with a sequence Linear the plan materialises (d p <= T (d + p)) next to ghost-norm layers."""
    model = randomise(SeqNet())
    x, y = tok_data(4, C=4)
    results = []
    for ghost in ("auto", "always", "never"):
        with run(model, x, y, ghost=ghost) as gs:
            scales = {p: torch.linspace(0.1, 1.0, 4, dtype=DT) for p in gs.parameters}
            results.append((gs.per_sample_sq_norms(), gs.clipped_sums(scales)))
    for norms, sums in results[1:]:
        for p in norms:
            torch.testing.assert_close(norms[p], results[0][0][p], **TOL)
            torch.testing.assert_close(sums[p], results[0][1][p], **TOL)


class ReusedSeq(nn.Module):
    """A sequence Linear called twice plus two Linear modules sharing one weight (tied)."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(8, 16)
        self.a = nn.Linear(16, 8)
        self.b = nn.Linear(16, 8, bias=False)
        self.b.weight = self.a.weight
        self.head = nn.Linear(8, 3)

    def forward(self, x):  # x [B, 2, 8]
        h = torch.tanh(self.shared(x))
        h2 = torch.tanh(self.shared(torch.tanh(self.a(h)))) + h
        return self.head((self.b(h2) + self.a(h)).mean(1))


@pytest.mark.parametrize("ghost", ["auto", "always", "never"])
def test_reused_linear_ghost_norm_has_the_cross_terms(ghost, monkeypatch):
    """Multi-use Linear parameters: the ghost norm of the uses concatenated along positions
    equals the norm of the summed per-sample gradient (no materialisation in auto/always)."""
    from dpclip.grad_sample import rules

    model = randomise(ReusedSeq())
    x = torch.randn(5, 2, 8, generator=gen(), dtype=DT)
    y = torch.randint(0, 3, (5,), generator=gen(1))
    oracle = per_sample_grads_loop(model, ce_sum, x, y)
    calls = []
    real = rules._ghost_sq
    monkeypatch.setattr(rules, "_ghost_sq", lambda a, g: calls.append(a.shape[1]) or real(a, g))
    with run(model, x, y, loss="sum", ghost=ghost) as gs:
        norms = gs.per_sample_sq_norms()
        for n, p in trainable(model).items():
            torch.testing.assert_close(norms[p], sq(oracle[n]), **TOL, msg=n)
        assert gs._grad_cache == {} or ghost == "never"  # nothing materialised for the norms
    if ghost != "never":
        assert 4 in calls  # shared.weight: two calls of 2 positions each, one ghost norm
    check(model, x, y, ghost=ghost)


@pytest.mark.parametrize("width,kept", [(32, "psg"), (64, "patches")])
def test_conv_patches_kept_between_the_passes_match_the_loop_oracle(width, kept):
    """A W2-like second conv (16 -> 32, 4x4, stride 2) takes per-sample gradients made from
    patches, a wider one (16 -> 64) the patches' ghost norm with its patches kept for the clipped
    sum (design E16, E18): the sampler's norms and clipped sums equal the per-sample loop, also
    after a second backward through the same graph (the kept work is dropped with the new
    output gradient, and the captures add up)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 16, 3, padding=1), nn.Tanh(), nn.Conv2d(16, width, 4, 2), nn.Tanh(),
        nn.Flatten(), nn.Linear(width * 25, 3),
    ).to(DT)
    x = torch.randn(4, 2, 13, 13, dtype=DT)
    y = torch.tensor([0, 1, 2, 1])
    oracle = per_sample_grads_loop(model, ce_sum, x, y)
    names = {p: n for n, p in model.named_parameters()}
    with GradSampler(model, loss_reduction="sum") as gs:
        out = model(x)
        ce_sum(out, y).backward(retain_graph=True)
        scales = {p: torch.rand(4, dtype=DT, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(gs.parameters)}
        for rounds in (1, 2):
            sq = gs.per_sample_sq_norms()
            conv2 = gs._calls[next(i for i, u in enumerate(gs.units) if u.module is model[2])][0]
            assert gs._scratch[id(conv2)].get(kept) is not None  # the norm pass kept them
            sums = gs.clipped_sums(scales)
            for p in gs.parameters:
                want = oracle[names[p]] * rounds
                torch.testing.assert_close(sq[p], want.flatten(1).pow(2).sum(1), **TOL)
                torch.testing.assert_close(sums[p], torch.tensordot(scales[p], want, dims=1), **TOL)
            if rounds == 1:
                ce_sum(out, y).backward()  # a second backward: gradients add, the scratch goes
                assert id(conv2) not in gs._scratch


def test_large_captured_activations_go_to_buffers_kept_across_steps(monkeypatch):
    """With skip_param_grads on, a rule unit's large activation (every one here, with the size
    threshold patched to 1 byte) is captured as a copy in a buffer the sampler keeps across
    clear(): norms and clipped sums are bit for bit those of capturing the caller's tensor
    (and agree with the float64 loop oracle), the buffer is the same storage in the next step,
    a materialised rule (LayerNorm) and a sampler without skip_param_grads capture as before,
    and remove() drops the buffers."""
    from dpclip.grad_sample import hooks as hooks_mod

    torch.manual_seed(0)
    # two positions: both Linear layers take the ghost norm (d p > T (d + p)), none materialised
    model = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 2, 6, generator=gen, dtype=DT), torch.randint(0, 3, (4, 2), generator=gen)) for _ in range(2)]
    scales = {p: torch.rand(4, generator=gen, dtype=DT) for p in model.parameters()}

    def run(skip):
        out, ptrs = [], []
        with GradSampler(model, loss_reduction="sum", skip_param_grads=skip) as gs:
            for x, y in batches:
                ce_sum(model(x), y).backward()
                out.append((gs.per_sample_sq_norms(), gs.clipped_sums(scales)))
                calls = [c for calls in gs._calls for c in calls]
                ptrs.append([c.inputs[0].data_ptr() if c.inputs else None for c in calls])
                gs.clear()
            kept = dict(gs._stable)
        assert not gs._stable  # remove() dropped them
        return out, ptrs, kept

    plain, _, kept = run(skip=True)
    assert kept == {}  # below the threshold: nothing copied
    monkeypatch.setattr(hooks_mod, "_STABLE_MIN_BYTES", 1)
    stable, ptrs, kept = run(skip=True)
    assert set(kept) == {(0, 0), (2, 0)}  # the two Linear units, not LayerNorm (unit 1)
    assert ptrs[0][0] == ptrs[1][0] == kept[(0, 0)].data_ptr()  # the same storage both steps
    assert ptrs[0][0] not in (x.data_ptr() for x, _ in batches)
    for (sq_a, sums_a), (sq_b, sums_b) in zip(plain, stable):
        for p in model.parameters():
            assert torch.equal(sq_a[p], sq_b[p]) and torch.equal(sums_a[p], sums_b[p])
    for (x, y), (sq, sums) in zip(batches, stable):
        oracle = per_sample_grads_loop(model, ce_sum, x, y)
        for name, p in model.named_parameters():
            torch.testing.assert_close(sq[p], oracle[name].flatten(1).pow(2).sum(1), **TOL)
            torch.testing.assert_close(sums[p], torch.tensordot(scales[p], oracle[name], dims=1), **TOL)
    _, _, kept = run(skip=False)
    assert kept == {}  # autograd keeps the input for the weight gradient anyway: no copy
    # d p <= T (d + p) for both Linear layers: the plan materialises them (and releases the
    # captures) when their output gradients arrive, so their activations are not copied
    model[0], model[1], model[3] = nn.Linear(6, 3).to(DT), nn.LayerNorm(3).to(DT), nn.Linear(3, 3).to(DT)
    scales = {p: torch.rand(4, generator=gen, dtype=DT) for p in model.parameters()}
    _, _, kept = run(skip=True)
    assert kept == {}
