"""nn.MultiheadAttention through the batched recomputation (dpclip/grad_sample/mha.py).

Per-sample gradients, squared norms (ghost and materialised) and clipped sums against the
float64 per-sample loop, over hypothesis-generated configurations: self- and cross-attention,
different key/value dimensions, biases, bool/float attention masks (2-D and 3-D), key padding
masks, causal masks, frozen projections, batches of 0 and 1; and the cases that must fall back
to torch.func (attention weights in the loss, dropout in training).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from dpclip.grad_sample import GradSampler
from dpclip.grad_sample import mha as mha_mod
from tests.oracles import per_sample_grads_loop

DT = torch.float64
TOL = dict(atol=1e-10, rtol=1e-10)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


class AttnModel(nn.Module):
    def __init__(self, E=4, H=2, kdim=None, vdim=None, bias=True, cross=False, mask=None, kpm=False,
                 causal=False, need_weights=False, use_weights=False, dropout=0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, H, bias=bias, kdim=kdim, vdim=vdim, batch_first=True, dropout=dropout)
        self.kproj = nn.Linear(3, kdim or E)
        self.vproj = nn.Linear(3, vdim or E)
        self.qproj = nn.Linear(3, E)
        self.head = nn.Linear(E, 2)
        self.cross, self.mask, self.kpm, self.causal = cross, mask, kpm, causal
        self.need_weights, self.use_weights = need_weights, use_weights

    def forward(self, x):
        q = self.qproj(x)
        k = self.kproj(x.flip(1) if self.cross else x)
        v = self.vproj(x.roll(1, 1) if self.cross else x)
        if not self.cross and k.shape[-1] == q.shape[-1] and v.shape[-1] == q.shape[-1]:
            k = v = q  # self-attention: one tensor for all three
        B, T = x.shape[:2]
        kw = {}
        if self.mask == "bool":
            kw["attn_mask"] = torch.ones(T, T, dtype=torch.bool).triu(1)
        elif self.mask == "float":
            kw["attn_mask"] = torch.linspace(-1.0, 1.0, T * T, dtype=x.dtype).view(T, T)
        elif self.mask == "float3d":
            kw["attn_mask"] = torch.linspace(-1.0, 1.0, T * T, dtype=x.dtype).view(1, T, T).repeat(
                x.shape[0] * self.attn.num_heads, 1, 1)
        if self.kpm:
            m = x[..., 0] > 0.5
            m[:, 0] = False
            kw["key_padding_mask"] = m
        if self.causal:
            kw["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(T, dtype=x.dtype)
            kw["is_causal"] = True
        out, w = self.attn(q, k, v, need_weights=self.need_weights, **kw)
        y = self.head(out.mean(1))
        if self.use_weights:
            y = y + w.sum((1, 2))[:, None]
        return y


def ce_sum(out, y):
    return nn.functional.cross_entropy(out, y, reduction="sum")


def build(seed=1, **kw):
    torch.manual_seed(seed)
    return AttnModel(**kw).to(DT)


def check(model, x, y, ghost="auto", expect_batched=True, dtype_tol=TOL):
    oracle = per_sample_grads_loop(model, ce_sum, x, y)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    B = len(x)
    with GradSampler(model, loss_reduction="sum", ghost=ghost) as gs:
        model.zero_grad(set_to_none=True)
        ce_sum(model(x), y).backward()
        unit = next(u for u in gs.units if isinstance(u.module, nn.MultiheadAttention))
        calls = gs._calls[gs.units.index(unit)]
        if B and expect_batched:
            assert gs._mha_pieces(unit, calls[0]) is not None
        psg = gs.per_sample_grads()
        norms = gs.per_sample_sq_norms()
        scales = {p: torch.rand(B, generator=gen(3), dtype=x.dtype) for p in params.values()}
        sums = gs.clipped_sums(scales)
    for n, p in params.items():
        torch.testing.assert_close(psg[p], oracle[n].to(psg[p].dtype), **dtype_tol, msg=n)
        want_sq = oracle[n].flatten(1).pow(2).sum(1)
        torch.testing.assert_close(norms[p], want_sq.to(norms[p].dtype), **dtype_tol, msg=n)
        want = torch.einsum("b,b...->...", scales[p].to(oracle[n].dtype), oracle[n])
        torch.testing.assert_close(sums[p], want.to(sums[p].dtype), **dtype_tol, msg=n)


def data(B, T=4, seed=0, dtype=DT):
    x = torch.randn(B, T, 3, generator=gen(seed), dtype=dtype)
    y = torch.randint(0, 2, (B,), generator=gen(seed + 1))
    return x, y


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(0, 4),
    T=st.integers(1, 5),
    H=st.sampled_from([1, 2]),
    bias=st.booleans(),
    cross=st.booleans(),
    kv=st.sampled_from([None, (3, 5)]),
    mask=st.sampled_from([None, "bool", "float", "float3d"]),
    kpm=st.booleans(),
    need_weights=st.booleans(),
    ghost=st.sampled_from(["auto", "always", "never"]),
)
def test_mha_against_oracle(B, T, H, bias, cross, kv, mask, kpm, need_weights, ghost):
    assume(not (B == 0 and (kpm or mask == "float3d")))  # torch's own forward fails on those
    kdim, vdim = kv if kv else (None, None)
    model = build(H=H, bias=bias, cross=cross, kdim=kdim, vdim=vdim, mask=mask, kpm=kpm, need_weights=need_weights)
    check(model, *data(B, T), ghost=ghost)


def test_mha_causal_frozen_and_float32():
    check(build(causal=True), *data(3, 5))
    model = build()
    model.attn.in_proj_weight.requires_grad_(False)
    model.attn.out_proj.bias.requires_grad_(False)
    check(model, *data(3))
    # float32: within 1e-5 relative of the float64 oracle
    model32 = build(cross=True, kpm=True)
    oracle_model = build(cross=True, kpm=True)
    x, y = data(5)
    oracle = per_sample_grads_loop(oracle_model, ce_sum, x, y)
    model32.float()
    with GradSampler(model32, loss_reduction="sum") as gs:
        ce_sum(model32(x.float()), y).backward()
        norms = gs.per_sample_sq_norms()
        psg = gs.per_sample_grads()
    # relative to the largest entry over all parameters (the key projection's bias has a zero
    # gradient: softmax is invariant to it)
    scale = max(float(g.abs().max()) for g in oracle.values())
    sq_scale = max(float(g.flatten(1).pow(2).sum(1).max()) for g in oracle.values())
    for n, p in model32.named_parameters():
        ref = oracle[n]
        assert float((psg[p].double() - ref).abs().max()) <= 1e-5 * scale, n
        want = ref.flatten(1).pow(2).sum(1)
        assert float((norms[p].double() - want).abs().max()) <= 1e-5 * sq_scale, n


def test_mha_weights_in_loss_and_dropout_fall_back():
    # attention weights reach the loss: the batched path does not see that gradient -> torch.func
    model = build(need_weights=True, use_weights=True)
    x, y = data(3)
    assert not mha_mod.supported(model.attn, (x, x, x), {}, [torch.ones(1), torch.ones(1)])
    check(model, x, y, expect_batched=False)
    # dropout in training: not reproducible by a recomputation; eval mode is fine
    model = build(dropout=0.5)
    model.eval()
    check(model, *data(3))
    assert not mha_mod.supported(build(dropout=0.5).attn, (x, x, x), {}, [torch.ones(1)])


def test_mha_with_skip_param_grads_and_clip():
    from dpclip.grad_sample import clip_and_sum

    model = build(cross=True, mask="bool")
    x, y = data(4)
    oracle = per_sample_grads_loop(model, ce_sum, x, y)
    with GradSampler(model, loss_reduction="sum", skip_param_grads=True) as gs:
        ce_sum(model(x), y).backward()
        sums, norms = clip_and_sum(gs, lambda n: (1.0 / n.clamp_min(1e-12)).clamp(max=1.0))
    total = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in oracle.values()))
    torch.testing.assert_close(norms[:, 0], total, **TOL)
    s = (1.0 / total).clamp(max=1.0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(sums[p], torch.einsum("b,b...->...", s, oracle[n]), **TOL)
