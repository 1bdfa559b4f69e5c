"""Per-layer rules against the float64 per-sample loop oracle.

For every layer and configuration: the rule's per-sample gradients, its per-sample squared
norms (ghost norm forced on and off) and its book-keeping clipped sum are compared with the
naive loop (``tests.oracles.per_sample_grads_loop``). Activations and output gradients are
captured with plain module hooks from one forward/backward pass over the batch, where the
loss is the sum of the per-sample losses.
"""

from __future__ import annotations

import warnings

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dpclip.grad_sample import RULES, LayerRule, rule_for, use_ghost
from dpclip.grad_sample import rules as rules_mod
from tests.oracles import flat_norms, per_sample_grads_loop

DT = torch.float64
TOL = dict(atol=1e-10, rtol=1e-10)


def sq_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum-reduced, so the batch loss is the sum of the per-sample losses."""
    return ((out - target) ** 2).sum() + (out**3).sum() * 0.1


def capture(layer: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """One forward/backward pass of the batch; returns (activations, backprops) of ``layer``."""
    store = {}
    h1 = layer.register_forward_hook(lambda m, inp, out: store.__setitem__("a", inp[0].detach()))
    h2 = layer.register_full_backward_hook(lambda m, gi, go: store.__setitem__("g", go[0].detach()))
    try:
        layer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # "no inputs require gradients": expected here
            warnings.simplefilter("ignore", UserWarning)
            sq_loss(layer(x), y).backward()
    finally:
        h1.remove()
        h2.remove()
        layer.zero_grad(set_to_none=True)
    return store["a"], store["g"]


def targets_for(layer: nn.Module, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    with torch.no_grad():
        out = layer(x)
    return torch.randn(out.shape, generator=gen, dtype=DT)


def trainable_names(layer: nn.Module) -> set[str]:
    return {n for n, p in layer.named_parameters() if p.requires_grad}


def check_layer(layer: nn.Module, x: torch.Tensor, monkeypatch, seed: int = 0) -> None:
    """Rule == oracle for per-sample grads, squared norms (ghost on/off) and clipped sum."""
    gen = torch.Generator().manual_seed(seed)
    y = targets_for(layer, x, gen)
    oracle = per_sample_grads_loop(layer, sq_loss, x, y)
    if len(x) > 0:
        a, g = capture(layer, x, y)
    else:  # hooks on an empty batch: build the (empty) captures directly
        with torch.no_grad():
            a, g = x, torch.zeros_like(layer(x))
    rule = rule_for(layer)
    assert isinstance(rule, LayerRule)
    names = trainable_names(layer)
    B = len(x)

    psg = rule.per_sample_grads(layer, a, g)
    assert set(psg) == names == set(oracle)
    for n in names:
        assert psg[n].shape == (B, *getattr(layer, n).shape)
        torch.testing.assert_close(psg[n], oracle[n], **TOL)

    for ghost in (True, False, None):  # forced on, forced off, the rule's own choice
        with monkeypatch.context() as mp:
            if ghost is not None:
                mp.setattr(rules_mod, "use_ghost", lambda T, d, p, _g=ghost: _g)
            sq = rule.sq_norms(layer, a, g)
        assert set(sq) == names
        for n in names:
            assert sq[n].shape == (B,)
            torch.testing.assert_close(sq[n], oracle[n].flatten(1).pow(2).sum(1), **TOL)

    scales = {n: torch.rand(B, generator=gen, dtype=DT) for n in names}
    cs = rule.clipped_sum(layer, a, g, scales)
    assert set(cs) == names
    for n in names:
        expected = torch.einsum("b,b...->...", scales[n], oracle[n])
        assert cs[n].shape == getattr(layer, n).shape
        torch.testing.assert_close(cs[n], expected, **TOL)


def randomise(layer: nn.Module, seed: int = 1) -> nn.Module:
    """float64, and affine parameters away from their (ones, zeros) initial values."""
    layer = layer.to(DT)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=DT) * 0.5 + (p == 1).to(DT))
    return layer


def randn(*shape, seed=2):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


# --------------------------------------------------------------------------- basics


def test_use_ghost_is_fastdp_rule():
    assert use_ghost(1, 2, 2)
    assert use_ghost(3, 5, 4)  # 18 < 20
    assert not use_ghost(4, 8, 4)  # 32 == 32
    assert not use_ghost(100, 10, 10)


def test_registry_and_rule_for():
    for t in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.LayerNorm, nn.GroupNorm,
              nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.RMSNorm):
        assert t in RULES
    assert rule_for(nn.ReLU()) is None
    assert rule_for(nn.BatchNorm1d(3)) is None

    class MyLinear(nn.Linear):  # may override forward: no rule by exact type
        pass

    assert rule_for(MyLinear(2, 2)) is None
    assert rule_for(nn.Linear(2, 2)) is RULES[nn.Linear]


def test_oracle_flat_norms():
    layer = randomise(nn.Linear(3, 2))
    x = randn(4, 3)
    g = per_sample_grads_loop(layer, sq_loss, x, randn(4, 2, seed=3))
    expected = (g["weight"].flatten(1).pow(2).sum(1) + g["bias"].pow(2).sum(1)).sqrt()
    torch.testing.assert_close(flat_norms(g), expected)
    assert flat_norms(per_sample_grads_loop(layer, sq_loss, x[:0], x[:0, :2])).shape == (0,)


# --------------------------------------------------------------------------- Linear

LINEAR_CASES = [
    # (input shape without the feature dim, d, p, bias)
    ((5,), 3, 4, True),
    ((5,), 3, 4, False),
    ((1,), 3, 2, True),  # B = 1
    ((0,), 3, 2, True),  # B = 0
    ((4, 6), 3, 2, True),  # sequence
    ((4, 6), 2, 5, True),  # sequence, d <= p: the bias's sum shares the weight's GEMM
    ((0, 6), 2, 5, True),  # the same with B = 0
    ((3, 2, 5), 4, 3, True),  # two position dims
    ((2, 7), 1, 1, False),
]


@pytest.mark.parametrize("lead,d,p,bias", LINEAR_CASES)
def test_linear(lead, d, p, bias, monkeypatch):
    check_layer(randomise(nn.Linear(d, p, bias=bias)), randn(*lead, d), monkeypatch)


@settings(max_examples=15, deadline=None)
@given(
    B=st.integers(0, 4),
    T=st.integers(1, 5),
    seq=st.booleans(),
    d=st.integers(1, 5),
    p=st.integers(1, 5),
    bias=st.booleans(),
)
def test_linear_hypothesis(B, T, seq, d, p, bias):
    mp = pytest.MonkeyPatch()
    try:
        shape = (B, T, d) if seq else (B, d)
        check_layer(randomise(nn.Linear(d, p, bias=bias)), randn(*shape), mp)
    finally:
        mp.undo()


# --------------------------------------------------------------------------- Conv

CONV1D_CASES = [
    dict(),
    dict(stride=2),
    dict(padding=1),
    dict(padding=2, dilation=2),
    dict(groups=2),
    dict(groups=2, stride=2, padding=1, dilation=2),
    dict(padding="same"),
    dict(padding="same", dilation=2),
    dict(padding="valid"),
    dict(bias=False),
    dict(padding=1, padding_mode="reflect"),
    dict(padding=2, padding_mode="replicate"),
    dict(padding=2, padding_mode="circular"),
    dict(padding="same", padding_mode="circular"),
]


@pytest.mark.parametrize("kw", CONV1D_CASES, ids=str)
def test_conv1d(kw, monkeypatch):
    layer = randomise(nn.Conv1d(4, 6, 3, **kw))
    check_layer(layer, randn(3, 4, 9), monkeypatch)


CONV2D_CASES = [
    dict(kernel_size=3),
    dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 0)),
    dict(kernel_size=3, dilation=(2, 1), padding=(2, 1)),
    dict(kernel_size=3, groups=2, padding=1),
    dict(kernel_size=(1, 3), groups=4),  # depthwise
    dict(kernel_size=(2, 4), padding="same"),  # even kernels: asymmetric padding
    dict(kernel_size=3, padding="same", dilation=2, groups=2),
    dict(kernel_size=2, padding="valid", bias=False),
    dict(kernel_size=3, padding=1, padding_mode="reflect"),
    dict(kernel_size=3, padding=(2, 1), padding_mode="replicate", stride=2),
    dict(kernel_size=3, padding=(1, 2), padding_mode="circular", groups=2),
    dict(kernel_size=(2, 3), padding="same", padding_mode="reflect"),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("kw", CONV2D_CASES, ids=str)
def test_conv2d(kw, monkeypatch):
    layer = randomise(nn.Conv2d(4, 4, **kw))
    check_layer(layer, randn(3, 4, 6, 5), monkeypatch)


CONV3D_CASES = [
    dict(kernel_size=2),
    dict(kernel_size=(2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(1, 1, 2)),
    dict(kernel_size=3, groups=2, padding="same"),
    dict(kernel_size=2, padding=1, padding_mode="replicate", bias=False),
    dict(kernel_size=3, padding=1, padding_mode="circular"),
]


@pytest.mark.parametrize("kw", CONV3D_CASES, ids=str)
def test_conv3d(kw, monkeypatch):
    layer = randomise(nn.Conv3d(2, 4, **kw))
    check_layer(layer, randn(2, 2, 4, 5, 4), monkeypatch)


@pytest.mark.parametrize("B", [0, 1])
@pytest.mark.parametrize(
    "cls,spatial", [(nn.Conv1d, (7,)), (nn.Conv2d, (5, 4)), (nn.Conv3d, (3, 4, 3))]
)
def test_conv_small_batches(cls, spatial, B, monkeypatch):
    layer = randomise(cls(2, 3, 2, padding=1))
    check_layer(layer, randn(B, 2, *spatial), monkeypatch)


@settings(max_examples=15, deadline=None)
@given(
    B=st.integers(1, 3),
    groups=st.sampled_from([1, 2]),
    k=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    bias=st.booleans(),
)
def test_conv2d_hypothesis(B, groups, k, stride, dilation, padding, mode, bias):
    layer = randomise(nn.Conv2d(2, 2 * groups, k, stride=stride, padding=padding, dilation=dilation,
                                groups=groups, bias=bias, padding_mode=mode))
    mp = pytest.MonkeyPatch()
    try:
        check_layer(layer, randn(B, 2, 6, 7), mp)
    finally:
        mp.undo()


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 4),
    dim=st.sampled_from([1, 2]),
    groups=st.sampled_from([1, 2, 3]),
    cg=st.integers(1, 3),  # input channels per group (1 in 1-D)
    mult=st.integers(1, 3),
    k=st.tuples(st.integers(1, 8), st.integers(1, 9)),
    stride=st.tuples(st.integers(1, 2), st.integers(1, 3)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.sampled_from([(0, 0), (1, 2), (3, 0), "same"]),
    mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    bias=st.booleans(),
    spread=st.booleans(),
)
def test_conv_few_input_channels_per_group(B, dim, groups, cg, mult, k, stride, dilation, padding, mode, bias, spread):
    """The forward-conv path (few input channels per group: MNIST and RGB first layers,
    depthwise convs) against the float64 loop oracle, for every stride, dilation, padding
    (mode), groups and channel multiplier, with the batch in one piece or spread over threads."""
    if padding == "same":
        stride = (1, 1)
    if dim == 1:
        cg = 1
    pick = (lambda t: t[:dim]) if dim == 2 else (lambda t: t[1:])
    cls = nn.Conv2d if dim == 2 else nn.Conv1d
    pad = padding if padding == "same" else pick(padding)
    layer = randomise(cls(groups * cg, groups * mult, pick(k), stride=pick(stride), padding=pad,
                          dilation=pick(dilation), groups=groups, bias=bias, padding_mode=mode))
    spatial = (19, 21) if dim == 2 else (23,)
    mp = pytest.MonkeyPatch()
    calls = []
    by_forward = rules_mod._conv_psg_by_forward
    try:
        mp.setattr(rules_mod, "_conv_psg_by_forward", lambda *a: calls.append(1) or by_forward(*a))
        if spread:
            mp.setattr(rules_mod, "_SPREAD_MIN", 0)
        check_layer(layer, randn(B, groups * cg, *spatial), mp)
    finally:
        mp.undo()
    assert calls  # the per-sample gradients came from this path


def test_conv2d_one_input_channel_uses_the_forward_path(monkeypatch):
    """W2's first layer (1 -> 16, 8x8, stride 2, padding 3): per-sample gradients from one
    forward conv, neither the weight-gradient kernel nor unfold, equal to the oracle; also with
    the batch split across threads."""
    layer = randomise(nn.Conv2d(1, 4, 8, stride=2, padding=3))
    x = randn(3, 1, 28, 28)
    gen = torch.Generator().manual_seed(0)
    y = targets_for(layer, x, gen)
    oracle = per_sample_grads_loop(layer, sq_loss, x, y)
    a, g = capture(layer, x, y)
    monkeypatch.setattr(rules_mod, "_CONV_WEIGHT_GRAD", {})  # the grouped kernel path would KeyError
    monkeypatch.setattr(rules_mod.F, "unfold", None)  # the unfold path would fail
    for spread_min in (1 << 16, 0):
        monkeypatch.setattr(rules_mod, "_SPREAD_MIN", spread_min)
        psg = rule_for(layer).per_sample_grads(layer, a, g)
        torch.testing.assert_close(psg["weight"], oracle["weight"], **TOL)


# --------------------------------------------------------------------------- Embedding


def long_inputs(*shape, high=5, seed=4):
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed))


EMBEDDING_CASES = [
    (dict(), (4, 6)),
    (dict(), (3,)),  # one index per sample
    (dict(), (2, 3, 4)),
    (dict(padding_idx=0), (4, 6)),
    (dict(padding_idx=-1), (4, 6)),
    (dict(scale_grad_by_freq=True), (4, 6)),
    (dict(padding_idx=2, scale_grad_by_freq=True), (3, 7)),
    (dict(), (1, 5)),
    (dict(), (0, 5)),
]


@pytest.mark.parametrize("kw,shape", EMBEDDING_CASES, ids=str)
def test_embedding(kw, shape, monkeypatch):
    layer = randomise(nn.Embedding(5, 3, **kw))
    check_layer(layer, long_inputs(*shape), monkeypatch)


def test_embedding_padding_row_gets_no_gradient(monkeypatch):
    layer = randomise(nn.Embedding(5, 3, padding_idx=1))
    x = torch.ones(3, 4, dtype=torch.long)
    x[:, 0] = 2
    y = targets_for(layer, x, torch.Generator().manual_seed(0))
    a, g = capture(layer, x, y)
    psg = rule_for(layer).per_sample_grads(layer, a, g)["weight"]
    assert torch.all(psg[:, 1] == 0)
    assert torch.all(psg[:, 2] != 0)
    check_layer(layer, x, monkeypatch)


def test_embedding_refuses_max_norm_and_sparse():
    with pytest.raises(ValueError, match="max_norm") as e:
        rule_for(nn.Embedding(5, 3, max_norm=1.0))
    assert "renormalis" in str(e.value) and "max_norm=None" in str(e.value)
    layer = nn.Embedding(5, 3, max_norm=1.0)
    x = long_inputs(2, 3)
    with pytest.raises(ValueError, match="max_norm"):
        RULES[nn.Embedding].per_sample_grads(layer, x, torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match="sparse"):
        rule_for(nn.Embedding(5, 3, sparse=True))


# --------------------------------------------------------------------------- norm layers

NORM_CASES = [
    ("layernorm_vec", lambda: nn.LayerNorm(4), (3, 4)),
    ("layernorm_seq", lambda: nn.LayerNorm(4), (3, 5, 4)),
    ("layernorm_2d_shape", lambda: nn.LayerNorm((5, 4)), (3, 5, 4)),
    ("layernorm_nobias", lambda: nn.LayerNorm(4, bias=False), (3, 2, 4)),
    ("layernorm_B1", lambda: nn.LayerNorm(4), (1, 2, 4)),
    ("layernorm_B0", lambda: nn.LayerNorm(4), (0, 2, 4)),
    ("groupnorm_1", lambda: nn.GroupNorm(1, 4), (3, 4, 5)),
    ("groupnorm_2", lambda: nn.GroupNorm(2, 4), (3, 4, 3, 2)),
    ("groupnorm_C", lambda: nn.GroupNorm(4, 4, eps=1e-3), (3, 4, 6)),
    ("groupnorm_B0", lambda: nn.GroupNorm(2, 4), (0, 4, 6)),
    ("instancenorm1d", lambda: nn.InstanceNorm1d(3, affine=True), (3, 3, 6)),
    ("instancenorm2d", lambda: nn.InstanceNorm2d(3, affine=True), (2, 3, 4, 3)),
    ("instancenorm3d", lambda: nn.InstanceNorm3d(2, affine=True), (2, 2, 3, 3, 2)),
    ("instancenorm2d_B1", lambda: nn.InstanceNorm2d(3, affine=True), (1, 3, 4, 3)),
    ("rmsnorm_vec", lambda: nn.RMSNorm(4), (3, 4)),
    ("rmsnorm_seq", lambda: nn.RMSNorm(4, eps=1e-5), (3, 5, 4)),
    ("rmsnorm_2d_shape", lambda: nn.RMSNorm((5, 4)), (2, 5, 4)),
    ("rmsnorm_B0", lambda: nn.RMSNorm(4), (0, 5, 4)),
]


@pytest.mark.parametrize("name,make,shape", NORM_CASES, ids=[c[0] for c in NORM_CASES])
def test_norm_layers(name, make, shape, monkeypatch):
    check_layer(randomise(make()), randn(*shape), monkeypatch)


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: nn.LayerNorm(4, elementwise_affine=False), (2, 4)),
        (lambda: nn.RMSNorm(4, elementwise_affine=False), (2, 4)),
        (lambda: nn.InstanceNorm1d(3), (2, 3, 5)),
        (lambda: nn.GroupNorm(2, 4, affine=False), (2, 4, 5)),
    ],
)
def test_norm_layers_without_parameters(make, shape):
    layer = make().to(DT)
    x = randn(*shape)
    rule = rule_for(layer)
    g = torch.ones_like(x)
    assert rule.per_sample_grads(layer, x, g) == {}
    assert rule.sq_norms(layer, x, g) == {}
    assert rule.clipped_sum(layer, x, g, {}) == {}


@pytest.mark.parametrize("cls", [nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d])
def test_instance_norm_refuses_running_stats(cls):
    with pytest.raises(ValueError, match="track_running_stats=False"):
        rule_for(cls(3, affine=True, track_running_stats=True))


# --------------------------------------------------------------------------- frozen parameters

FROZEN_CASES = [
    ("linear", lambda: nn.Linear(3, 2), (4, 3)),
    ("conv2d", lambda: nn.Conv2d(2, 3, 2, padding=1), (3, 2, 4, 4)),
    ("layernorm", lambda: nn.LayerNorm(3), (4, 2, 3)),
    ("groupnorm", lambda: nn.GroupNorm(1, 2), (3, 2, 5)),
]


@pytest.mark.parametrize("frozen", ["bias", "weight"])
@pytest.mark.parametrize("name,make,shape", FROZEN_CASES, ids=[c[0] for c in FROZEN_CASES])
def test_frozen_parameter_is_absent(name, make, shape, frozen, monkeypatch):
    layer = randomise(make())
    getattr(layer, frozen).requires_grad_(False)
    check_layer(layer, randn(*shape), monkeypatch)  # checks the dict keys == trainable names


def test_frozen_embedding_gives_empty_dicts():
    layer = randomise(nn.Embedding(5, 3)).requires_grad_(False)
    x = long_inputs(2, 3)
    g = randn(2, 3, 3)
    rule = rule_for(layer)
    assert rule.per_sample_grads(layer, x, g) == {}
    assert rule.sq_norms(layer, x, g) == {}
    assert rule.clipped_sum(layer, x, g, {}) == {}


# --------------------------------------------------------------------------- contexts and dtypes


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: nn.Linear(3, 2), (4, 5, 3)),
        (lambda: nn.Conv1d(2, 2, 3), (3, 2, 6)),
        (lambda: nn.LayerNorm(3), (4, 3)),
    ],
)
def test_rules_under_no_grad_with_grad_requiring_captures(make, shape):
    layer = randomise(make())
    x = randn(*shape).requires_grad_(True)
    out = layer(x)  # activations still attached to the graph, as a hook may see them
    g = randn(*out.shape, seed=7)
    rule = rule_for(layer)
    with torch.no_grad():
        psg = rule.per_sample_grads(layer, x, g)
        sq = rule.sq_norms(layer, x, g)
        cs = rule.clipped_sum(layer, x, g, {n: torch.ones(shape[0], dtype=DT) for n in psg})
    for d in (psg, sq, cs):
        assert all(not v.requires_grad for v in d.values())
    # outside no_grad too: results never carry a graph
    assert all(not v.requires_grad for v in rule.per_sample_grads(layer, x, g).values())


def test_float32_and_scales_of_another_dtype():
    layer = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(3, 2, 5, 5)
    g = torch.randn(3, 3, 5, 5)
    rule = rule_for(layer)
    psg = rule.per_sample_grads(layer, x, g)
    assert all(v.dtype == torch.float32 for v in psg.values())
    cs = rule.clipped_sum(layer, x, g, {n: torch.ones(3, dtype=DT) for n in psg})
    for n in psg:
        assert cs[n].dtype == torch.float32
        torch.testing.assert_close(cs[n], psg[n].sum(0), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: nn.LayerNorm(8), (3, 4, 8)),
        (lambda: nn.GroupNorm(2, 4), (3, 4, 6)),
        (lambda: nn.RMSNorm(8), (3, 4, 8)),
        (lambda: nn.InstanceNorm1d(4, affine=True), (3, 4, 6)),
    ],
)
def test_norm_rules_in_bfloat16_match_float64(make, shape):
    layer64 = randomise(make())
    layer16 = make().to(torch.bfloat16)
    layer16.load_state_dict({k: v.to(torch.bfloat16) for k, v in layer64.state_dict().items()})
    x = randn(*shape).to(torch.bfloat16)
    g = randn(*shape, seed=5).to(torch.bfloat16)
    got = rule_for(layer16).per_sample_grads(layer16, x, g)
    ref = rule_for(layer64).per_sample_grads(layer64, x.to(DT), g.to(DT))
    assert set(got) == set(ref)
    for n in ref:
        assert got[n].dtype == torch.bfloat16
        torch.testing.assert_close(got[n].to(DT), ref[n], atol=0.1, rtol=0.05)


# --------------------------------------------------------------------------- float32 accuracy

FLOAT32_CASES = [
    ("linear_seq", lambda: nn.Linear(16, 12), lambda: torch.randn(6, 5, 16)),
    ("linear_rows", lambda: nn.Linear(16, 12), lambda: torch.randn(6, 16)),
    ("linear_rows_no_bias", lambda: nn.Linear(16, 12, bias=False), lambda: torch.randn(6, 16)),
    ("conv2d_groups_dilation", lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2), lambda: torch.randn(5, 4, 9, 9)),
    ("conv1d_same_reflect", lambda: nn.Conv1d(3, 5, 4, padding="same", padding_mode="reflect"), lambda: torch.randn(5, 3, 12)),
    ("embedding", lambda: nn.Embedding(20, 8, padding_idx=0), lambda: torch.randint(0, 20, (6, 7))),
    ("layernorm", lambda: nn.LayerNorm(10), lambda: torch.randn(6, 4, 10)),
    ("groupnorm", lambda: nn.GroupNorm(2, 6), lambda: torch.randn(5, 6, 7)),
    ("instancenorm2d", lambda: nn.InstanceNorm2d(3, affine=True), lambda: torch.randn(4, 3, 5, 5)),
    ("rmsnorm", lambda: nn.RMSNorm(10), lambda: torch.randn(6, 4, 10)),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@pytest.mark.parametrize("name,make,inputs", FLOAT32_CASES, ids=[c[0] for c in FLOAT32_CASES])
def test_float32_rules_within_1e5_of_the_float64_oracle(name, make, inputs):
    torch.manual_seed(0)
    layer64 = randomise(make())
    layer32 = make().float()
    layer32.load_state_dict({k: v.float() for k, v in layer64.state_dict().items()})
    layer64.load_state_dict({k: v.double() for k, v in layer32.state_dict().items()})  # same values
    x32 = inputs()
    x64 = x32.double() if x32.is_floating_point() else x32
    y64 = targets_for(layer64, x64, torch.Generator().manual_seed(3))
    oracle = per_sample_grads_loop(layer64, sq_loss, x64, y64)
    a, g = capture(layer32, x32, y64.float())
    rule = rule_for(layer32)
    psg = rule.per_sample_grads(layer32, a, g)
    sq = rule.sq_norms(layer32, a, g)
    scales = {n: torch.rand(len(x32)) for n in psg}
    sums = rule.clipped_sum(layer32, a, g, scales)
    for n, want in oracle.items():
        scale = want.abs().max().item()
        assert (psg[n].double() - want).abs().max().item() <= 1e-5 * scale, n
        want_sq = want.flatten(1).pow(2).sum(1)
        assert (sq[n].double() - want_sq).abs().max().item() <= 1e-5 * want_sq.max().item(), n
        want_sum = torch.tensordot(scales[n].double(), want, dims=1)
        assert (sums[n].double() - want_sum).abs().max().item() <= 1e-5 * max(scale, want_sum.abs().max().item()), n


def _vjp_oracle(layer64: nn.Module, a: torch.Tensor, g: torch.Tensor) -> dict[str, torch.Tensor]:
    """float64 per-sample gradients of ``layer64`` at each sample's input ``a_i`` with output
    gradient ``g_i``, one sample at a time through autograd (``a`` and ``g`` upcast exactly
    from the float32 pass): the rule's float32 arithmetic is compared, not the rounding of the
    float32 forward and loss gradient upstream of the layer (which alone exceeds 1e-5 where
    the loss gradient cancels)."""
    a64 = a.double() if a.is_floating_point() else a
    g64 = g.double()
    params = [(n, p) for n, p in layer64.named_parameters() if p.requires_grad]
    out: dict[str, list] = {n: [] for n, _ in params}
    for i in range(len(a64)):
        grads = torch.autograd.grad(layer64(a64[i : i + 1]), [p for _, p in params], g64[i : i + 1], allow_unused=True)
        for (n, p), gr in zip(params, grads):
            out[n].append(torch.zeros_like(p) if gr is None else gr)
    return {n: torch.stack(out[n]) if out[n] else p.new_zeros((0, *p.shape)) for n, p in params}


def _float32_check(make, inputs, monkeypatch, ghost=None, seed=0):
    """float32 rule (per-sample grads, norms with the ghost branch forced or chosen, clipped
    sum) within 1e-5 relative of the float64 oracle on the same parameter values, inputs and
    output gradients (:func:`_vjp_oracle`)."""
    torch.manual_seed(seed)
    layer64 = randomise(make(), seed=seed + 1)
    layer32 = make().float()
    layer32.load_state_dict({k: v.float() for k, v in layer64.state_dict().items()})
    layer64.load_state_dict({k: v.double() for k, v in layer32.state_dict().items()})
    x32 = inputs()
    x64 = x32.double() if x32.is_floating_point() else x32
    y64 = targets_for(layer64, x64, torch.Generator().manual_seed(seed + 3))
    a, g = capture(layer32, x32, y64.float())
    oracle = _vjp_oracle(layer64, a, g)
    rule = rule_for(layer32)
    psg = rule.per_sample_grads(layer32, a, g)
    with monkeypatch.context() as mp:
        if ghost is not None:
            mp.setattr(rules_mod, "use_ghost", lambda T, d, p, _g=ghost: _g)
        sq = rule.sq_norms(layer32, a, g)
    scales = {n: torch.rand(len(x32), generator=torch.Generator().manual_seed(seed)) for n in psg}
    sums = rule.clipped_sum(layer32, a, g, scales)
    # relative to the largest entry over all parameters of the layer
    scale = max(w.abs().max().item() for w in oracle.values())
    sq_scale = max(w.flatten(1).pow(2).sum(1).max().item() for w in oracle.values())
    for n, want in oracle.items():
        assert psg[n].dtype == sq[n].dtype == sums[n].dtype == torch.float32
        assert (psg[n].double() - want).abs().max().item() <= 1e-5 * scale, n
        want_sq = want.flatten(1).pow(2).sum(1)
        assert (sq[n].double() - want_sq).abs().max().item() <= 1e-5 * sq_scale, n
        want_sum = torch.tensordot(scales[n].double(), want, dims=1)
        tol = 1e-5 * max(scale, max(w.abs().max().item() for w in [want_sum]))
        assert (sums[n].double() - want_sum).abs().max().item() <= tol, n


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@settings(max_examples=30, deadline=None)
@given(
    B=st.integers(1, 6),
    groups=st.sampled_from([1, 2]),
    k=st.integers(1, 4),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 2),
    padding=st.sampled_from([0, 1, "same"]),
    mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    bias=st.booleans(),
    dim=st.sampled_from([1, 2]),
    ghost=st.sampled_from([None, True, False]),
    seed=st.integers(0, 1000),
)
def test_float32_conv_hypothesis(B, groups, k, stride, dilation, padding, mode, bias, dim, ghost, seed):
    """Conv1d/2d in float32, every branch (grouped weight-gradient kernel, ghost, chunks)."""
    if padding == "same":
        stride = 1
    size = 9
    cls = nn.Conv1d if dim == 1 else nn.Conv2d
    make = lambda: cls(2 * groups, 3 * groups, k, stride=stride, padding=padding, dilation=dilation,  # noqa: E731
                       groups=groups, bias=bias, padding_mode=mode)
    inputs = lambda: torch.randn((B, 2 * groups) + (size,) * dim, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        _float32_check(make, inputs, mp, ghost=ghost, seed=seed)


def test_the_engine_kernels_are_built_where_a_c_compiler_is():
    """make test installs the conv, norm and Gram kernels on Linux with a C compiler: their
    absence there is a build failure, not a reason to skip their tests."""
    import shutil
    import sys

    if not (sys.platform.startswith("linux") and shutil.which("cc")):
        pytest.skip("no C compiler on this platform")
    assert rules_mod._convpsg is not None and rules_mod._normpsg is not None and rules_mod._gram is not None


needs_gram_kernel = pytest.mark.skipif(
    rules_mod._gram is None or not rules_mod._gram.available(),
    reason="dpclip's Gram kernel is not built or this CPU has no AVX2",
)


@needs_gram_kernel
@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(0, 5),
    T=st.integers(1, 40),
    d=st.integers(1, 40),
    p=st.integers(1, 40),
    pad=st.sampled_from([0, 3]),
    bias=st.booleans(),
    centre=st.booleans(),
    spread=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_float32_gram_kernel_hypothesis(B, T, d, p, pad, bias, centre, spread, seed):
    """The Gram kernel's ghost norm <a a^T, g g^T> and bias norm ||sum_t g_t||^2 within 1e-5
    relative of float64, for T across the tile bounds (6 x 16), rows apart by more than their
    size (slices of wider tensors), output gradients whose sum over positions nearly cancels
    (the bias's norm must not lose it), the batch in one call or one share per thread; and
    the kernel is what ran."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(B, T, d + pad, generator=gen)[..., :d]
    g = torch.randn(B, T, p + pad, generator=gen) * 3.0
    if centre:  # sum_t g_t about 1e-3 of sum_t |g_t|
        g = g - g.mean(1, keepdim=True) + 1e-3 * torch.randn(B, 1, p + pad, generator=gen)
    g = g[..., :p]
    assert rules_mod._gram_kernel_takes(a, g)
    with pytest.MonkeyPatch.context() as mp:
        if spread:
            mp.setattr(rules_mod, "_SPREAD_MIN", 0)
        weight, bias_sq = rules_mod._ghost_sq_and_bias(a, g, bias)
    a64, g64 = a.double(), g.double()
    want = (a64 @ a64.transpose(1, 2) * (g64 @ g64.transpose(1, 2))).sum((1, 2))
    assert weight.shape == (B,) and weight.dtype == torch.float32
    if B:
        assert (weight.double() - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    if bias:
        want_b = g64.sum(1).pow(2).sum(1)
        assert bias_sq.shape == (B,)
        if B:
            assert (bias_sq.double() - want_b).abs().max().item() <= 1e-5 * want_b.abs().max().item()
    else:
        assert bias_sq is None


@needs_gram_kernel
@pytest.mark.parametrize("d,p", [(1, 1), (7, 9), (8, 16), (33, 70), (784, 512)])
@pytest.mark.parametrize("threads", [1, 2])
def test_gram_kernel_one_position(d, p, threads):
    """T = 1 (one position per sample) takes the kernel's row path: ||a||^2 ||g||^2 and ||g||^2
    within 1e-5 relative of float64, for widths on and off the 8- and 32-float loops."""
    gen = torch.Generator().manual_seed(d * 1000 + p)
    a, g = torch.randn(6, 1, d, generator=gen), torch.randn(6, 1, p, generator=gen)
    out, bias = a.new_empty(6), a.new_empty(6)
    rules_mod._gram.gram_dot(a.data_ptr(), g.data_ptr(), out.data_ptr(), bias.data_ptr(), 0, 6, (1, d, p, d, d, p, p), threads)
    want_b = g.double().pow(2).sum((1, 2))
    want = a.double().pow(2).sum((1, 2)) * want_b
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=0)
    torch.testing.assert_close(bias.double(), want_b, rtol=1e-5, atol=0)


@needs_gram_kernel
def test_gram_kernel_paths_and_refusals():
    """Which inputs the Gram kernel takes (float32 CPU, 1 <= T <= 1024); expanded and
    transposed views, and size-1 dimensions with any stride, agree with torch's path; bad
    shapes are refused."""
    from dpclip import _gram

    takes = rules_mod._gram_kernel_takes
    assert takes(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5))
    assert not takes(torch.zeros(2, 3, 4, dtype=torch.float64), torch.zeros(2, 3, 5, dtype=torch.float64))
    assert not takes(torch.zeros(2, 0, 4), torch.zeros(2, 0, 5))
    assert not takes(torch.zeros(1, 1025, 4), torch.zeros(1, 1025, 5))
    gen = torch.Generator().manual_seed(0)
    cases = [
        (torch.randn(3, 1, 8, generator=gen).expand(3, 5, 8), torch.randn(3, 5, 4, generator=gen)),  # rows 0 apart
        (torch.randn(3, 8, 5, generator=gen).transpose(1, 2), torch.randn(3, 4, 5, generator=gen).transpose(1, 2)),
        # one position: torch keeps the size-1 dim's stride at 1 (a conv's ghost norm with one
        # output position per sample, B = 1 and B = 4)
        (torch.randn(1, 1, 8, generator=gen), torch.randn(1, 3, 1, generator=gen).transpose(1, 2)),
        (torch.randn(4, 1, 8, generator=gen), torch.randn(4, 3, 1, generator=gen).transpose(1, 2)),
    ]
    for a, g in cases:
        assert takes(a, g)
        got, got_b = rules_mod._ghost_sq_and_bias(a, g, True)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(rules_mod, "_gram", None)
            want, want_b = rules_mod._ghost_sq_and_bias(a, g, True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
        torch.testing.assert_close(got_b, want_b, rtol=1e-5, atol=0)
    x = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="inconsistent"):
        _gram.gram_dot(x.data_ptr(), x.data_ptr(), x.data_ptr(), 0, 0, 2, (3, 4, 4, 12, 2, 12, 4))  # rows overlap
    with pytest.raises(ValueError, match="threads"):
        _gram.gram_dot(x.data_ptr(), x.data_ptr(), x.data_ptr(), 0, 0, 2, (3, 4, 4, 12, 4, 12, 4), 0)


needs_conv_kernel = pytest.mark.skipif(
    rules_mod._convpsg is None or not rules_mod._convpsg.available(),
    reason="dpclip's conv2d kernel is not built or this CPU has no AVX2",
)


@needs_conv_kernel
@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 5),
    groups=st.sampled_from([1, 2]),
    cg=st.integers(1, 4),
    og=st.sampled_from([8, 9, 16, 19]),  # blocks of 8 outputs and the remainder
    k=st.tuples(st.integers(1, 5), st.integers(1, 13)),  # widths past 8: two column blocks
    stride=st.tuples(st.integers(1, 2), st.integers(1, 3)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),  # dilated columns: the gather
    padding=st.sampled_from([(0, 0), (1, 2), "same"]),
    mode=st.sampled_from(["zeros", "reflect", "circular"]),
    bias=st.booleans(),
    spread=st.booleans(),
    variant=st.sampled_from(["columns", "outputs", "positions"]),
    seed=st.integers(0, 1000),
)
def test_float32_conv2d_kernel_hypothesis(B, groups, cg, og, k, stride, dilation, padding, mode, bias, spread, variant, seed):
    """dpclip's per-sample conv2d kernels (float32) within 1e-5 relative of the float64 oracle:
    per-sample gradients, norms and clipped sums, over groups, outputs per group, kernel
    sizes, strides, dilations and paddings, with the batch in one call or in one share per
    thread; each kernel variant is forced in turn and must be used."""
    if padding == "same":
        stride = (1, 1)
    if variant == "outputs":
        og = 8 * (1 + og // 10)  # a multiple of 8
    if variant == "positions":
        stride = (stride[0], 1)  # its one constraint: stride 1 along the width
    make = lambda: nn.Conv2d(groups * cg, groups * og, k, stride=stride, padding=padding,  # noqa: E731
                             dilation=dilation, groups=groups, bias=bias, padding_mode=mode)
    inputs = lambda: torch.randn((B, groups * cg, 13, 29), generator=torch.Generator().manual_seed(seed))  # noqa: E731
    calls = []
    kernel = rules_mod._conv_psg_kernel
    with pytest.MonkeyPatch.context() as mp:
        if variant == "columns":
            mp.setattr(rules_mod, "_KERNEL_MIN_KW", 1)
        else:
            mp.setattr(rules_mod, "_KERNEL_MIN_KW", 10**9)
            mp.setattr(rules_mod, "_KERNEL_MAX_CG", 10**9)
        # any number of output columns (tails of 1-7 columns past the blocks of 8), or none
        mp.setattr(rules_mod, "_KERNEL_MIN_WO", 1 if variant == "positions" else 10**9)
        mp.setattr(rules_mod, "_conv_psg_kernel", lambda *a: calls.append(a[-1]) or kernel(*a))
        if spread:
            mp.setattr(rules_mod, "_SPREAD_MIN", 0)
        _float32_check(make, inputs, mp, seed=seed)
    assert calls and set(calls) == {variant}


@needs_conv_kernel
def test_conv_ghost_branch_takes_per_sample_gradients_from_the_kernel():
    """W2's 16->32 4x4 stride-2 layer in float32: the norm pass's per-sample gradients come from
    the output-vectorised kernel (kept in the scratch), and norms and clipped sum match the
    float64 oracle; no patches are formed."""
    layer64 = randomise(nn.Conv2d(16, 32, 4, stride=2), seed=3)
    layer32 = nn.Conv2d(16, 32, 4, stride=2)
    layer32.load_state_dict({k: v.float() for k, v in layer64.state_dict().items()})
    x64 = randn(4, 16, 13, 13)
    y = targets_for(layer64, x64, torch.Generator().manual_seed(1))
    oracle = per_sample_grads_loop(layer64, sq_loss, x64, y)
    a, g = capture(layer32, x64.float(), y.float())
    assert rules_mod._conv_norm_path(layer32, a, g) == "ghost"
    scratch = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rules_mod, "_conv_patches", None)  # forming patches would fail
        sq = rules_mod._conv_sq(layer32, a, g, scratch)
        scales = {n: torch.rand(4, generator=torch.Generator().manual_seed(2)) for n in ("weight", "bias")}
        sums = rules_mod._conv_clipped(layer32, a, g, scales, scratch)
    assert "psg_t" in scratch and "psg" not in scratch
    for n in ("weight", "bias"):
        want = oracle[n]
        scale = want.abs().max().item()
        torch.testing.assert_close(sq[n].double(), want.flatten(1).pow(2).sum(1), rtol=1e-5, atol=1e-5 * scale**2)
        torch.testing.assert_close(sums[n].double(), torch.tensordot(scales[n].double(), want, dims=1), rtol=1e-5, atol=1e-5 * scale)


@needs_conv_kernel
def test_conv2d_kernel_takes_the_layers_it_wins_on():
    """W2's 1->16 8x8 layer, W3's RGB 3x3 first layer and its 32->64 layer go to the kernels;
    a stride-2 narrow layer with 13 output columns, a depthwise conv on 8x8, float64, 1-D and
    3-D convs do not."""
    def takes(layer, shape, dtype=torch.float32):
        x = torch.zeros(shape, dtype=dtype)
        with torch.no_grad():
            y = layer.to(dtype)(x)
        return rules_mod._conv_kernel_takes(layer, x, torch.zeros_like(y))

    assert takes(nn.Conv2d(1, 16, 8, 2, padding=3), (2, 1, 28, 28)) == "columns"
    assert takes(nn.Conv2d(3, 32, 3, padding=1), (2, 3, 32, 32)) == "positions"
    assert takes(nn.Conv2d(32, 64, 3, padding=1), (2, 32, 16, 16)) == "positions"
    assert takes(nn.Conv2d(3, 32, 3, padding=1), (2, 3, 8, 8)) == "outputs"  # 8 output columns
    assert takes(nn.Conv2d(3, 32, 3, stride=2, padding=1), (2, 3, 32, 32)) == "outputs"
    assert takes(nn.Conv2d(3, 20, 3, stride=2, padding=1), (2, 3, 32, 32)) == "columns"  # 20 outputs: not a multiple of 8
    assert takes(nn.Conv2d(16, 32, 4, stride=2), (2, 16, 28, 28)) is None
    assert takes(nn.Conv2d(32, 64, 3, padding=1), (2, 32, 8, 8)) is None
    assert takes(nn.Conv2d(16, 16, 3, padding=1, groups=16), (2, 16, 8, 8)) is None
    assert takes(nn.Conv2d(1, 16, 8, 2, padding=3), (2, 1, 28, 28), torch.float64) is None
    assert takes(nn.Conv1d(1, 16, 8), (2, 1, 28)) is None
    assert takes(nn.Conv3d(1, 16, 3), (2, 1, 6, 6, 6)) is None


@needs_conv_kernel
@pytest.mark.parametrize("variant", ["conv2d_psg", "conv2d_psg_t", "conv2d_psg_p"])
def test_conv2d_kernel_threads_give_the_same_values(variant):
    """The kernel's own threads (1-7, more than there are samples too) each take a share of
    samples: bit for bit the values of one thread; threads < 1 is refused."""
    from dpclip import _convpsg

    B, C, H, W, O, k = 5, 2, 9, 9, 16, 3
    gen = torch.Generator().manual_seed(0)
    x, g = torch.randn(B, C, H, W, generator=gen), torch.randn(B, O, H - k + 1, W - k + 1, generator=gen)
    dims = (C, H, W, O, H - k + 1, W - k + 1, 1, k, k, 1, 1, 1, 1)
    fn = getattr(_convpsg, variant)
    outs = []
    for threads in (1, 2, 3, 7):
        out = torch.full((B, O * C * k * k), float("nan"))
        fn(x.data_ptr(), g.data_ptr(), out.data_ptr(), 0, B, dims, threads)
        outs.append(out)
    assert not outs[0].isnan().any()
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    with pytest.raises(ValueError, match="threads"):
        fn(x.data_ptr(), g.data_ptr(), outs[0].data_ptr(), 0, B, dims, 0)


@needs_conv_kernel
def test_conv2d_kernel_refuses_inconsistent_shapes():
    from dpclip import _convpsg

    x, g, out = torch.zeros(1, 1, 4, 4), torch.zeros(1, 8, 3, 3), torch.zeros(1, 8, 1, 3, 3)
    dims = (1, 4, 4, 8, 3, 3, 1, 3, 3, 1, 1, 1, 1)  # a 3x3 output needs a 5x5 input
    with pytest.raises(ValueError, match="inconsistent shapes"):
        _convpsg.conv2d_psg(x.data_ptr(), g.data_ptr(), out.data_ptr(), 0, 1, dims)
    with pytest.raises(ValueError, match="out of range"):
        _convpsg.conv2d_psg(x.data_ptr(), g.data_ptr(), out.data_ptr(), 0, 1, (0,) + dims[1:])


@settings(max_examples=30, deadline=None)
@given(
    B=st.integers(1, 6),
    lead=st.sampled_from([(), (1,), (5,), (2, 3)]),
    d=st.integers(1, 24),
    p=st.integers(1, 24),
    bias=st.booleans(),
    ghost=st.sampled_from([None, True, False]),
    seed=st.integers(0, 1000),
)
def test_float32_linear_hypothesis(B, lead, d, p, bias, ghost, seed):
    make = lambda: nn.Linear(d, p, bias=bias)  # noqa: E731
    inputs = lambda: torch.randn((B, *lead, d), generator=torch.Generator().manual_seed(seed))  # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        _float32_check(make, inputs, mp, ghost=ghost, seed=seed)


@settings(max_examples=20, deadline=None)
@given(
    B=st.integers(1, 6),
    T=st.integers(1, 9),
    V=st.integers(2, 30),
    D=st.integers(1, 12),
    pad=st.booleans(),
    freq=st.booleans(),
    ghost=st.sampled_from([None, True, False]),
    seed=st.integers(0, 1000),
)
def test_float32_embedding_hypothesis(B, T, V, D, pad, freq, ghost, seed):
    make = lambda: nn.Embedding(V, D, padding_idx=0 if pad else None, scale_grad_by_freq=freq)  # noqa: E731
    inputs = lambda: torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))  # noqa: E731
    with pytest.MonkeyPatch.context() as mp:
        _float32_check(make, inputs, mp, ghost=ghost, seed=seed)


needs_norm_kernel = pytest.mark.skipif(rules_mod._normpsg is None, reason="dpclip's norm kernel is not built")


@needs_norm_kernel
def test_norm_kernel_threads_give_the_same_values():
    """group and rows on their own threads (1-7): bit for bit the values of one thread."""
    B, C, S = 5, 4, 6
    gen = torch.Generator().manual_seed(1)
    x, g = torch.randn(B, C, S, generator=gen), torch.randn(B, C, S, generator=gen)
    for width, call in (
        (C, lambda w, b, t: rules_mod._normpsg.group(x.data_ptr(), g.data_ptr(), w.data_ptr(), b.data_ptr(), 0, B, C, S, 2, 1e-5, t)),
        (S, lambda w, b, t: rules_mod._normpsg.rows(x.data_ptr(), g.data_ptr(), w.data_ptr(), b.data_ptr(), 0, B, C, S, 1e-5, False, t)),
    ):
        outs = []
        for threads in (1, 2, 3, 7):
            w, b = torch.full((B, width), float("nan")), torch.full((B, width), float("nan"))
            call(w, b, threads)
            outs.append(torch.cat([w, b], 1))
        assert not outs[0].isnan().any()
        for out in outs[1:]:
            assert torch.equal(out, outs[0])
        with pytest.raises(ValueError, match="threads"):
            call(w, b, 0)


@needs_norm_kernel
@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 5),
    kind=st.sampled_from(["group", "instance", "layer", "rms"]),
    C=st.sampled_from([2, 4, 6]),
    spatial=st.sampled_from([(), (5,), (3, 4), (2, 2, 3)]),
    affine=st.sampled_from(["both", "weight", "bias"]),
    offset=st.sampled_from([0.0, 3.0]),  # inputs far from zero mean: the centred sums must not cancel
    spread=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_float32_norm_kernel_hypothesis(B, kind, C, spatial, affine, offset, spread, seed):
    """dpclip's norm-layer kernel (float32) within 1e-5 relative of the float64 oracle for
    GroupNorm, InstanceNorm, LayerNorm (one or two normalised dims) and RMSNorm, with the
    weight, the bias or both trainable, inputs with a large mean, and the batch in one call or
    one share per thread; the kernel must be used."""
    if kind == "rms":
        affine = "both"  # RMSNorm has a weight only
    if kind in ("group", "instance") and not spatial:
        spatial = (5,)
    if kind == "instance" and len(spatial) > 3:
        spatial = spatial[:3]
    if kind == "group":
        make = lambda: nn.GroupNorm(2, C)  # noqa: E731
    elif kind == "instance":
        cls = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[len(spatial)]
        make = lambda: cls(C, affine=True)  # noqa: E731
    elif kind == "layer":
        shape = (C,) if len(spatial) < 2 else (spatial[-1], C)
        make = lambda: nn.LayerNorm(shape)  # noqa: E731
    else:
        # RMSNorm's default eps (None) is its input dtype's machine epsilon, so the float32 layer
        # and the float64 oracle would differ by 1.2e-7 / mean(x^2) relative (2e-5 on a row of
        # two small inputs): give both float32's
        make = lambda: nn.RMSNorm(C, eps=torch.finfo(torch.float32).eps)  # noqa: E731
    if kind == "layer" and len(spatial) >= 2:
        x_shape = (B, *spatial[:-1], spatial[-1], C)
    elif kind in ("layer", "rms"):
        x_shape = (B, *spatial, C)
    else:
        x_shape = (B, C, *spatial)

    def made():
        layer = make()
        if affine != "both":
            getattr(layer, "bias" if affine == "weight" else "weight").requires_grad_(False)
        return layer

    inputs = lambda: torch.randn(x_shape, generator=torch.Generator().manual_seed(seed)) + offset  # noqa: E731
    calls = []
    takes = rules_mod._norm_kernel_takes
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rules_mod, "_norm_kernel_takes", lambda *a: bool(calls.append(takes(*a))) or takes(*a))
        if spread:
            mp.setattr(rules_mod, "_SPREAD_MIN", 0)
        _float32_check(made, inputs, mp, seed=seed)
    assert calls and all(calls)


@pytest.mark.parametrize(
    "make,shape,want",
    [
        (lambda: nn.Linear(4, 4), (3, 8, 4), True),  # 16 <= 8 * 8
        (lambda: nn.Linear(64, 64), (3, 16, 64), False),  # 4096 > 16 * 128
        (lambda: nn.Linear(64, 64), (3, 64), False),  # one position: never
        (lambda: nn.Conv2d(3, 8, 3, padding=1), (2, 3, 16, 16), True),
        (lambda: nn.Conv2d(64, 64, 3, padding=1), (2, 64, 4, 4), False),
        (lambda: nn.LayerNorm(4), (2, 3, 4), True),  # materialised rule
        (lambda: nn.Embedding(10, 4), None, False),  # no plan
    ],
)
def test_materialise_plan(make, shape, want):
    layer = make()
    x = torch.randint(0, 10, (2, 3)) if shape is None else torch.randn(shape)
    with torch.no_grad():
        g = layer(x)
    assert rule_for(layer).materialise(layer, x, g) is want


@pytest.mark.parametrize("unfold_max", [0, 10**6])
@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: nn.Conv1d(4, 6, 3, stride=2, dilation=2, groups=2, padding=1), (5, 4, 11)),
        (lambda: nn.Conv2d(4, 6, (2, 3), stride=(1, 2), dilation=(2, 1), groups=2, padding=1, padding_mode="reflect"), (5, 4, 7, 8)),
        (lambda: nn.Conv2d(3, 4, 3, padding="same", padding_mode="circular"), (3, 3, 6, 6)),
    ],
)
def test_conv_per_sample_paths(make, shape, unfold_max, monkeypatch):
    """Both per-sample weight-gradient paths (unfold + bmm, grouped weight-gradient kernel in
    chunks of samples) against the oracle; chunks smaller than the batch."""
    monkeypatch.setattr(rules_mod, "_FORWARD_PSG_MAX_CG", {})  # tested on its own above
    monkeypatch.setattr(rules_mod, "_UNFOLD_MAX_D", unfold_max)
    monkeypatch.setattr(rules_mod, "_PSG_CHUNK", 2)
    check_layer(randomise(make()), randn(*shape), monkeypatch)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")
@settings(max_examples=60, deadline=None)
@given(
    path=st.sampled_from(["gram", "ghost"]),
    B=st.integers(0, 4),
    dim=st.sampled_from([1, 2, 3]),
    groups=st.sampled_from([1, 2]),
    k=st.integers(1, 3),
    stride=st.integers(1, 2),
    dilation=st.integers(1, 2),
    padding=st.sampled_from([0, 1, 2, "same"]),
    mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    chunk=st.sampled_from([1, 50, 1 << 22]),
)
def test_conv_ghost_norms(path, B, dim, groups, k, stride, dilation, padding, mode, chunk):
    """Both conv ghost norms (E16), from the Gram matrix over positions and from channels-last
    patches, equal per-sample autograd for every stride, dilation, padding (mode), groups and
    1-3 spatial dims, in chunks of samples; and the clipped sum from the kept patches equals
    the oracle's weighted sum."""
    if padding == "same":
        stride = 1
    cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
    layer = randomise(cls(2 * groups, 3 * groups, k, stride=stride, padding=padding,
                          dilation=dilation, groups=groups, padding_mode=mode))
    size = {1: (9,), 2: (6, 7), 3: (5, 6, 5)}[dim]
    x = randn(B, 2 * groups, *size)
    with torch.no_grad():
        g = randn(*layer(x).shape, seed=3)
    want = torch.zeros(B, dtype=DT)  # oracle: autograd on one sample at a time
    for i in range(B):
        (w,) = torch.autograd.grad((layer(x[i : i + 1]) * g[i : i + 1]).sum(), layer.weight)
        want[i] = w.pow(2).sum()
    kept: list = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rules_mod, "_GRAM_MAX_NUMBERS" if path == "gram" else "_CHUNK_NUMBERS", chunk)
        if path == "gram":
            got = rules_mod._conv_gram_sq(layer, x, g)
        else:
            got = rules_mod._conv_ghost_sq(layer, x, g, kept)
    assert got.shape == (B,)
    torch.testing.assert_close(got, want, **TOL)
    if kept:  # the clipped sum from the patches the norm pass kept
        scale = torch.rand(B, dtype=DT, generator=torch.Generator().manual_seed(4))
        psg = rules_mod._conv_weight_psg(layer, x, g)
        got_sum = rules_mod._conv_sum_from_patches(layer, g, scale, kept)
        torch.testing.assert_close(got_sum, torch.tensordot(scale, psg, dims=1), **TOL)
        # per-sample gradients made from the patches (E18), and their weighted sum
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(rules_mod, "_CHUNK_NUMBERS", chunk)
            from_patches = rules_mod._conv_psg_from_patches(layer, x, g)
        got_sum = rules_mod._conv_sum_from_psg(layer, scale, from_patches)
        torch.testing.assert_close(got_sum, torch.tensordot(scale, psg, dims=1), **TOL)
        torch.testing.assert_close(from_patches.flatten(1).pow(2).sum(1), want, **TOL)


def test_conv_norm_path_choice_and_float32():
    """The cost model's choices on the benchmark layers, and each path within 1e-5 of float64
    in float32: W3's 64->64 layer at 8x8 and 64->128 at 4x4 take the Gram ghost norm, W2's
    16->32 stride-2 layer the patches' ghost norm, a narrow grouped layer per-sample gradients."""
    cases = [
        (nn.Conv2d(64, 64, 3, padding=1), (4, 64, 8, 8), "gram"),
        (nn.Conv2d(64, 128, 3, padding=1), (4, 64, 4, 4), "gram"),
        (nn.Conv2d(16, 32, 4, 2), (4, 16, 13, 13), "ghost"),
        (nn.Conv2d(16, 32, 3, padding=1, groups=2), (4, 16, 16, 16), "psg"),
    ]
    for layer, shape, want in cases:
        x = torch.randn(shape)
        with torch.no_grad():
            g = torch.randn(layer(x).shape)
        assert rules_mod._conv_norm_path(layer, x, g) == want, (layer, want)
        ref = rules_mod._conv_weight_psg(layer.double(), x.double(), g.double()).flatten(1).pow(2).sum(1)
        got = rules_mod._conv_sq(layer.float(), x, g)["weight"]
        assert ((got.double() - ref).abs() / ref).max().item() < 1e-5


@pytest.mark.parametrize(
    "layer,shape,kept",
    [
        (nn.Conv2d(16, 32, 4, stride=2), (5, 16, 13, 13), "psg"),  # W2's second layer
        (nn.Conv2d(16, 64, 4, stride=2), (5, 16, 13, 13), "patches"),  # psg > 3x the captures
        (nn.Conv1d(32, 32, 3, stride=2, groups=2, padding=1, padding_mode="reflect"), (4, 32, 16), "psg"),
    ],
)
def test_conv_clipped_sum_reuses_the_norm_pass_work(layer, shape, kept, monkeypatch):
    """Through the rule interface with a scratch dict: the norm pass leaves per-sample gradients
    made from patches, or the patches themselves; the clipped-sum pass uses them (no
    weight-gradient kernel call) and equals the oracle, as do the norms."""
    layer = randomise(layer)
    x = randn(*shape)
    with torch.no_grad():
        g = randn(*layer(x).shape, seed=3)
    assert rules_mod._conv_norm_path(layer, x, g) == "ghost"
    scratch: dict = {}
    rule = rule_for(layer)
    assert rule.scratch
    sq = rule.sq_norms(layer, x, g, scratch=scratch)
    assert scratch.get(kept) is not None and set(scratch) == {kept}
    psg = rules_mod._conv_psg(layer, x, g)
    for n in ("weight", "bias"):
        torch.testing.assert_close(sq[n], psg[n].flatten(1).pow(2).sum(1), **TOL)
    calls = []
    monkeypatch.setitem(rules_mod._CONV_WEIGHT_GRAD, len(shape) - 2, lambda *a, **k: calls.append(1))
    scales = {"weight": torch.rand(shape[0], dtype=DT), "bias": torch.rand(shape[0], dtype=DT)}
    got = rule.clipped_sum(layer, x, g, scales, scratch=scratch)
    assert not calls
    for n in ("weight", "bias"):
        torch.testing.assert_close(got[n], torch.tensordot(scales[n], psg[n], dims=1), **TOL)


@pytest.mark.parametrize(
    "make,shape",
    [
        (lambda: nn.Conv2d(3, 4, 3, padding=1), (5, 3, 6, 6)),  # unfold + bmm
        (lambda: nn.Conv1d(4, 6, 3, stride=2, groups=2, padding=1), (5, 4, 11)),  # unfold, groups
        (lambda: nn.Conv2d(1, 3, 6, stride=2, padding=2), (5, 1, 13, 12)),  # one input channel, kernel path
        (lambda: nn.GroupNorm(2, 4), (5, 4, 3, 3)),
        (lambda: nn.LayerNorm(6), (5, 3, 6)),
        (lambda: nn.InstanceNorm1d(3, affine=True), (5, 3, 7)),
        (lambda: nn.RMSNorm(6), (5, 2, 6)),
    ],
)
def test_rules_in_chunks_of_samples(make, shape, monkeypatch):
    """Rules that work on a few samples at a time (to keep temporaries small) give the
    oracle's values when the batch is cut into pieces of one and two samples."""
    monkeypatch.setattr(rules_mod, "_FORWARD_PSG_MAX_CG", {})  # the conv paths that chunk
    for numbers in (1, 2 * math.prod(shape[1:]) * 36):
        with monkeypatch.context() as mp:
            mp.setattr(rules_mod, "_CHUNK_NUMBERS", numbers)
            check_layer(randomise(make()), randn(*shape), mp)


def test_serial_runs_small_cpu_work_on_one_thread_and_restores_the_count():
    from dpclip import _pool

    """E19: a pass over at most _SERIAL_MAX numbers runs on one intra-op thread; the count
    comes back afterwards, also when the block raises; large work keeps every thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with _pool.serial(10, torch.device("cpu")):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError):
            with _pool.serial(10, torch.device("cpu")):
                raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
        with _pool.serial(_pool.SERIAL_MAX + 1, torch.device("cpu")):
            assert torch.get_num_threads() == 2
        x = torch.randn(7, 5, dtype=DT)
        torch.testing.assert_close(rules_mod._sq(x), x.pow(2).sum(1), rtol=0, atol=1e-12)
    finally:
        torch.set_num_threads(before)
