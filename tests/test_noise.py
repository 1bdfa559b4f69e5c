"""Gaussian noise: the plain mechanism, the secure (discrete Gaussian on a grid) one, the sampler.

Statistical checks use fixed seeds (``source="generator"``), so they are deterministic; their
tolerances are 5 standard errors or more, so a correct implementation passes with any seed.
"""

from __future__ import annotations

import math
import pathlib
import re
from decimal import Decimal, localcontext
from fractions import Fraction

import pytest
import torch

from dpclip import noise as noise_module
from dpclip.noise import GaussianNoise, SecureGaussianNoise, secure_generator

CLASSES = [
    pytest.param(lambda sigma: GaussianNoise(sigma), id="plain"),
    pytest.param(lambda sigma: SecureGaussianNoise(sigma, source="generator"), id="secure"),
]


@pytest.fixture(autouse=True)
def _one_thread():
    """Single-threaded torch: on a busy 2-core runner, intra-op thread hand-offs cost
    milliseconds per kernel and dominate these small tensors (timings, not results)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dg_pmf(s: float, support: range) -> list[float]:
    """The discrete Gaussian N_Z(0, s^2) on ``support`` (normalised over all integers)."""
    weight = lambda k: math.exp(-k * k / (2 * s * s))  # noqa: E731
    total = 1 + 2 * sum(weight(k) for k in range(1, int(40 * s) + 2))
    return [weight(k) / total for k in support]


def chi_square(samples: torch.Tensor, s: float) -> tuple[float, int]:
    """Pearson's statistic of integer ``samples`` against N_Z(0, s^2), bins with >= 5 expected."""
    n = samples.numel()
    half = int(6 * s) + 1
    support = range(-half, half + 1)
    expected = [n * p for p in dg_pmf(s, support)]
    counts = torch.bincount((samples.long() + half).clamp(0, 2 * half), minlength=2 * half + 1).tolist()
    stat, bins = 0.0, 0
    for c, e in zip(counts, expected):
        if e >= 5:
            stat += (c - e) ** 2 / e
            bins += 1
    return stat, bins - 1


def acceptance(t: float) -> float:
    """P(a candidate is accepted) in CKS Algorithm 3 with scale t: sum_y DLap_t(y) exp(-(|y|-t)^2/(2t^2))."""
    r = math.exp(-1 / t)
    return sum(
        0.5 * (1 - r) * r ** abs(y) * math.exp(-((abs(y) - t) ** 2) / (2 * t * t))
        for y in range(-int(60 * t) - 10, int(60 * t) + 11)
    )


def check_acceptance(stats: dict, t: float) -> None:
    theory, n = acceptance(t), stats["candidates"]
    assert abs(stats["accepted"] / n - theory) < 5 * math.sqrt(theory * (1 - theory) / n), (stats, theory)


def chi_square_bound(dof: int) -> float:
    """Wilson-Hilferty: far in the upper tail (z = 5) of chi^2 with ``dof`` degrees of freedom."""
    return dof * (1 - 2 / (9 * dof) + 5 * math.sqrt(2 / (9 * dof))) ** 3


# ----------------------------------------------------------------------------- both classes
@pytest.mark.parametrize("make", CLASSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_std_per_coordinate_and_zero_mean(make, dtype):
    # 32,000 draws of each of 4 coordinates (rows are independent draws) on top of a nonzero sum:
    # the std's standard error is 0.4%, so 2% is 5 standard errors
    sigma, sens = 1.5, 0.8
    base = torch.tensor([3.0, -7.25, 1e-3, 100.0], dtype=dtype)
    sums = {"w": base.expand(32_000, 4).contiguous()}
    noise = make(sigma).add(sums, sens, gen(1))["w"].double() - base.double()
    std = noise.std(dim=0)
    target = sigma * sens
    assert torch.all((std / target - 1).abs() < 0.02), std / target
    # the mean: each coordinate within 5 standard errors (target / sqrt(n) = 0.0067)
    assert torch.all(noise.mean(dim=0).abs() < 5 * target / math.sqrt(32_000)), noise.mean(dim=0)


@pytest.mark.parametrize("make", CLASSES)
def test_successive_calls_are_independent(make):
    sums = {"a": torch.zeros(20_000)}
    g = gen(2)
    first = make(1.0).add(sums, 1.0, g)["a"]
    second = make(1.0).add(sums, 1.0, g)["a"]
    assert not torch.equal(first, second)
    corr = torch.corrcoef(torch.stack([first, second]))[0, 1]
    assert abs(float(corr)) < 5 / math.sqrt(20_000)


@pytest.mark.parametrize("make", CLASSES)
@pytest.mark.parametrize("sigma, sens", [(0.0, 1.0), (2.0, 0.0), (0.0, math.inf)])
def test_no_noise_returns_exact_copies(make, sigma, sens):
    sums = {"a": torch.randn(3, 4, generator=gen(3)), "b": torch.randn(5, dtype=torch.float64, generator=gen(4))}
    out = make(sigma).add(sums, sens, gen(5))
    assert out.keys() == sums.keys()
    for key in sums:
        assert torch.equal(out[key], sums[key]) and out[key].dtype == sums[key].dtype
        assert out[key].data_ptr() != sums[key].data_ptr()  # a copy: the caller may modify it


@pytest.mark.parametrize("make", CLASSES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtype_shape_device_and_key_order_kept(make, dtype):
    sums = {"z": torch.ones(2, 3, dtype=dtype), 7: torch.zeros(4, dtype=torch.float32), "e": torch.empty(0, 5)}
    out = make(0.5).add(sums, 1.0, gen(6))
    assert list(out) == list(sums)
    for key, value in sums.items():
        assert out[key].dtype == value.dtype and out[key].shape == value.shape
        assert out[key].device == value.device
    assert not torch.equal(out["z"], sums["z"])
    # the inputs are not modified
    assert torch.equal(sums["z"], torch.ones(2, 3, dtype=dtype))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("make", CLASSES)
def test_cuda_sums_stay_on_cuda(make):
    sums = {"a": torch.zeros(10_000, device="cuda"), "b": torch.zeros(3, dtype=torch.float64)}
    out = make(1.0).add(sums, 1.0, torch.Generator(device="cuda").manual_seed(0))
    assert out["a"].device.type == "cuda" and out["b"].device.type == "cpu"
    assert abs(float(out["a"].std()) - 1.0) < 0.05
    out = SecureGaussianNoise(1.0).add(sums, 1.0)  # operating-system bits, sampled on CUDA
    assert abs(float(out["a"].std()) - 1.0) < 0.05


@pytest.mark.parametrize("make", CLASSES)
def test_reproducible_from_a_seeded_generator(make):
    sums = {"a": torch.randn(50, generator=gen(7)), "b": torch.randn(3, 3, generator=gen(8))}
    one = make(1.3).add(sums, 0.7, gen(9))
    two = make(1.3).add(sums, 0.7, gen(9))
    other = make(1.3).add(sums, 0.7, gen(10))
    assert all(torch.equal(one[k], two[k]) for k in sums)
    assert not torch.equal(one["a"], other["a"])


@pytest.mark.parametrize("cls", [GaussianNoise, SecureGaussianNoise])
@pytest.mark.parametrize(
    "value, error, match",
    [
        (-0.5, ValueError, r"noise_multiplier must be >= 0 and finite.*-0.5.*Fix"),
        (float("nan"), ValueError, r"noise_multiplier.*nan"),
        (math.inf, ValueError, r"noise_multiplier.*inf"),
        ("1.0", TypeError, r"noise_multiplier must be a real number.*'1.0'.*str"),
        (True, TypeError, r"noise_multiplier must be a real number"),
    ],
)
def test_bad_noise_multiplier(cls, value, error, match):
    with pytest.raises(error, match=match):
        cls(value)


@pytest.mark.parametrize("cls", [GaussianNoise, lambda s: SecureGaussianNoise(s, source="generator")])
@pytest.mark.parametrize(
    "sums, sensitivity, generator, error, match",
    [
        (torch.zeros(3), 1.0, gen(), TypeError, r"sums must be a mapping.*Tensor.*Fix"),
        ({"a": [1.0, 2.0]}, 1.0, gen(), TypeError, r"sums\['a'\] must be a torch.Tensor; got list"),
        ({"a": torch.zeros(3, dtype=torch.int64)}, 1.0, gen(), TypeError, r"sums\['a'\] has dtype torch.int64.*Fix"),
        ({"a": torch.zeros(3)}, -1.0, gen(), ValueError, r"sensitivity must be >= 0.*-1.0"),
        ({"a": torch.zeros(3)}, float("nan"), gen(), ValueError, r"sensitivity must be >= 0.*nan"),
        ({"a": torch.zeros(3)}, math.inf, gen(), ValueError, r"sensitivity is inf.*unbounded.*Fix"),
        ({"a": torch.zeros(3)}, "1", gen(), TypeError, r"sensitivity must be a real number.*'1'"),
        ({"a": torch.zeros(3)}, 1.0, 42, TypeError, r"generator must be a torch.Generator; got int.*Fix"),
        ({"a": torch.zeros(3)}, 1.0, None, TypeError, r"generator must be a torch.Generator; got NoneType"),
    ],
)
def test_bad_arguments_to_add(cls, sums, sensitivity, generator, error, match):
    with pytest.raises(error, match=match):
        cls(1.0).add(sums, sensitivity, generator)


def test_plain_one_draw_per_dtype_in_key_order():
    # the flat draw: a float32 key's noise does not depend on the float64 keys around it
    g1, g2 = gen(11), gen(11)
    mixed = GaussianNoise(1.0).add(
        {"a": torch.zeros(4), "x": torch.zeros(2, dtype=torch.float64), "b": torch.zeros(3)}, 1.0, g1
    )
    alone = GaussianNoise(1.0).add({"a": torch.zeros(4), "b": torch.zeros(3)}, 1.0, g2)
    assert torch.equal(mixed["a"], alone["a"]) and torch.equal(mixed["b"], alone["b"])


def test_plain_float_output_leaks_low_bits_but_secure_does_not():
    """Mironov's observation, and the defence: same noise, inputs that differ in low bits only.

    With the plain mechanism the released floats differ, so an observer who knows the noise
    generator's reachable values can tell the inputs apart. The secure mechanism's output is
    a function of round(x / grid) + Z, so it is bit-for-bit the same.
    """
    x = torch.linspace(-3, 3, 1001, dtype=torch.float64)
    x2 = x + 1e-12  # below the grid: round(x / grid) is unchanged
    plain = GaussianNoise(1.0)
    assert not torch.equal(plain.add({"a": x}, 1.0, gen(12))["a"], plain.add({"a": x2}, 1.0, gen(12))["a"])
    secure = SecureGaussianNoise(1.0, source="generator")
    grid = secure.plan(1.0, x.numel()).grid
    assert torch.equal(torch.round(x / grid), torch.round(x2 / grid))
    assert torch.equal(secure.add({"a": x}, 1.0, gen(12))["a"], secure.add({"a": x2}, 1.0, gen(12))["a"])


# ----------------------------------------------------------------------------- secure mechanism
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_secure_values_lie_on_the_grid(dtype):
    secure = SecureGaussianNoise(1.1, source="generator")
    sums = {"a": torch.randn(2_000, dtype=dtype, generator=gen(13)) * 10, "b": torch.randn(7, 7, dtype=dtype)}
    plan = secure.plan(0.9, 2_000 + 49)
    out = secure.add(sums, 0.9, gen(14))
    for key in sums:
        units = out[key].double() / plan.grid  # exact: the grid is a power of two
        assert torch.equal(units, torch.round(units))
    # and the integer noise is the released value minus round(x / grid), on the same grid
    z = out["a"].double() / plan.grid - torch.round(sums["a"].double() / plan.grid)
    assert torch.equal(z, torch.round(z)) and abs(float(z.std()) / plan.scale - 1) < 0.1


@pytest.mark.parametrize("sigma, sens, d", [(1.0, 1.0, 1), (1.0, 1.0, 10**7), (0.5, 3.0, 12345), (1e-3, 1.0, 100), (50.0, 0.01, 10**9)])
def test_secure_plan(sigma, sens, d):
    plan = SecureGaussianNoise(sigma).plan(sens, d)
    assert plan.grid == 2.0 ** round(math.log2(plan.grid))
    assert plan.grid * math.sqrt(d) <= 2**-11 * sens and 4 * plan.grid <= 2**-5 * sigma * sens
    root = math.isqrt(d) + (math.isqrt(d) ** 2 < d)
    delta = Fraction(sens) / Fraction(plan.grid) + root
    assert plan.lattice_sensitivity == float(delta)
    assert Fraction(plan.scale) ** 2 >= Fraction(sigma) ** 2 * delta**2 + 16  # s_2 >= 4
    assert math.frexp(plan.scale)[0] * 2**26 == int(math.frexp(plan.scale)[0] * 2**26)  # 26 bits
    assert sigma * sens <= plan.std <= 1.0015 * sigma * sens
    assert plan.coordinates == d


def test_secure_plan_refuses_what_the_sampler_cannot_do():
    with pytest.raises(ValueError, match=r"lattice std.*2\^40.*Fix"):
        SecureGaussianNoise(1e9).plan(1.0, 10**6)
    with pytest.raises(ValueError, match="no noise to plan"):
        SecureGaussianNoise(0.0).plan(1.0, 10)
    with pytest.raises(ValueError, match="coordinates must be an int >= 1"):
        SecureGaussianNoise(1.0).plan(1.0, 0)


def test_secure_refuses_non_finite_sums_and_bad_source():
    with pytest.raises(ValueError, match=r"sums\['b'\] contains NaN or infinite.*Fix"):
        SecureGaussianNoise(1.0).add({"a": torch.zeros(2), "b": torch.tensor([1.0, float("nan")])}, 1.0)
    with pytest.raises(ValueError, match=r"sums\['a'\] contains NaN or infinite"):
        SecureGaussianNoise(1.0).add({"a": torch.tensor([float("inf")])}, 1.0)
    with pytest.raises(ValueError, match=r"source must be 'os'.*'generator'.*got 'urandom'"):
        SecureGaussianNoise(1.0, source="urandom")


def test_secure_os_source_ignores_the_generator_and_is_not_reproducible():
    secure = SecureGaussianNoise(2.0)
    sums = {"a": torch.zeros(20_000)}
    one = secure.add(sums, 0.5, gen(15))["a"]
    two = secure.add(sums, 0.5, gen(15))["a"]
    assert not torch.equal(one, two)
    assert abs(float(one.std()) - 1.0) < 0.04 and abs(float(two.std()) - 1.0) < 0.04


def test_post_processing_lemma_numerically():
    """The proof's key step: N_Z(0, s1^2 + s2^2) equals, pointwise up to exp(+-kappa), the
    discrete Gaussian centred at a continuous N(0, s1^2) draw (a post-processing of the
    continuous Gaussian mechanism). float64 quadrature resolves ~1e-12; with s2 = 4, kappa is
    1e-137, and with s2 = 0.3 the gap is visible, so this check can fail."""
    torch.set_default_dtype(torch.float64)
    try:
        def gap(s1: float, s2: float) -> float:
            y = torch.arange(-12 * s1 - 8, 12 * s1 + 8, 0.02)
            w = torch.arange(-60, 61).unsqueeze(1)
            norm = torch.exp(-((w - y) ** 2) / (2 * s2**2)).sum(0)  # N_{s2}(y) on the y grid
            prior = torch.exp(-(y**2) / (2 * s1**2)) / (s1 * math.sqrt(2 * math.pi))
            z = torch.arange(-15, 16).unsqueeze(1)
            post = (prior * torch.exp(-((z - y) ** 2) / (2 * s2**2)) / norm).sum(1) * 0.02
            s = math.sqrt(s1**2 + s2**2)
            exact = torch.tensor(dg_pmf(s, range(-15, 16)))
            return float((exact / post - 1).abs().max())

        assert gap(3.0, 4.0) < 1e-10
        assert gap(3.0, 0.3) > 1e-3
    finally:
        torch.set_default_dtype(torch.float32)
    assert noise_module._KAPPA < 3e-137


# ----------------------------------------------------------------------------- the exact sampler
@pytest.mark.parametrize("scale", [4.0, 9.5, 600.0])
def test_discrete_gaussian_matches_its_pmf(scale):
    stats: dict = {}
    z = noise_module._discrete_gaussian(
        60_000, scale, torch.device("cpu"), noise_module._GeneratorBits(gen(16)), stats
    )
    assert torch.equal(z, torch.round(z))
    if scale < 100:
        stat, dof = chi_square(z, scale)
        assert stat < chi_square_bound(dof), (stat, dof)
    # variance of N_Z(0, s^2) is s^2 (to 1e-100 for s >= 4); 5 standard errors of 60k draws
    assert abs(float(z.var()) / scale**2 - 1) < 5 * math.sqrt(2 / 60_000)
    assert abs(float(z.mean())) < 5 * scale / math.sqrt(60_000)
    check_acceptance(stats, scale)  # every accept/reject decision has the right probability
    assert stats["refined"] > 0  # the second stage (53 more bits of V) ran


def test_exact_fallbacks_keep_the_distribution(monkeypatch):
    """Wide float64 margins send many candidates to interval refining in Python (both the
    magnitude and the acceptance); the samples must still be exactly N_Z(0, s^2)."""
    monkeypatch.setattr(noise_module, "_REL", 2.0**-7)
    monkeypatch.setattr(noise_module, "_P_SLACK", 2.0**-2)
    stats: dict = {}
    scale = 5.0
    z = noise_module._discrete_gaussian(
        8_000, scale, torch.device("cpu"), noise_module._GeneratorBits(gen(17)), stats
    )
    assert stats["exact"] > 100 and stats["exact_v"] > 1000, stats
    stat, dof = chi_square(z, scale)
    assert stat < chi_square_bound(dof), (stat, dof)
    check_acceptance(stats, scale)  # as without fallbacks: no decision is skewed


# An independent exact oracle (Decimal at 100 digits) for one candidate's decisions, given its bits.
def oracle_magnitude(t: float, uw: int) -> int | None:
    """floor(-t ln U) for U uniform on [uw, uw + 1) 2^-53, or None if that interval does not decide it."""
    if uw == 0:
        return None
    with localcontext() as ctx:
        ctx.prec = 100
        top = -Decimal(t) * (Decimal(uw) / Decimal(2) ** 53).ln()
        bottom = -Decimal(t) * (Decimal(uw + 1) / Decimal(2) ** 53).ln() if uw + 1 < 2**53 else Decimal(0)
        a, b = math.floor(top), math.floor(bottom)
    return a if a == b else None


def oracle_accept(t: float, m: int, v: int, nbits: int) -> bool | None:
    """V < exp(-(m - t)^2 / (2 t^2)) for V uniform on [v, v + 1) 2^-nbits, or None if undecided."""
    with localcontext() as ctx:
        ctx.prec = 100
        p = (-((Decimal(m) - Decimal(t)) ** 2) / (2 * Decimal(t) ** 2)).exp()
        lo, hi = Decimal(v) / Decimal(2) ** nbits, Decimal(v + 1) / Decimal(2) ** nbits
    return True if hi <= p else False if lo >= p else None


class RecordingBits:
    """A generator bit source that keeps every batch of words it hands out."""

    def __init__(self, seed: int) -> None:
        self.inner = noise_module._GeneratorBits(gen(seed))
        self.batches: list[torch.Tensor] = []

    def words(self, n: int, device: torch.device) -> torch.Tensor:
        self.batches.append(self.inner.words(n, device))
        return self.batches[-1]

    def word(self) -> int:
        return self.inner.word()


def pack(uw: int, negative: int, v: int) -> int:
    word = (uw << 11) | (negative << 10) | v
    return word - (1 << 64) if word >= 1 << 63 else word


def unpack(word: int) -> tuple[int, int, int]:
    word &= (1 << 64) - 1
    return word >> 11, (word >> 10) & 1, word & 1023


@pytest.mark.parametrize("t", [4.0, 37.25, 1234567.0])
def test_float64_fast_path_agrees_with_an_exact_oracle(t):
    """Every decision the float64 stages take, on random candidates and on candidates whose
    first 10 bits of V straddle p (so the 53-bit second stage decides), is the exact one."""
    g = gen(19)
    rows = [unpack(w) for w in torch.empty(400, dtype=torch.int64).random_(-(2**63), None, generator=g).tolist()]
    for uw, negative, _ in rows[:200]:  # put V's first 10 bits in the bucket that contains p
        m = oracle_magnitude(t, uw)
        p = math.exp(-((m - t) ** 2) / (2 * t * t))
        rows.append((uw, negative, min(1023, math.floor(p * 1024))))
    words = torch.tensor([pack(*r) for r in rows], dtype=torch.int64)
    bits = RecordingBits(20)
    value, accept = noise_module._candidates(words, t, bits, None)
    second_stage = []
    for i, (uw, negative, v) in enumerate(rows):
        m = oracle_magnitude(t, uw)
        assert m is not None  # random 53-bit U decides the magnitude but with probability ~t 2^-53
        assert value[i] == (-m if negative else m)
        if negative and m == 0:
            assert not accept[i]
            continue
        decided = oracle_accept(t, m, v, 10)
        if decided is not None:
            assert bool(accept[i]) == decided, (i, m, v)
        # the second stage gets the undecided rows, and those whose boundary (v or v + 1) is
        # within float64's margin of 1024 p (here: p = 1 when m = t)
        scaled = 1024 * math.exp(-((m - t) ** 2) / (2 * t * t))
        if decided is None or min(abs(scaled - v), abs(scaled - v - 1)) <= 1e-9 * scaled:
            second_stage.append((i, m, v))
    assert 130 < len(second_stage) <= 260
    (extra,) = bits.batches  # one batch of words, one per second-stage row, in row order
    assert extra.numel() == len(second_stage)
    for (i, m, v), w in zip(second_stage, extra.tolist()):
        w2 = (w & ((1 << 64) - 1)) >> 11
        decided = oracle_accept(t, m, (v << 53) | w2, 63)
        assert decided is not None and bool(accept[i]) == decided, (i, m, v, w2)


@pytest.mark.parametrize("path", ["magnitude", "acceptance"])
def test_python_exact_path_agrees_with_the_oracle(monkeypatch, path):
    """Margins so wide that every candidate's magnitude (or acceptance) is settled by interval
    refining in Python: the results are the oracle's, and so identical to the float64 path's."""
    t = 11.5
    g = gen(21)
    rows = [unpack(w) for w in torch.empty(200, dtype=torch.int64).random_(-(2**63), None, generator=g).tolist()]
    for uw, negative, _ in rows[:100]:  # V's first 10 bits undecided: the later bits decide
        p = math.exp(-((oracle_magnitude(t, uw) - t) ** 2) / (2 * t * t))
        rows.append((uw, negative, min(1023, math.floor(p * 1024))))
    words = torch.tensor([pack(*r) for r in rows], dtype=torch.int64)
    fast_value, fast_accept = noise_module._candidates(words, t, RecordingBits(22), None)
    if path == "magnitude":
        monkeypatch.setattr(noise_module, "_REL", 2.0**10)
    else:
        monkeypatch.setattr(noise_module, "_P_SLACK", 2.0**1000)  # no float64 decision on V at all
    stats: dict = {}
    bits = RecordingBits(22)
    value, accept = noise_module._candidates(words, t, bits, stats)
    assert stats["exact" if path == "magnitude" else "exact_v"] > 270, stats
    assert torch.equal(value, fast_value)
    if path == "magnitude":
        assert torch.equal(accept, fast_accept)  # V's bits are the same: same decisions
        return
    (extra,) = bits.batches  # every candidate but "-0" got 53 more bits of V, then Python
    live = [(i, r) for i, r in enumerate(rows) if not (r[1] and oracle_magnitude(t, r[0]) == 0)]
    assert extra.numel() == len(live)
    for (i, (uw, _, v)), w in zip(live, extra.tolist()):
        decided = oracle_accept(t, oracle_magnitude(t, uw), (v << 53) | ((w & ((1 << 64) - 1)) >> 11), 63)
        assert decided is not None and bool(accept[i]) == decided


def test_interval_refining_primitives():
    bits = noise_module._GeneratorBits(gen(18))
    # with no bits revealed, the refiners are samplers: Bernoulli(p) and Geometric(exp(-1/t))
    t, m = 7.0, 3
    p = math.exp(-((m - t) ** 2) / (2 * t * t))
    n = 700
    hits = sum(noise_module._exact_accept(t, m, 0, 0, bits) for _ in range(n))
    assert abs(hits / n - p) < 5 * math.sqrt(p * (1 - p) / n)
    draws = [noise_module._exact_magnitude(t, 0, 0, bits) for _ in range(n)]
    mean = 1 / math.expm1(1 / t)  # geometric with ratio exp(-1/t)
    assert abs(sum(draws) / n - mean) < 5 * math.sqrt(mean * (mean + 1) / n)
    # a revealed interval that already decides gives the float answer without drawing
    assert noise_module._exact_magnitude(2.0, 1 << 52, 53, bits) == math.floor(-2.0 * math.log(0.5))
    assert noise_module._exact_accept(t, m, 0, 10, bits) is True  # V < 2^-10 < p
    assert noise_module._exact_accept(t, m, 1023, 10, bits) is False  # V >= 1023/1024 > p


def test_float64_function_check_runs_and_caches():
    noise_module._CHECKED.discard("cpu")
    noise_module._check_float64_functions(torch.device("cpu"))
    assert "cpu" in noise_module._CHECKED


def test_secure_mode_doc_examples_run():
    page = pathlib.Path(__file__).resolve().parents[1] / "docs" / "secure_mode.md"
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)
    assert blocks
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/secure_mode.md block {i}", "exec"), {})


# ----------------------------------------------------------------------------- secure_generator
def test_secure_generator():
    a, b = secure_generator(), secure_generator("cpu")
    assert isinstance(a, torch.Generator) and a.device.type == "cpu"
    assert a.initial_seed() != b.initial_seed()  # 64 random bits each
    assert not torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


# ----------------------------------------------------------------------------- fill_normal
@pytest.fixture(params=["kernel", "torch"])
def source(request, monkeypatch):
    """Run the test with dpclip's noise kernel and again with torch's generator in pieces
    (the path of an install without a C compiler)."""
    import dpclip.noise as noise_module

    if request.param == "kernel" and noise_module._gauss is None:
        pytest.skip("dpclip was installed without the noise kernel")
    if request.param == "torch":
        monkeypatch.setattr(noise_module, "_gauss", None)
    return request.param


def test_the_kernel_is_built_where_a_c_compiler_is():
    """make test installs with the kernel on Linux with a C compiler: its absence there is a
    build failure, not a reason to skip the kernel's tests."""
    import shutil
    import sys

    from dpclip.noise import noise_kernel

    if not (sys.platform.startswith("linux") and shutil.which("cc")):
        pytest.skip("no C compiler on this platform")
    assert noise_kernel() in ("avx512", "avx2", "generic")


def test_fill_normal_small_draw_is_one_normal_call(source):
    from dpclip.noise import NOISE_CHUNK, fill_normal

    if source == "kernel":
        pytest.skip("the kernel draws every size with its own stream")
    n = NOISE_CHUNK
    got = fill_normal(torch.empty(n), 2.0, torch.Generator().manual_seed(5))
    want = torch.empty(n).normal_(0.0, 2.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(got, want)


@pytest.mark.parametrize("n", [(1 << 16) + 1, 5 * (1 << 16) + 123])
def test_fill_normal_large_draw_depends_on_the_generator_only(n, source):
    from dpclip.noise import fill_normal

    before = torch.get_num_threads()
    try:
        draws = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            draws.append(fill_normal(torch.empty(n, dtype=torch.float64), 1.0, torch.Generator().manual_seed(9)))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(draws[0], d) for d in draws[1:])
    other = fill_normal(torch.empty(n, dtype=torch.float64), 1.0, torch.Generator().manual_seed(10))
    assert not torch.equal(draws[0], other)


def test_fill_normal_large_draw_is_iid_standard_normal(source):
    from dpclip.noise import NOISE_CHUNK, fill_normal

    pieces = 8
    x = fill_normal(torch.empty(pieces * NOISE_CHUNK, dtype=torch.float64), 3.0, torch.Generator().manual_seed(1))
    n = x.numel()
    assert abs(x.mean().item()) < 5 * 3.0 / math.sqrt(n)
    assert abs(x.std().item() / 3.0 - 1.0) < 5 * math.sqrt(0.5 / n)
    # the pieces are independent: no two are the same stream, and neighbouring pieces are uncorrelated
    rows = x.view(pieces, NOISE_CHUNK)
    corr = torch.corrcoef(rows)
    off = corr[~torch.eye(pieces, dtype=torch.bool)]
    assert off.abs().max().item() < 5 / math.sqrt(NOISE_CHUNK)
    # Kolmogorov-Smirnov distance to N(0, 9) on the whole draw
    s = torch.sort(x / 3.0).values
    cdf = 0.5 * (1 + torch.erf(s / math.sqrt(2)))
    emp = torch.arange(1, n + 1, dtype=torch.float64) / n
    assert (cdf - emp).abs().max().item() < 1.63 / math.sqrt(n)  # the 1% critical value


def test_plain_add_in_place_equals_add(source):
    """GaussianNoise.add_ gives add's values bit for bit (same generator state, mixed dtypes,
    sizes above and below one parallel piece), in the caller's tensors; without noise it
    touches nothing."""
    shapes = [(300, 257), (7,), (5, 3)]
    dtypes = [torch.float32, torch.float64, torch.float32]

    def sums(seed):
        g = torch.Generator().manual_seed(seed)
        return {f"t{k}": torch.randn(s, generator=g, dtype=dt) for k, (s, dt) in enumerate(zip(shapes, dtypes))}

    noise = GaussianNoise(1.3)
    for seed in (0, 1):
        want = noise.add(sums(seed), 0.7, torch.Generator().manual_seed(10 + seed))
        got = sums(seed)
        ids = {k: id(v) for k, v in got.items()}
        out = noise.add_(got, 0.7, torch.Generator().manual_seed(10 + seed))
        assert out is got and {k: id(v) for k, v in got.items()} == ids
        for k in want:
            assert torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype
    untouched = sums(2)
    before = {k: v.clone() for k, v in untouched.items()}
    GaussianNoise(0.0).add_(untouched, 0.7, torch.Generator().manual_seed(0))
    assert all(torch.equal(untouched[k], before[k]) for k in before)


@pytest.mark.parametrize("sizes", [[5], [1 << 16], [(1 << 16) - 3, 7, 1], [100_000, 3, 70_000, 65_536], [0, 131_073]])
def test_add_normal_in_place_equals_the_flat_draw(sizes, source):
    """add_normal_ adds exactly fill_normal's numbers over the concatenation, on 1-3 threads,
    with tensors that straddle piece boundaries; a strided tensor takes the flat path."""
    from dpclip.noise import add_normal_, fill_normal

    base = [torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(n)) for n in sizes]
    flat = fill_normal(torch.empty(sum(sizes), dtype=torch.float64), 0.9, torch.Generator().manual_seed(3))
    want, offset = [], 0
    for b in base:
        want.append(b + flat[offset : offset + b.numel()])
        offset += b.numel()
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            got = [b.clone() for b in base]
            add_normal_(got, 0.9, torch.Generator().manual_seed(3))
            assert torch.get_num_threads() == threads
            assert all(torch.equal(g, w) for g, w in zip(got, want))
    finally:
        torch.set_num_threads(before)
    strided = [b.clone() for b in base]
    if sizes[0] > 1:  # a non-contiguous first tensor: the same values through the flat path
        wide = torch.zeros(sizes[0], 2, dtype=torch.float64)
        strided[0] = wide[:, 0]
        strided[0].copy_(base[0])
        add_normal_(strided, 0.9, torch.Generator().manual_seed(3))
        assert all(torch.equal(g, w) for g, w in zip(strided, want))
        assert torch.equal(wide[:, 0], want[0]) and not wide[:, 1].any()


# ----------------------------------------------------------------------------- drawn ahead (P14)
@pytest.mark.skipif(not noise_module.NoiseAhead.available(), reason="no noise kernel or no SCHED_IDLE here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_add_keyed_with_a_draw_ahead_equals_the_draw_in_place(dtype):
    """add_keyed_ gives the numbers GaussianNoise.add_ gives for the same generator state (one
    key drawn from it), whether they come from NoiseAhead's buffer or are computed in the add."""
    import time

    sums = {k: torch.randn(*shape, dtype=dtype, generator=gen(k)) for k, shape in enumerate([(300, 120), (9,), (50, 3, 40)])}
    expected = GaussianNoise(1.3).add_({k: v.clone() for k, v in sums.items()}, 0.5, gen(11))
    ahead = noise_module.NoiseAhead()
    for wait in (0.0, 0.2):
        key = noise_module.draw_key(gen(11))
        assert ahead.start(sum(v.numel() for v in sums.values()), dtype, 1.3 * 0.5, key)
        time.sleep(wait)
        got = {k: v.clone() for k, v in sums.items()}
        taken = noise_module.add_keyed_(list(got.values()), 1.3 * 0.5, key, ahead)
        assert 0 <= taken <= 36000 + 9 + 6000
        for k in sums:
            assert torch.equal(got[k], expected[k]), (wait, k)
    assert noise_module.kernel_takes(list(sums.values()), gen(0))


@pytest.mark.skipif(not noise_module.NoiseAhead.available(), reason="no noise kernel or no SCHED_IDLE here")
def test_noise_ahead_small_draws_and_bad_dtypes():
    ahead = noise_module.NoiseAhead()
    assert ahead.start(noise_module.KERNEL_SPLIT - 1, torch.float32, 1.0, 5) is False  # cheaper than a thread
    with pytest.raises(ValueError, match="float32 or torch.float64"):
        ahead.start(1 << 20, torch.float16, 1.0, 5)
    ahead.cancel()
