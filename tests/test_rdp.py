"""Tests for accountants.rdp: RDP of the Poisson-subsampled Gaussian and RDP -> (eps, delta).

References used as oracles:

* dp-accounting's ``RdpAccountant`` (ADD_OR_REMOVE_ONE, same orders) on a randomised grid;
* direct numerical integration (scipy.integrate.quad) of both Renyi divergences
  ``D_alpha(P||Q)`` and ``D_alpha(Q||P)``, P = (1-q) N(0,s^2) + q N(1,s^2), Q = N(0,s^2);
* mpmath high-precision quadrature where dp-accounting's fractional-order series is
  loose, truncated too early or does not converge.

Where we differ from dp-accounting 0.6.0 (all at fractional orders; integer orders agree
to ~1e-9 everywhere):

1. dp-accounting returns inf when its series has not converged after 1000 terms (e.g.
   q = 0.5, sigma = 1, alpha = 1.5); we return a finite valid upper bound
   (``test_finite_valid_where_dp_accounting_gives_up``).
2. dp-accounting stops its series once a term falls below e^-30 of the total; with a
   polynomially decaying tail and a tiny log A this leaves a truncation error up to
   ~1e-10 in log A (relative 3.5e-5 at q = 2e-4, sigma = 0.59, alpha = 1.1). We add a
   rigorous remainder bound, so we sit slightly above it
   (``test_dp_accounting_truncates_its_series``).
3. dp-accounting sums |C(alpha, k)| (an upper bound, up to 26x the true log A at small
   fractional orders). Our default reproduces that; ``fractional="exact"`` sums the
   signed series and equals the true value (``test_dp_accounting_series_is_loose``).
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import pytest
from scipy import integrate

from accountants import events
from accountants.rdp import (
    DEFAULT_ORDERS,
    compute_rdp,
    rdp_poisson_gaussian,
    rdp_to_delta,
    rdp_to_epsilon,
)

ORDERS = np.asarray(DEFAULT_ORDERS)
IS_INT = ORDERS == np.floor(ORDERS)


# --------------------------------------------------------------------------- helpers


def _dp():
    dp_accounting = pytest.importorskip("dp_accounting")
    from dp_accounting.rdp import rdp_privacy_accountant as ra

    logging.getLogger("absl").setLevel(logging.ERROR)  # its non-convergence warnings
    return dp_accounting, ra


def _dp_rdp_per_step(q: float, sigma: float) -> np.ndarray:
    dp_accounting, ra = _dp()
    acc = ra.RdpAccountant(list(DEFAULT_ORDERS), ra.NeighborRel.ADD_OR_REMOVE_ONE)
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), 1)
    return np.asarray(acc._rdp, dtype=float)


def _quad_log_a_minus_1(q: float, sigma: float, alpha: float, direction: str) -> float:
    """``log(A - 1)`` (direction "PQ": A = E_Q[(P/Q)^alpha]) or ``log(B - 1)`` ("QP":
    B = E_P[(Q/P)^alpha] = E_Q[(P/Q)^(1-alpha)]) by adaptive quadrature.

    Written as the integral of ``phi_s(z) expm1(t log(P/Q))`` with
    ``log(P/Q) = log1p(q expm1((2z-1)/(2 s^2)))`` so that a tiny divergence is not lost
    to cancellation against 1.
    """
    t = alpha if direction == "PQ" else 1.0 - alpha
    s2 = sigma * sigma

    def f(z: float) -> float:
        log_ratio = math.log1p(q * math.expm1((2 * z - 1) / (2 * s2)))
        return math.exp(-z * z / (2 * s2)) / (sigma * math.sqrt(2 * math.pi)) * math.expm1(t * log_ratio)

    lo, hi = -14 * sigma, alpha + 14 * sigma
    z0 = s2 * math.log((1 - q) / q) + 0.5
    pts = sorted({p for p in (0.0, 0.5, 1.0, alpha, z0) if lo < p < hi})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", integrate.IntegrationWarning)
        val, err = integrate.quad(f, lo, hi, points=pts, limit=500, epsabs=0.0, epsrel=1e-11)
    assert val > 0 and err < 1e-7 * val
    return math.log(val)


def _renyi_by_quadrature(q: float, sigma: float, alpha: float) -> tuple[float, float]:
    """``(D_alpha(P||Q), D_alpha(Q||P))`` by numerical integration."""
    return tuple(
        math.log1p(math.exp(_quad_log_a_minus_1(q, sigma, alpha, d))) / (alpha - 1) for d in ("PQ", "QP")
    )


def _mp_log_a(q: float, sigma: float, alpha: float, dps: int = 25) -> float:
    """``log A_alpha`` by mpmath quadrature (independent of any series)."""
    mp = pytest.importorskip("mpmath").mp
    with mp.workdps(dps):
        q_, s, a = mp.mpf(q), mp.mpf(sigma), mp.mpf(alpha)
        lq, l1q = mp.log(q_), mp.log(1 - q_)

        def f(z):
            log_mix = mp.log(mp.exp(l1q) + mp.exp(lq + (2 * z - 1) / (2 * s * s)))
            return mp.exp(a * log_mix - z * z / (2 * s * s)) / (s * mp.sqrt(2 * mp.pi))

        z0 = s * s * (l1q - lq) + mp.mpf(1) / 2
        pts = sorted({-mp.inf, -20 * s, z0 - 5 * s, z0, z0 + 5 * s, mp.mpf(0), mp.mpf(1) / 2, a, a + 20 * s, mp.inf})
        return float(mp.log(mp.quad(f, pts, maxdegree=10)))


def _frac_log_a(q, sigma, alpha, mode="dp_accounting"):
    return rdp_poisson_gaussian(sigma, q, [alpha], fractional=mode)[0] * (alpha - 1)


# --------------------------------------------------------------------------- orders


def test_default_orders():
    assert len(DEFAULT_ORDERS) == 156
    assert DEFAULT_ORDERS[:3] == (1.1, 1.2, 1.3) and DEFAULT_ORDERS[98] == 10.9
    assert DEFAULT_ORDERS[99:] == tuple(float(a) for a in [*range(11, 64), 128, 256, 512, 1024])


@pytest.mark.reference
def test_default_orders_are_dp_accountings():
    _, ra = _dp()
    assert tuple(float(a) for a in ra.DEFAULT_RDP_ORDERS) == DEFAULT_ORDERS


# --------------------------------------------------------------------------- dp-accounting grid


def _grid(n: int = 120, seed: int = 20240611):
    rng = np.random.default_rng(seed)
    pts = []
    for i in range(n):
        q = float(10 ** rng.uniform(-4, 0))
        if i % 12 == 0:
            q = 1.0
        elif i % 12 == 6:
            q = float(1 - 10 ** rng.uniform(-6, -1))  # 0.9 .. 0.999999
        sigma = float(rng.uniform(0.5, 10))
        steps = int(10 ** rng.uniform(0, 5))
        delta = float(10 ** rng.uniform(-12, -3))
        pts.append((q, sigma, steps, delta))
    return pts


@pytest.fixture(scope="module")
def dp_grid():
    """Our and dp-accounting's per-step RDP vectors on the grid (computed once)."""
    _dp()
    rows = []
    for q, sigma, steps, delta in _grid():
        rows.append((q, sigma, steps, delta, rdp_poisson_gaussian(sigma, q), _dp_rdp_per_step(q, sigma)))
    return rows


@pytest.mark.reference
def test_rdp_matches_dp_accounting(dp_grid):
    worst_int = worst_frac = 0.0
    n_dp_inf = 0
    for q, sigma, _, _, ours, ref in dp_grid:
        assert np.all(np.isfinite(ours)), (q, sigma)
        fin = np.isfinite(ref)
        n_dp_inf += int((~fin).sum())
        assert fin[IS_INT].all(), "dp-accounting's integer series always converges"
        rel = np.abs(ours - ref) / np.where(fin, ref, 1.0)
        worst_int = max(worst_int, rel[IS_INT].max())
        np.testing.assert_allclose(ours[IS_INT], ref[IS_INT], rtol=1e-6, atol=0)
        # fractional orders: 1e-6 relative, plus dp-accounting's own truncation error
        # (it stops at terms < e^-30 of the total: up to ~1e-10 in log A; see module doc)
        frac = fin & ~IS_INT
        a = ORDERS[frac]
        allowed = 1e-6 * ref[frac] + 1e-10 / (a - 1)
        assert np.all(np.abs(ours[frac] - ref[frac]) <= allowed), (q, sigma)
        # and we are never below dp-accounting's value of the same series
        # (1e-7: dp-accounting's own rounding at RDP ~ 1e-11, e.g. 1.4e-8 at q=2e-4, sigma=9.6)
        assert np.all(ours[frac] >= ref[frac] * (1 - 1e-7)), (q, sigma)
        worst_frac = max(worst_frac, np.max(rel[frac], initial=0.0))
    print(f"\nmax rel diff vs dp-accounting: integer orders {worst_int:.2e}, "
          f"fractional orders {worst_frac:.2e}; dp-accounting inf entries: {n_dp_inf}")
    assert worst_int < 1e-8


@pytest.mark.reference
def test_epsilon_matches_dp_accounting(dp_grid):
    """Epsilon after ``steps`` steps, against dp-accounting's conversion of its own RDP.

    (dp-accounting's ``RdpAccountant.compose(event, steps)`` is ``steps`` times the
    per-step vector of the fixture, and ``get_epsilon_and_optimal_order`` is
    ``compute_epsilon``; composition through the accountant is tested below.)
    """
    _, ra = _dp()
    worst = 0.0
    for q, sigma, steps, delta, ours, ref in dp_grid:
        ref_eps, ref_order = ra.compute_epsilon(DEFAULT_ORDERS, steps * ref, delta)
        eps, order = rdp_to_epsilon(ORDERS, steps * ours, delta)
        assert eps <= ref_eps * (1 + 1e-6) + 1e-12
        fin = np.isfinite(ref)
        # on the orders where dp-accounting has a value, the same epsilon
        eps_fin, _ = rdp_to_epsilon(ORDERS[fin], steps * ours[fin], delta)
        np.testing.assert_allclose(eps_fin, ref_eps, rtol=1e-6, atol=1e-12)
        if fin.all():
            np.testing.assert_allclose(eps, ref_eps, rtol=1e-6, atol=1e-12)
            assert order == ref_order or abs(eps - ref_eps) <= 1e-9 * ref_eps
        worst = max(worst, abs(eps_fin - ref_eps) / ref_eps if ref_eps else abs(eps_fin))
    print(f"\nmax rel epsilon diff vs dp-accounting: {worst:.2e}")


@pytest.mark.reference
def test_compute_rdp_matches_dp_accounting_composition():
    dp_accounting, ra = _dp()
    segs = [(1.1, 0.01, 1000), (0.8, 0.02, 300), (2.0, 1.0, 5), (1.1, 0.01, 500)]
    acc = ra.RdpAccountant(list(DEFAULT_ORDERS), ra.NeighborRel.ADD_OR_REMOVE_ONE)
    ev = []
    for sigma, q, n in segs:
        inner = dp_accounting.GaussianDpEvent(sigma)
        acc.compose(inner if q == 1.0 else dp_accounting.PoissonSampledDpEvent(q, inner), n)
        ev.append(events.dpsgd_event(sigma, q, n))
    ours = compute_rdp(events.ComposedEvent(ev))
    np.testing.assert_allclose(ours, acc._rdp, rtol=1e-6)
    for delta in (1e-5, 1e-9):
        np.testing.assert_allclose(
            rdp_to_epsilon(ORDERS, ours, delta)[0], acc.get_epsilon(delta), rtol=1e-6
        )


@pytest.mark.reference
def test_conversions_match_dp_accounting(dp_grid):
    _, ra = _dp()
    for q, sigma, steps, delta, _, ref in dp_grid[:40]:
        rdp = steps * ref
        e_ref, o_ref = ra.compute_epsilon(ORDERS, rdp, delta)
        e, o = rdp_to_epsilon(ORDERS, rdp, delta)
        np.testing.assert_allclose(e, e_ref, rtol=1e-12, atol=1e-15)
        for eps in (0.1, 1.0, 8.0):
            d_ref, _ = ra.compute_delta(ORDERS, rdp, eps)
            d, _ = rdp_to_delta(ORDERS, rdp, eps)
            np.testing.assert_allclose(d, d_ref, rtol=1e-9, atol=1e-300)


# --------------------------------------------------------------------------- where we and dp differ


@pytest.mark.reference
def test_finite_valid_where_dp_accounting_gives_up():
    """dp-accounting returns inf after 1000 terms; we return a finite valid bound."""
    _, ra = _dp()
    for q, sigma, alpha in [(0.5, 1.0, 1.5), (0.2689, 0.819, 1.2), (0.45, 1.12, 1.2)]:
        assert ra._compute_log_a_frac(q, sigma, alpha) == np.inf
        truth = _mp_log_a(q, sigma, alpha)
        ours = _frac_log_a(q, sigma, alpha)
        exact = _frac_log_a(q, sigma, alpha, "exact")
        assert np.isfinite(ours)
        assert ours >= truth * (1 - 1e-9)
        np.testing.assert_allclose(exact, truth, rtol=1e-7)


@pytest.mark.reference
def test_dp_accounting_truncates_its_series():
    """At q=2e-4, sigma=0.59, alpha=1.1 dp-accounting stops its |C|-series too early.

    An mpmath partial sum of the same series (positive terms, so a lower bound on its
    limit) already exceeds dp-accounting's value by 3.5e-5 relative; ours is above both.
    """
    mp = pytest.importorskip("mpmath").mp
    _, ra = _dp()
    q, sigma, alpha = 2.0048234902216705e-4, 0.5892085114012322, 1.1
    with mp.workdps(20):
        Q, S, A = mp.mpf(q), mp.mpf(sigma), mp.mpf(alpha)
        z0 = S * S * mp.log((1 - Q) / Q) + mp.mpf(1) / 2
        partial = mp.mpf(0)
        for k in range(400):
            j = A - k
            i0 = Q**k * (1 - Q) ** j * mp.exp((k * k - k) / (2 * S * S)) * mp.ncdf((z0 - k) / S)
            i1 = Q**j * (1 - Q) ** k * mp.exp((j * j - j) / (2 * S * S)) * mp.ncdf((j - z0) / S)
            partial += abs(mp.binomial(A, k)) * (i0 + i1)
        partial = float(mp.log(partial))
    dp_value = ra._compute_log_a_frac(q, sigma, alpha)
    ours = _frac_log_a(q, sigma, alpha)
    assert partial > dp_value * (1 + 3e-5)
    assert ours >= partial
    np.testing.assert_allclose(ours, partial, rtol=1e-6)  # 400 terms nearly reach the limit


@pytest.mark.reference
def test_dp_accounting_series_is_loose():
    """dp-accounting sums |C(alpha,k)|: a valid but loose bound at small fractional orders.

    Our default reproduces it; ``fractional="exact"`` is the true value (mpmath).
    """
    _, ra = _dp()
    for q, sigma, alpha, factor in [(0.358, 6.5, 1.1, 20.0), (0.1, 10.0, 1.1, 8.0), (0.195, 2.15, 1.4, 1.8)]:
        truth = _mp_log_a(q, sigma, alpha)
        dp_value = ra._compute_log_a_frac(q, sigma, alpha)
        assert dp_value > factor * truth
        np.testing.assert_allclose(_frac_log_a(q, sigma, alpha), dp_value, rtol=1e-6)
        np.testing.assert_allclose(_frac_log_a(q, sigma, alpha, "exact"), truth, rtol=1e-7)


def test_exact_mode_against_mpmath():
    """The signed series equals the true log A (mpmath quadrature), in easy and hard regimes."""
    pytest.importorskip("mpmath")
    for q, sigma, alpha in [
        (1e-4, 10.0, 1.1),  # tiny RDP (log A ~ 5.5e-12)
        (0.01, 1.0, 2.5),
        (0.5, 10.0, 1.1),  # slow polynomial tail: convexity fallback may be in play
        (0.2, 0.5, 7.7),  # small sigma
        (0.99, 0.5, 3.3),  # large q
        (0.999999, 2.0, 10.9),
    ]:
        truth = _mp_log_a(q, sigma, alpha)
        exact = _frac_log_a(q, sigma, alpha, "exact")
        default = _frac_log_a(q, sigma, alpha)
        np.testing.assert_allclose(exact, truth, rtol=1e-7, err_msg=str((q, sigma, alpha)))
        assert exact >= truth * (1 - 1e-7)
        assert default >= truth * (1 - 1e-7)


# --------------------------------------------------------------------------- direct integration


QUAD_POINTS = [
    (0.01, 1.0, 2.0),
    (0.01, 1.0, 2.5),
    (0.05, 0.8, 6.3),
    (0.2, 2.0, 1.5),
    (0.5, 1.0, 1.5),
    (0.9, 1.5, 3.7),
    (0.001, 0.6, 12.0),
    (0.3, 4.0, 1.1),
    (0.99, 3.0, 20.0),
    (1e-4, 5.0, 32.0),
]


@pytest.mark.parametrize("q,sigma,alpha", QUAD_POINTS)
def test_rdp_against_numerical_integration(q, sigma, alpha):
    """RDP >= both Renyi divergences; it equals D(P||Q) (exact mode / integer orders)."""
    d_pq, d_qp = _renyi_by_quadrature(q, sigma, alpha)
    assert d_pq >= d_qp * (1 - 1e-9)  # MTZ: the P||Q direction is the larger one
    default = rdp_poisson_gaussian(sigma, q, [alpha])[0]
    exact = rdp_poisson_gaussian(sigma, q, [alpha], fractional="exact")[0]
    for value in (default, exact):
        assert value >= d_pq * (1 - 1e-7)
        assert value >= d_qp * (1 - 1e-7)
    np.testing.assert_allclose(exact, d_pq, rtol=1e-6)
    if float(alpha).is_integer():
        np.testing.assert_allclose(default, d_pq, rtol=1e-6)


# --------------------------------------------------------------------------- special cases


@pytest.mark.parametrize("sigma", [0.3, 0.7, 1.0, 4.0, 10.0])
def test_q_one_is_the_gaussian_mechanism(sigma):
    for mode in ("dp_accounting", "exact"):
        np.testing.assert_allclose(
            rdp_poisson_gaussian(sigma, 1.0, fractional=mode), ORDERS / (2 * sigma * sigma), rtol=1e-15, atol=0
        )
    np.testing.assert_allclose(compute_rdp(events.GaussianEvent(sigma)), ORDERS / (2 * sigma * sigma), rtol=1e-15)


@pytest.mark.parametrize("q", [0.9, 0.99, 0.999, 0.999999])
@pytest.mark.parametrize("sigma", [0.3, 1.0, 10.0])
def test_large_sample_rate_is_stable(q, sigma):
    gauss = ORDERS / (2 * sigma * sigma)
    for mode in ("dp_accounting", "exact"):
        r = rdp_poisson_gaussian(sigma, q, fractional=mode)
        assert np.all(np.isfinite(r)) and np.all(r > 0)
        assert np.all(r <= gauss * (1 + 1e-9))  # subsampling never hurts
    exact = rdp_poisson_gaussian(sigma, q, fractional="exact")
    assert np.all(np.diff(exact) >= -1e-9 * exact[1:])  # Renyi divergence grows with the order
    if q == 0.999999:
        np.testing.assert_allclose(exact, gauss, rtol=1e-3)


@pytest.mark.parametrize("q", [1e-3, 0.1, 0.5, 0.99])
def test_large_orders_small_sigma(q):
    orders = [1.5, 2.0, 63.0, 128.0, 500.5, 1024.0]
    r = rdp_poisson_gaussian(0.3, q, orders)
    assert np.all(np.isfinite(r)) and np.all(r > 0)
    assert np.all(r <= np.asarray(orders) / (2 * 0.09) * (1 + 1e-9))


@pytest.mark.reference
def test_large_orders_small_sigma_match_dp_accounting():
    _, ra = _dp()
    for q in (1e-3, 0.1, 0.5, 0.99):
        ours = rdp_poisson_gaussian(0.3, q, [128, 256, 512, 1024])
        ref = ra._compute_rdp_poisson_subsampled_gaussian(q, 0.3, [128, 256, 512, 1024])
        np.testing.assert_allclose(ours, ref, rtol=1e-9)


def test_sigma_zero_is_infinite():
    assert np.all(rdp_poisson_gaussian(0.0, 0.01) == np.inf)
    assert np.all(compute_rdp(events.dpsgd_event(0.0, 0.01, 10)) == np.inf)
    eps, order = rdp_to_epsilon(ORDERS, compute_rdp(events.dpsgd_event(0.0, 0.01, 10)), 1e-5)
    assert eps == math.inf and math.isnan(order)


def test_no_sampling_or_infinite_noise_is_free():
    assert np.all(rdp_poisson_gaussian(1.0, 0.0) == 0)
    assert np.all(rdp_poisson_gaussian(math.inf, 0.5) == 0)


def test_infinite_order():
    r = rdp_poisson_gaussian(1.0, 0.1, [2.0, math.inf])
    assert np.isfinite(r[0]) and r[1] == np.inf


def test_empty_event_is_zero():
    for ev in (events.ComposedEvent(()), events.dpsgd_event(1.0, 0.01, 0)):
        r = compute_rdp(ev)
        assert r.shape == (len(DEFAULT_ORDERS),) and np.all(r == 0)
        eps, _ = rdp_to_epsilon(ORDERS, r, 1e-5)
        assert eps == 0.0
        delta, _ = rdp_to_delta(ORDERS, r, 0.0)
        assert delta == 0.0


def test_compute_rdp_sums_segments():
    a = events.dpsgd_event(1.1, 0.01, 100)
    b = events.dpsgd_event(2.0, 0.05, 30)
    both = compute_rdp(events.ComposedEvent((a, b, a)))
    np.testing.assert_allclose(both, 200 * rdp_poisson_gaussian(1.1, 0.01) + 30 * rdp_poisson_gaussian(2.0, 0.05), rtol=1e-14)
    nested = events.SelfComposedEvent(events.ComposedEvent((a, b)), 3)
    np.testing.assert_allclose(compute_rdp(nested), 3 * compute_rdp(events.ComposedEvent((a, b))), rtol=1e-14)
    custom = [2.5, 8.0]
    np.testing.assert_allclose(compute_rdp(a, custom), 100 * rdp_poisson_gaussian(1.1, 0.01, custom), rtol=1e-14)


def test_results_are_fresh_arrays():
    r = rdp_poisson_gaussian(1.0, 0.01)
    r[:] = -1
    assert np.all(rdp_poisson_gaussian(1.0, 0.01) > 0)


def test_tiny_rdp_keeps_relative_precision():
    # q = 1e-6, sigma = 100: RDP ~ 5e-17. Integer orders in closed form:
    # A_2 - 1 = q^2 expm1(1/s^2),  A_3 - 1 = 3 q^2 (1-q) expm1(1/s^2) + q^3 expm1(3/s^2)
    q, sigma = 1e-6, 100.0
    r = rdp_poisson_gaussian(sigma, q, [2.0, 3.0, 2.5])
    e1, e3 = math.expm1(1 / sigma**2), math.expm1(3 / sigma**2)
    np.testing.assert_allclose(r[0], math.log1p(q * q * e1), rtol=1e-12)
    np.testing.assert_allclose(r[1], math.log1p(3 * q * q * (1 - q) * e1 + q**3 * e3) / 2, rtol=1e-12)
    # small-q expansion log A ~ C(alpha, 2) q^2 expm1(1/s^2)
    np.testing.assert_allclose(r[2], 2.5 / 2 * q * q * e1, rtol=1e-5)


# --------------------------------------------------------------------------- conversions


def test_epsilon_never_worse_than_classic_bound():
    r = 1000 * rdp_poisson_gaussian(1.1, 0.01)
    for delta in (1e-3, 1e-5, 1e-12):
        eps, order = rdp_to_epsilon(ORDERS, r, delta)
        classic = np.min(r - math.log(delta) / (ORDERS - 1))
        assert 0 < eps < classic
        assert order in DEFAULT_ORDERS
        # the improved bound (Canonne-Kamath-Steinke / Balle et al.) at that order
        i = DEFAULT_ORDERS.index(order)
        a = ORDERS[i]
        np.testing.assert_allclose(eps, r[i] + math.log1p(-1 / a) - (math.log(delta) + math.log(a)) / (a - 1), rtol=1e-12)


def test_epsilon_delta_round_trip():
    r = 5000 * rdp_poisson_gaussian(1.0, 0.004)
    for delta in (1e-4, 1e-6, 1e-10):
        eps, _ = rdp_to_epsilon(ORDERS, r, delta)
        d, _ = rdp_to_delta(ORDERS, r, eps)
        assert d <= delta * (1 + 1e-9)
        d_less, _ = rdp_to_delta(ORDERS, r, eps * 0.99)
        assert d_less > delta


def test_known_value():
    # Abadi et al.'s MNIST setting: sigma 1.1, q = 256/60000, 60 epochs; dp-accounting gives 2.5966
    q = 256 / 60000
    eps, _ = rdp_to_epsilon(ORDERS, compute_rdp(events.dpsgd_event(1.1, q, int(60 / q))), 1e-5)
    np.testing.assert_allclose(eps, 2.5965558698, rtol=1e-8)


def test_no_finite_bound():
    r = np.full(len(ORDERS), np.inf)
    eps, order = rdp_to_epsilon(ORDERS, r, 1e-5)
    assert eps == math.inf and math.isnan(order)
    delta, order = rdp_to_delta(ORDERS, r, 1.0)
    assert delta == 1.0 and math.isnan(order)
    # a single finite order is enough
    r[5] = 1.0
    assert np.isfinite(rdp_to_epsilon(ORDERS, r, 1e-5)[0])


def test_kl_bound_gives_zero_epsilon():
    r = np.full(len(ORDERS), 1e-14)  # delta^2 > 1 - exp(-r): (0, delta)-DP
    assert rdp_to_epsilon(ORDERS, r, 1e-5)[0] == 0.0


# --------------------------------------------------------------------------- input errors


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 2.0, math.nan])
def test_bad_delta(delta):
    with pytest.raises(ValueError):
        rdp_to_epsilon(ORDERS, np.ones(len(ORDERS)), delta)


@pytest.mark.parametrize("epsilon", [-1e-9, -1.0, math.nan])
def test_bad_epsilon(epsilon):
    with pytest.raises(ValueError):
        rdp_to_delta(ORDERS, np.ones(len(ORDERS)), epsilon)


def test_bad_conversion_inputs():
    with pytest.raises(ValueError, match="same length"):
        rdp_to_epsilon([2.0, 3.0], [1.0], 1e-5)
    with pytest.raises(ValueError, match="same length"):
        rdp_to_delta([2.0, 3.0], [1.0, 2.0, 3.0], 1.0)
    for bad_orders in ([1.0, 2.0], [0.5, 2.0], [math.nan, 2.0]):
        with pytest.raises(ValueError, match="> 1"):
            rdp_to_epsilon(bad_orders, [1.0, 1.0], 1e-5)
        with pytest.raises(ValueError, match="> 1"):
            rdp_to_delta(bad_orders, [1.0, 1.0], 1.0)
    with pytest.raises(ValueError, match=">= 0"):
        rdp_to_epsilon([2.0, 3.0], [1.0, -0.5], 1e-5)
    with pytest.raises(ValueError, match="nan"):
        rdp_to_epsilon([2.0, 3.0], [1.0, math.nan], 1e-5)


def test_bad_rdp_inputs():
    with pytest.raises(ValueError, match="noise_multiplier"):
        rdp_poisson_gaussian(-1.0, 0.1)
    for q in (-0.1, 1.5):
        with pytest.raises(ValueError, match="sample_rate"):
            rdp_poisson_gaussian(1.0, q)
    with pytest.raises(ValueError):
        rdp_poisson_gaussian(math.nan, 0.1)
    with pytest.raises(TypeError):
        rdp_poisson_gaussian("1.0", 0.1)
    for orders in ([1.0], [0.9, 2.0], [], [[2.0, 3.0]]):
        with pytest.raises(ValueError):
            rdp_poisson_gaussian(1.0, 0.1, orders)
    with pytest.raises(ValueError, match="fractional"):
        rdp_poisson_gaussian(1.0, 0.1, fractional="fast")
    with pytest.raises(TypeError):
        compute_rdp((1.0, 0.1, 10))
    with pytest.raises(ValueError):
        compute_rdp(events.dpsgd_event(1.0, 0.1, 10), [1.0])


# --------------------------------------------------------------------------- properties


try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # a dev extra: only the property tests need it

    def test_properties_need_hypothesis():
        pytest.skip("hypothesis is not installed")

else:
    _q = st.floats(1e-4, 1.0)
    _sigma = st.floats(0.3, 20.0)
    _ratio = st.floats(1.0, 3.0)

    @settings(max_examples=30, deadline=None)
    @given(q=_q, sigma=_sigma, steps=st.integers(0, 10**5), extra=st.integers(1, 10**4), delta=st.floats(1e-12, 1e-3))
    def test_monotone_in_steps(q, sigma, steps, extra, delta):
        r1 = compute_rdp(events.dpsgd_event(sigma, q, steps))
        r2 = compute_rdp(events.dpsgd_event(sigma, q, steps + extra))
        np.testing.assert_allclose(r2 - r1, extra * rdp_poisson_gaussian(sigma, q), rtol=1e-9, atol=0)
        assert rdp_to_epsilon(ORDERS, r1, delta)[0] <= rdp_to_epsilon(ORDERS, r2, delta)[0]

    @settings(max_examples=40, deadline=None)
    @given(q=_q, sigma=_sigma, ratio=_ratio)
    def test_monotone_in_sample_rate(q, sigma, ratio):
        q2 = min(1.0, q * ratio)
        for mode, mask in (("exact", slice(None)), ("dp_accounting", IS_INT)):
            r1 = rdp_poisson_gaussian(sigma, q, fractional=mode)[mask]
            r2 = rdp_poisson_gaussian(sigma, q2, fractional=mode)[mask]
            assert np.all(r1 <= r2 * (1 + 1e-9)), mode

    @settings(max_examples=40, deadline=None)
    @given(q=_q, sigma=_sigma, ratio=_ratio)
    def test_monotone_in_inverse_sigma(q, sigma, ratio):
        for mode, mask in (("exact", slice(None)), ("dp_accounting", IS_INT)):
            r1 = rdp_poisson_gaussian(sigma * ratio, q, fractional=mode)[mask]
            r2 = rdp_poisson_gaussian(sigma, q, fractional=mode)[mask]
            assert np.all(r1 <= r2 * (1 + 1e-9)), mode

    @settings(max_examples=40, deadline=None)
    @given(q=_q, sigma=_sigma)
    def test_exact_rdp_nondecreasing_in_order(q, sigma):
        r = rdp_poisson_gaussian(sigma, q, fractional="exact")
        assert np.all(np.diff(r) >= -1e-9 * r[1:])
        assert np.all(r <= ORDERS / (2 * sigma * sigma) * (1 + 1e-9))
        assert np.all(rdp_poisson_gaussian(sigma, q) >= r * (1 - 1e-9))  # default >= exact
