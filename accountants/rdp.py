r"""Renyi differential privacy (RDP) of the Poisson-subsampled Gaussian mechanism.

Setting (add/remove-one neighbours, L2 sensitivity 1, noise std ``sigma``, Poisson
sample rate ``q``). After a change of variables the two output distributions are

    Q = N(0, sigma^2),        P = (1 - q) N(0, sigma^2) + q N(1, sigma^2),

and the RDP of order ``alpha > 1`` is ``max(D_alpha(P||Q), D_alpha(Q||P))``. Mironov,
Talwar and Zhang, "Renyi Differential Privacy of the Sampled Gaussian Mechanism"
(2019, arXiv:1908.10530; "MTZ" below) show that the first one is the larger, so

    RDP(alpha) = log(A_alpha) / (alpha - 1),
    A_alpha    = E_{z ~ Q}[ (P(z)/Q(z))^alpha ] = E_{z ~ Q}[ ((1 - q) + q L(z))^alpha ],
    L(z)       = exp((2 z - 1) / (2 sigma^2)).

The test-suite checks ``A_alpha >= B_alpha = E_P[(Q/P)^alpha]`` by quadrature.

Integer orders (MTZ Sec. 3): the binomial expansion is a finite sum of positive terms,

    A_alpha = sum_{k=0}^{alpha} C(alpha, k) (1-q)^(alpha-k) q^k exp((k^2 - k) / (2 sigma^2)).

We evaluate ``A_alpha - 1`` instead (the k = 0, 1 terms cancel against ``1 = sum_k
C(alpha,k)(1-q)^(alpha-k) q^k``):

    A_alpha - 1 = sum_{k=2}^{alpha} C(alpha,k) (1-q)^(alpha-k) q^k expm1((k^2-k)/(2 sigma^2)),

again all terms positive, summed in log space, then ``log A = log1p(A - 1)``. This keeps
full relative precision even when the RDP is tiny (q = 1e-4, sigma = 10: RDP ~ 1e-11),
where summing ``A`` itself would lose it to cancellation.

Fractional orders (MTZ Sec. 3.3): split the integral at ``z0 = sigma^2 log((1-q)/q) + 1/2``
(where ``q L(z0) = 1 - q``) and expand ``(1 + x)^alpha`` binomially on each side, with
``x = q L / (1-q) < 1`` below ``z0`` and ``x = (1-q) / (q L) < 1`` above it:

    A_alpha = sum_{k>=0} C(alpha, k) (I0_k + I1_k),
    I0_k = q^k (1-q)^(alpha-k) exp((k^2 - k) / (2 sigma^2)) Phi((z0 - k) / sigma),
    I1_k = q^(alpha-k) (1-q)^k exp((j^2 - j) / (2 sigma^2)) Phi((j - z0) / sigma),   j = alpha - k.

``C(alpha, k)`` is positive for ``k <= floor(alpha) + 1`` and alternates in sign after
that. Two summations are offered (keyword ``fractional``):

* ``"dp_accounting"`` (default): ``sum_k |C(alpha, k)| (I0_k + I1_k)``, the quantity that
  dp-accounting 0.6.0's ``_compute_log_a_frac`` evaluates (its ``_log_comb`` is
  ``log|C|``). Every term is positive, so it is an *upper bound* on ``A_alpha``; it is
  equal to ``A_alpha`` to many digits at the orders that usually matter, but at small
  fractional orders it can be far above it (q = 0.1, sigma = 10, alpha = 1.1: 8.5x the
  true log A; q = 0.36, sigma = 6.5: 26x), so it is not monotone in alpha there. It is the
  default so that results match dp-accounting's ``RdpAccountant`` to 1e-6.
* ``"exact"``: ``sum_k C(alpha, k) (I0_k + I1_k)`` with the signs, which converges to
  ``A_alpha`` itself (tighter, never below the truth; see the remainder bound below).

Both series converge only polynomially in general. With ``h(u) = exp(u^2/2) Phi(-u)``
(decreasing in ``u``; ``h(u) = erfcx(u / sqrt 2) / 2``) the term magnitudes are

    |C(alpha,k)| (I0_k + I1_k) = |C(alpha,k)| (1-q)^alpha exp(-z0^2 / (2 sigma^2))
                                 * [h((k - z0)/sigma) + h((k - alpha + z0)/sigma)],

which are non-increasing in ``k`` for ``k >= floor(alpha) + 2``. This gives rigorous
remainders after ``K >= floor(alpha) + 2`` terms:

* absolute series: ``sum_{k>=K} |C(alpha,k)| = |C(alpha-1, K-1)|`` (partial sums of
  ``(1 - 1)^alpha = 0``), so the tail is at most
  ``|C(alpha-1,K-1)| (1-q)^alpha exp(-z0^2/(2 sigma^2)) [h((K-z0)/sigma) + h((K-alpha+z0)/sigma)]``;
* signed series: alternating with non-increasing magnitudes, so the tail has the sign of
  term ``K`` and is at most its magnitude.

We sum in chunks (vectorised over orders and terms), always *add* the remainder bound
(so the value is never below the series' limit), and stop an order once the remainder
moves its RDP by less than ``1e-9`` relative. An order still short of that after
``_MAX_TERMS`` terms (e.g. q ~ 0.5, alpha ~ 1.1, where dp-accounting gives up after 1000
terms and returns inf) keeps ``partial sum + remainder bound`` if the remainder is below
``1e-8`` relative, and otherwise gets ``min(partial sum + remainder bound, convexity
bound)``: ``alpha -> log A_alpha`` is convex (Hoelder) with ``log A_1 = 0``, so ``log A``
lies below the chord between the neighbouring integer orders (computed exactly). In
``"exact"`` mode the convexity bound is always applied. The result is therefore finite for
every ``sigma > 0`` and, up to floating-point rounding, never below the true RDP.

For ``q <= 0.25`` the fractional series is summed for ``A - 1`` (see :func:`_log_a_frac`),
so that, as for integer orders, a tiny RDP keeps its relative precision (``"exact"``
matches mpmath quadrature to ~1e-15 relative at q = 2e-4, sigma = 9.6, alpha = 1.1).

Speed: one call over the 156 default orders takes ~1 ms for typical DP-SGD settings and
up to ~15 ms in the slowly converging regime (q ~ 0.5); results are cached per
``(sigma, q, orders, fractional)``.

RDP -> (epsilon, delta): the conversion of Canonne, Kamath, Steinke (2020,
arXiv:2004.00010, Prop. 12) and Balle, Barthe, Gaboardi, Hsu, Sato ("Hypothesis testing
interpretations and Renyi differential privacy", 2020, arXiv:2001.05990), with the
classic bound of Mironov ("Renyi differential privacy", 2017, arXiv:1702.07476, Prop. 3)
and the KL/total-variation bound as guards, minimised over orders (see
:func:`rdp_to_epsilon`, :func:`rdp_to_delta`).

This module imports only numpy, scipy and the standard library.
"""

from __future__ import annotations

import functools
import math
from typing import Iterable, Sequence

import numpy as np
from scipy import special

from .events import to_segments

__all__ = [
    "DEFAULT_ORDERS",
    "rdp_poisson_gaussian",
    "compute_rdp",
    "rdp_to_epsilon",
    "rdp_to_delta",
]

#: dp-accounting's default RDP orders: 1.1, 1.2, ..., 10.9, 11, ..., 63, 128, 256, 512, 1024.
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + [float(a) for a in range(11, 64)] + [128.0, 256.0, 512.0, 1024.0]
)

_FRACTIONAL_MODES = ("dp_accounting", "exact")
_FIRST_CHUNK = 32  # terms in the first chunk of the fractional series (at least floor(alpha) + 2)
_MAX_TERMS = 1 << 13  # terms of the fractional series before falling back to the bounds
_RTOL = 1e-8  # stop when the remainder changes the RDP by less than this (relative) ...
_ATOL = 1e-30  # ... or this (absolute; only matters for RDP ~ 0)
_RTOL_FALLBACK = 1e-7  # after _MAX_TERMS terms, a remainder above this triggers the convexity bound
_Q_MINUS_ONE = 0.25  # below this sample rate the fractional series is summed for A - 1
_INV_SQRT2 = 1.0 / math.sqrt(2.0)


# --------------------------------------------------------------------------- validation


def _check_orders(orders: Iterable[float]) -> np.ndarray:
    try:
        arr = np.asarray(orders, dtype=float)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"orders must be a sequence of real numbers; got {orders!r}") from exc
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise ValueError(f"orders must be one-dimensional; got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError("orders must not be empty")
    if np.isnan(arr).any() or (arr <= 1).any():
        bad = arr[np.isnan(arr) | (arr <= 1)]
        raise ValueError(f"Renyi orders must be > 1; got {bad.tolist()}")
    return arr


def _check_scalar(name: str, value: object) -> float:
    if isinstance(value, (bool, str, bytes)) or not hasattr(value, "__float__"):
        raise TypeError(f"{name} must be a real number; got {value!r}")
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name} must be a real number; got {value!r}") from exc
    if math.isnan(out):
        raise ValueError(f"{name} must be a number; got nan")
    return out


# --------------------------------------------------------------------------- log-space helpers


def _logsumexp_rows(x: np.ndarray) -> np.ndarray:
    """``log(sum(exp(x), axis=1))`` as ``max + log1p(sum of the others)``.

    Written with ``log1p`` so that a sum dominated by one term keeps the other terms'
    contribution to full relative precision (``scipy.special.logsumexp`` computes
    ``log(1 + s)``, which rounds ``s < 1e-16`` away).
    """
    m = np.max(x, axis=1)
    finite = np.isfinite(m)
    shift = np.where(finite, m, 0.0)
    e = np.exp(x - shift[:, None])
    e[np.arange(x.shape[0]), np.argmax(x, axis=1)] = 0.0
    return np.where(finite, m + np.log1p(e.sum(axis=1)), m)


def _log_h(u: np.ndarray) -> np.ndarray:
    """``log h(u)`` with ``h(u) = exp(u^2/2) Phi(-u) = erfcx(u/sqrt 2)/2``, decreasing in ``u``."""
    u = np.asarray(u, dtype=float)
    out = np.empty_like(u)
    pos = u > 0
    out[pos] = np.log(0.5 * special.erfcx(u[pos] * _INV_SQRT2))
    out[~pos] = 0.5 * u[~pos] ** 2 + special.log_ndtr(-u[~pos])
    return out


def _log_expm1(x: np.ndarray) -> np.ndarray:
    """``log(exp(x) - 1)`` for ``x >= 0`` without overflow."""
    x = np.asarray(x, dtype=float)
    big = x > 30.0
    small = np.where(big, 1.0, x)
    return np.where(big, x + np.log1p(-np.exp(-np.where(big, x, 30.0))), np.log(np.expm1(small)))


def _log_abs_binom(n: np.ndarray, k: np.ndarray) -> np.ndarray:
    """``log|C(n, k)|`` for real ``n`` (``gammaln`` is ``log|Gamma|``)."""
    return special.gammaln(n + 1.0) - special.gammaln(k + 1.0) - special.gammaln(n - k + 1.0)


# --------------------------------------------------------------------------- A_alpha


def _log_a_int(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    """``log A_alpha`` for integer ``alphas >= 2`` and ``0 < q < 1``, exact up to rounding.

    ``A - 1 = sum_{k=2}^{alpha} C(alpha,k) (1-q)^(alpha-k) q^k expm1((k^2-k)/(2 sigma^2))``,
    all orders in one flat, vectorised pass (cost ``sum(alphas)`` terms).
    """
    alphas = np.asarray(alphas, dtype=np.int64)
    if alphas.size == 0:
        return np.zeros(0)
    counts = alphas - 1  # k = 2..alpha
    seg = np.repeat(np.arange(alphas.size), counts)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    k = (np.arange(seg.size) - starts[seg] + 2).astype(float)
    a = alphas[seg].astype(float)
    log_terms = (
        _log_abs_binom(a, k)
        + k * math.log(q)
        + (a - k) * math.log1p(-q)
        + _log_expm1((k * k - k) / (2.0 * sigma * sigma))
    )
    # Segmented log-sum-exp with log1p precision (see _logsumexp_rows).
    m = np.maximum.reduceat(log_terms, starts)
    finite = np.isfinite(m)
    shift = np.where(finite, m, 0.0)
    e = np.exp(log_terms - shift[seg])
    # remove one copy of each segment's maximum; add it back as the "1" in log1p
    is_max = log_terms == m[seg]
    first_max = np.zeros(seg.size, dtype=bool)
    idx = np.flatnonzero(is_max)
    _, first = np.unique(seg[idx], return_index=True)
    first_max[idx[first]] = True
    e[first_max] = 0.0
    log_am1 = np.where(finite, m + np.log1p(np.add.reduceat(e, starts)), m)
    return np.logaddexp(0.0, log_am1)  # log(1 + (A - 1))


def _frac_pieces(alpha, kk, log_q, log_1mq, z0, base, sigma):
    """Log-space pieces of the fractional-order series for orders ``alpha`` [n, 1], terms ``kk`` [1, K].

    Returns ``(log|C(alpha,k)|, log I0_k, log I1_k, y0_k)`` with ``y0_k = log(I0_k / b_k)``,
    ``b_k = q^k (1-q)^(alpha-k)``. Where ``u = (k - z0)/sigma <= 0`` (``u1`` for ``I1``) the
    direct form ``log b_k + (k^2-k)/(2 s^2) + log Phi(-u)`` is used (exact for the
    dominant terms); elsewhere the equal form ``alpha log(1-q) - z0^2/(2 s^2) + log h(u)``,
    which avoids cancelling ``k^2/(2 s^2)`` against ``log Phi``.
    """
    two_s2 = 2.0 * sigma * sigma
    logc = _log_abs_binom(alpha, kk)
    shape = logc.shape
    j = alpha - kk
    base = np.broadcast_to(base, shape)
    out = []
    for u, log_b, x in (
        ((kk - z0) / sigma, kk * log_q + j * log_1mq, (kk * kk - kk) / two_s2),
        ((kk - alpha + z0) / sigma, j * log_q + kk * log_1mq, (j * j - j) / two_s2),
    ):
        u, log_b, x = (np.broadcast_to(v, shape) for v in (u, log_b, x))
        neg, pos = u <= 0, u > 0
        y = np.empty(shape)  # log(I / b)
        log_i = np.empty(shape)  # log I
        y[neg] = x[neg] + special.log_ndtr(-u[neg])
        log_i[neg] = log_b[neg] + y[neg]
        log_i[pos] = base[pos] + np.log(0.5 * special.erfcx(u[pos] * _INV_SQRT2))
        y[pos] = log_i[pos] - log_b[pos]
        out.append((log_i, y))
    (log_i0, y0), (log_i1, _) = out
    return logc, log_i0, log_i1, y0


def _accumulate(log_pos, log_neg, rows, log_terms, positive):
    """Add the terms (log-magnitudes, with a sign mask) into the running positive/negative sums."""
    log_pos[rows] = np.logaddexp(log_pos[rows], _logsumexp_rows(np.where(positive, log_terms, -np.inf)))
    log_neg[rows] = np.logaddexp(log_neg[rows], _logsumexp_rows(np.where(positive, -np.inf, log_terms)))


def _log_a_frac(q: float, sigma: float, alphas: np.ndarray, mode: str) -> np.ndarray:
    """Upper bound on ``log A_alpha`` for fractional ``alphas`` and ``0 < q < 1``.

    See the module docstring: chunked series (vectorised over orders and terms), the
    rigorous remainder always added, the convexity fallback for orders that have not
    converged after ``_MAX_TERMS`` terms (and always in ``"exact"`` mode).

    For ``q <= _Q_MINUS_ONE`` the series is summed for ``A - 1`` instead of ``A``, using
    ``1 = sum_k C(alpha,k) b_k`` (binomial series, ``b_k = q^k (1-q)^(alpha-k)``,
    convergent for q < 1/2):

        A - 1 = sum_k c_k b_k expm1(y0_k) + sum_k c_k I1_k + sum_k (c_k - C(alpha,k)) b_k,

    with ``c_k = C(alpha,k)`` (exact) or ``|C(alpha,k)|`` (dp_accounting) and
    ``y0_k = log(I0_k / b_k) = (k^2-k)/(2 s^2) + log Phi((z0-k)/s)``. The O(q) terms then
    never cancel, so a tiny RDP keeps its relative precision (as the integer orders do).
    The extra remainder ``-sum_{k>=K} C(alpha,k) b_k`` alternates with non-increasing
    magnitudes (q <= 1/2), so it is at most ``max(0, -C(alpha,K) b_K)``.
    """
    n = alphas.size
    if n == 0:
        return np.zeros(0)
    log_q, log_1mq = math.log(q), math.log1p(-q)
    z0 = sigma * sigma * (log_1mq - log_q) + 0.5
    fl = np.floor(alphas)
    base_all = alphas * log_1mq - z0 * z0 / (2.0 * sigma * sigma)
    exact = mode == "exact"
    minus_one = q <= _Q_MINUS_ONE

    result = np.full(n, np.inf)
    converged = np.zeros(n, dtype=bool)
    active = np.arange(n)
    log_pos = np.full(n, -np.inf)  # positive terms of the partial sum, in log space
    log_neg = np.full(n, -np.inf)  # negative terms
    lo, hi = 0, max(_FIRST_CHUNK, int(fl.max()) + 2)
    while active.size:
        a = alphas[active]
        f = fl[active][:, None]
        base = base_all[active][:, None]
        kk = np.arange(lo, hi, dtype=float)[None, :]
        logc, log_i0, log_i1, y0 = _frac_pieces(a[:, None], kk, log_q, log_1mq, z0, base, sigma)
        c_negative = (kk > f + 1) & ((kk - f - 1) % 2 == 1)  # sign of C(alpha, k)
        coef_positive = ~c_negative if exact else np.ones_like(c_negative)
        if minus_one:
            log_b = log_i0 - y0
            with np.errstate(divide="ignore"):
                log_abs_em1 = np.where(y0 > 0, _log_expm1(np.maximum(y0, 0.0)), np.log(-np.expm1(np.minimum(y0, 0.0))))
            _accumulate(log_pos, log_neg, active, logc + log_b + log_abs_em1, coef_positive == (y0 > 0))
            _accumulate(log_pos, log_neg, active, logc + log_i1, coef_positive)
            if not exact:  # (|C| - C) b_k = 2 |C| b_k where C < 0
                extra = np.where(c_negative, math.log(2.0) + logc + log_b, -np.inf)
                _accumulate(log_pos, log_neg, active, extra, np.ones_like(c_negative))
        else:
            _accumulate(log_pos, log_neg, active, logc + np.logaddexp(log_i0, log_i1), coef_positive)

        # Upper bound on the remainder after the terms k < hi (hi >= floor(alpha) + 2).
        kh = float(hi)
        fa = fl[active]
        c_hi_negative = (kh - fa - 1) % 2 == 1
        lc_hi, li0_hi, li1_hi, y0_hi = (v[:, 0] for v in _frac_pieces(
            a[:, None], np.array([[kh]]), log_q, log_1mq, z0, base, sigma))
        log_term_hi = lc_hi + np.logaddexp(li0_hi, li1_hi)
        if exact:
            # alternating with non-increasing magnitudes: between 0 and term `hi`
            log_mag = log_term_hi
            log_rem = np.where(c_hi_negative, -np.inf, log_term_hi)
        else:
            # sum_{k >= hi} |C(alpha,k)| = |C(alpha-1, hi-1)|, times the largest h-factor
            log_rem = log_mag = (
                _log_abs_binom(a - 1.0, np.full_like(a, kh - 1.0))
                + base_all[active]
                + np.logaddexp(_log_h((kh - z0) / sigma), _log_h((kh - a + z0) / sigma))
            )
        if minus_one:
            # -sum_{k >= hi} C(alpha,k) b_k: alternating, between 0 and -C(alpha,hi) b_hi
            log_b_term = lc_hi + li0_hi - y0_hi
            log_mag = np.logaddexp(log_mag, log_b_term)
            log_rem = np.logaddexp(log_rem, np.where(c_hi_negative, log_b_term, -np.inf))
        log_rem = log_rem + 1e-9  # slack for rounding in the bound itself

        lp, ln = log_pos[active], log_neg[active]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            valid = ln < lp  # the partial sum is positive (always, barring rounding)
            log_s = np.where(valid, lp + np.log1p(-np.exp(np.minimum(ln - lp, 0.0))), np.inf)
            log_upper = np.logaddexp(log_s, log_rem)  # of A, or of A - 1
            if minus_one:
                log_a_est, log_upper = np.logaddexp(0.0, log_s), np.logaddexp(0.0, log_upper)
            else:
                log_a_est = log_s
            # the remainder moves log A by at most |remainder| / A
            err = np.exp(log_mag - log_a_est)
        scale = np.maximum(log_a_est, 0.0)
        done = valid & (err <= _RTOL * scale + _ATOL * (a - 1.0))
        result[active] = log_upper
        converged[active] = done
        if hi >= _MAX_TERMS:
            # out of terms: the bound is still usable if the remainder is a small fraction
            converged[active] = valid & (err <= _RTOL_FALLBACK * scale + _ATOL * (a - 1.0))
            break
        active = active[~done]
        lo, hi = hi, min(2 * hi, _MAX_TERMS)

    # Convexity (Hoelder) bound: alpha -> log A_alpha is convex and log A_1 = 0, so log A
    # lies below the chord between the neighbouring integer orders.
    use_chord = ~converged | exact
    if use_chord.any():
        a = alphas[use_chord]
        lo_i = np.floor(a).astype(np.int64)
        ints = np.unique(np.concatenate([lo_i, lo_i + 1]))
        ints = ints[ints >= 2]
        table = dict(zip(ints.tolist(), _log_a_int(q, sigma, ints).tolist()))
        table[1] = 0.0
        w = a - lo_i
        chord = (1.0 - w) * np.array([table[i] for i in lo_i.tolist()]) + w * np.array(
            [table[i + 1] for i in lo_i.tolist()]
        )
        result[use_chord] = np.minimum(result[use_chord], chord)
    return result


# --------------------------------------------------------------------------- public API


def rdp_poisson_gaussian(
    noise_multiplier: float,
    sample_rate: float,
    orders: Sequence[float] = DEFAULT_ORDERS,
    *,
    fractional: str = "dp_accounting",
) -> np.ndarray:
    r"""RDP of one step of the Poisson-subsampled Gaussian mechanism, at each order.

    Add/remove-one neighbours, noise std ``noise_multiplier`` times the L2 sensitivity,
    each record sampled independently with probability ``sample_rate``:

        RDP(alpha) = log(A_alpha) / (alpha - 1),
        A_alpha = E_{z~N(0,s^2)}[((1 - q) + q exp((2z - 1)/(2 s^2)))^alpha]

    (Mironov, Talwar, Zhang 2019, arXiv:1908.10530; computation in the module docstring).
    Special cases: ``sample_rate == 1`` gives the Gaussian mechanism's
    ``alpha / (2 sigma^2)``; ``sample_rate == 0`` or ``noise_multiplier == inf`` give 0;
    ``noise_multiplier == 0`` gives inf (no privacy); an infinite order gives inf.

    Args:
      noise_multiplier: sigma >= 0.
      sample_rate: q in [0, 1].
      orders: Renyi orders, each > 1 (integer and fractional orders are both exact or
        upper bounds; see the module docstring).
      fractional: ``"dp_accounting"`` (default; the absolute-value series that
        dp-accounting 0.6.0 evaluates, an upper bound) or ``"exact"`` (the signed
        series, tighter at small fractional orders). Integer orders are unaffected.

    Returns:
      float64 array of shape ``[len(orders)]``; every entry is >= the true RDP (up to
      floating-point rounding) and finite whenever ``noise_multiplier > 0``.
    """
    sigma = _check_scalar("noise_multiplier", noise_multiplier)
    q = _check_scalar("sample_rate", sample_rate)
    if sigma < 0:
        raise ValueError(f"noise_multiplier must be >= 0; got {sigma}")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"sample_rate must be in [0, 1]; got {q}")
    if fractional not in _FRACTIONAL_MODES:
        raise ValueError(f"fractional must be one of {_FRACTIONAL_MODES}; got {fractional!r}")
    arr = _check_orders(orders)
    return _rdp_cached(sigma, q, tuple(arr.tolist()), fractional).copy()


@functools.lru_cache(maxsize=512)
def _rdp_cached(sigma: float, q: float, orders: tuple[float, ...], fractional: str) -> np.ndarray:
    alphas = np.asarray(orders, dtype=float)
    if q == 0.0 or sigma == math.inf:
        return np.zeros(alphas.size)
    if sigma == 0.0:
        return np.full(alphas.size, np.inf)
    if q == 1.0:
        return alphas / (2.0 * sigma * sigma)  # the Gaussian mechanism's RDP (Mironov 2017)
    out = np.full(alphas.size, np.inf)
    finite = np.isfinite(alphas)
    is_int = finite & (alphas == np.floor(alphas))
    is_frac = finite & ~is_int
    log_a = np.empty(alphas.size)
    # log(0) = -inf and exp overflow -> inf are meaningful in log space here
    with np.errstate(divide="ignore", over="ignore", under="ignore", invalid="ignore"):
        log_a[is_int] = _log_a_int(q, sigma, alphas[is_int].astype(np.int64))
        log_a[is_frac] = _log_a_frac(q, sigma, alphas[is_frac], fractional)
    out[finite] = np.maximum(log_a[finite], 0.0) / (alphas[finite] - 1.0)
    out[np.isnan(out)] = np.inf  # never reached in tests; fail safe (no bound), never optimistic
    out.setflags(write=False)
    return out


def compute_rdp(event, orders: Sequence[float] = DEFAULT_ORDERS, *, fractional: str = "dp_accounting") -> np.ndarray:
    """Total RDP of ``event`` (any event from :mod:`accountants.events`) at each order.

    RDP composes additively (Mironov 2017, Prop. 1), so this is
    ``sum over events.to_segments(event) of steps * rdp_poisson_gaussian(sigma, q, orders)``.
    An event with no steps gives zeros.
    """
    arr = _check_orders(orders)
    total = np.zeros(arr.size)
    for seg in to_segments(event):
        total += seg.steps * rdp_poisson_gaussian(seg.noise_multiplier, seg.sample_rate, arr, fractional=fractional)
    return total


def _check_conversion(orders, rdp) -> tuple[np.ndarray, np.ndarray]:
    orders_arr = _check_orders(orders)
    rdp_arr = np.asarray(rdp, dtype=float)
    if rdp_arr.ndim == 0:
        rdp_arr = rdp_arr.reshape(1)
    if rdp_arr.shape != orders_arr.shape:
        raise ValueError(
            f"orders and rdp must have the same length; got {orders_arr.size} orders and {rdp_arr.size} RDP values"
        )
    if np.isnan(rdp_arr).any():
        raise ValueError("rdp contains nan")
    if (rdp_arr < -1e-9).any():
        raise ValueError(f"RDP values must be >= 0; got {rdp_arr[rdp_arr < -1e-9].tolist()}")
    return orders_arr, np.maximum(rdp_arr, 0.0)  # tiny negatives are rounding: clamp


def rdp_to_epsilon(orders: Sequence[float], rdp: Sequence[float], delta: float) -> tuple[float, float]:
    r"""Smallest epsilon such that the RDP curve implies (epsilon, delta)-DP.

    For each order ``a > 1`` with RDP ``r``, the candidates are

    * ``r + log((a-1)/a) - (log(delta) + log(a)) / (a - 1)``
      (Canonne, Kamath, Steinke 2020, arXiv:2004.00010, Prop. 12; Balle et al. 2020,
      arXiv:2001.05990), the bound dp-accounting uses;
    * ``r - log(delta) / (a - 1)`` (Mironov 2017, arXiv:1702.07476, Prop. 3), never
      better mathematically but kept as a guard against rounding;
    * ``0`` if ``delta >= sqrt(1 - exp(-r))``: RDP of order ``a`` bounds the KL divergence,
      and by the Bretagnolle-Huber inequality the total variation distance is at most
      ``sqrt(1 - exp(-KL))``, i.e. (0, delta)-DP.

    The result is ``max(0, min over orders and candidates)``. ``log((a-1)/a)`` is
    evaluated as ``log(a-1) - log(a)``, stable as ``a -> 1``, so no order is excluded.

    Returns:
      ``(epsilon, order)``: the order achieving the minimum; ``(inf, nan)`` if no order
      gives a finite bound.

    Raises:
      ValueError: ``delta`` not in (0, 1), lengths differ, an order <= 1, a nan or a
      negative RDP value.
    """
    orders_arr, r = _check_conversion(orders, rdp)
    delta = _check_scalar("delta", delta)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1); got {delta}")
    a = orders_arr
    log_delta = math.log(delta)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        am1 = a - 1.0
        improved = r + np.log(am1) - np.log(a) - (log_delta + np.log(a)) / am1
        classic = r - log_delta / am1
        eps = np.fmin(improved, classic)
        eps = np.where(delta * delta + np.expm1(-r) > 0, 0.0, eps)  # KL / total variation bound
        eps = np.where(np.isinf(r), np.inf, eps)
        eps = np.where(np.isnan(eps), np.inf, eps)  # inf orders: inf - inf
    i = int(np.argmin(eps))
    if not np.isfinite(eps[i]):
        return math.inf, math.nan
    return max(0.0, float(eps[i])), float(a[i])


def rdp_to_delta(orders: Sequence[float], rdp: Sequence[float], epsilon: float) -> tuple[float, float]:
    r"""Smallest delta such that the RDP curve implies (epsilon, delta)-DP.

    For each order ``a > 1`` with RDP ``r`` the candidates are (in log space)

    * ``(a - 1)(r - epsilon + log((a-1)/a)) - log(a)`` (Canonne, Kamath, Steinke 2020,
      Prop. 12; Balle et al. 2020);
    * ``(a - 1)(r - epsilon)`` (Mironov 2017, Prop. 3), a guard;
    * ``0.5 log(1 - exp(-r))`` (KL divergence -> total variation, Bretagnolle-Huber).

    The result is ``min(1, exp(min over orders and candidates))``.

    Returns:
      ``(delta, order)``; ``(1.0, nan)`` (the trivial bound) if no order gives a bound
      below 1.

    Raises:
      ValueError: ``epsilon < 0`` (or nan), lengths differ, an order <= 1, a nan or a
      negative RDP value.
    """
    orders_arr, r = _check_conversion(orders, rdp)
    epsilon = _check_scalar("epsilon", epsilon)
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0; got {epsilon}")
    a = orders_arr
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        am1 = a - 1.0
        improved = am1 * (r - epsilon + np.log(am1) - np.log(a)) - np.log(a)
        classic = am1 * (r - epsilon)
        kl = 0.5 * np.log(-np.expm1(-r))
        log_delta = np.fmin(np.fmin(improved, classic), kl)
        log_delta = np.where(np.isinf(r), np.inf, log_delta)
        log_delta = np.where(np.isnan(log_delta), np.inf, log_delta)
    i = int(np.argmin(log_delta))
    if not log_delta[i] < 0.0:
        return 1.0, math.nan
    return float(math.exp(log_delta[i])), float(a[i])
