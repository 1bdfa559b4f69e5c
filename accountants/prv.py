"""PRV accountant: numerical composition of privacy random variables with a rigorous upper bound.

Method (Gopi, Lee, Wutschitz, "Numerical Composition of Differential Privacy",
NeurIPS 2021), implemented from the paper for the Poisson-subsampled Gaussian
mechanism under add/remove-one neighbours, with the grid chosen from the requested
accuracy and every approximation turned into an explicit error term.

For one step with noise multiplier ``sigma`` and sample rate ``q`` let
``P = (1-q) N(0, sigma^2) + q N(1, sigma^2)`` and ``Q = N(0, sigma^2)`` (the output
distributions on the worst-case pair, projected on the direction of the differing
record). With ``g(o) = log(1 - q + q exp((2o - 1) / (2 sigma^2)))``:

* remove direction: ``Y = g(o)``, ``o ~ P`` (privacy loss of ``P`` against ``Q``);
* add direction: ``Y = -g(o)``, ``o ~ Q`` (privacy loss of ``Q`` against ``P``).

For a composition of ``N`` steps the privacy curve of each direction is
``delta(eps) = E[(1 - exp(eps - S))_+]`` with ``S`` the sum of the steps' privacy
losses (an infinite loss counts fully); the add/remove guarantee is the larger of
the two directions. Both are computed.

Discretisation and its error terms (all explicit, see ``_bounds_one_direction``):

1. *Truncation.* Each step's loss is cut to ``[a, b]``: below ``a`` it is raised to
   ``a`` (stochastically larger: pessimistic), above ``b`` it becomes ``+inf``
   (pessimistic). The tail masses are at most ``tail_mass`` per step.
2. *Mean-preserving rounding.* The finite part is rounded to the centre ``k h`` of
   its grid cell and shifted by ``s`` so that its mean equals the continuous mean
   (computed by adaptive quadrature). The rounding errors ``D_i`` are independent,
   mean zero and each lies in an interval of length ``h``, so by Hoeffding's
   inequality ``P(sum D_i <= -t) <= exp(-2 t^2 / (N h^2))``. Hence
   ``delta(eps + t) <= delta_grid(eps) + eta`` with ``t = h sqrt(N log(1/eta) / 2)``.
   Quadrature error in the mean adds ``N |mean error|`` to ``t``.
3. *Composition by FFT.* The grid distributions are composed by exponentiation in
   Fourier space on a circular grid that covers a window ``[lo, hi]``. The window
   comes from Chernoff bounds on the composed grid distribution (its moment
   generating function, bounded blockwise with the chord of the convex exponential),
   so the mass outside it, which the circular convolution could alias into the
   window, is at most ``window_mass``; it is added to delta.

So ``delta(eps + t) <= delta_fft(eps) + eta + window_mass`` (upper bound) and
``delta(eps - t) >= delta_fft(eps) - eta - window_mass - N * tail_mass`` (lower
bound), from which ``EpsilonBounds(lower, estimate, upper)`` follow. The mesh ``h``
is refined until ``upper - lower <= max(relative_error * lower, absolute_error)``.
Floating-point error of the FFT is not part of the bound; it is far below the
other terms for the grids used here (verified against dp-accounting's PLD in the
tests down to delta = 1e-12).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy import fft as sp_fft
from scipy import integrate, special

from .events import Event, Segment, to_segments

__all__ = [
    "EpsilonBounds",
    "prv_epsilon_bounds",
    "prv_epsilon",
    "prv_delta",
    "DEFAULT_RELATIVE_ERROR",
    "DEFAULT_ABSOLUTE_ERROR",
]

DEFAULT_RELATIVE_ERROR = 0.008
DEFAULT_ABSOLUTE_ERROR = 5e-4
MAX_GRID = 1 << 24  # 16.8M points: ~130 MB per real array
_FIRST_GRID = 1 << 12
# Fractions of delta spent on the explicit error terms (they move epsilon very little).
# The explicit error terms are sized by one scale ``err`` (first 1e-3 * delta, smaller when
# epsilon is sensitive to delta): Hoeffding failure probability ``err``, mass outside the
# FFT window ``err / 10`` per side, truncated tail mass ``err / 10`` over all steps.
_FIRST_ERROR_FRACTION = 1e-3
_EXTENDED = np.finfo(np.longdouble).eps < np.finfo(np.float64).eps  # 80-bit long double (x86-64 Linux)


@dataclass(frozen=True)
class EpsilonBounds:
    """Rigorous bounds ``lower <= epsilon(delta) <= upper`` and a point ``estimate``."""

    lower: float
    estimate: float
    upper: float


# ---------------------------------------------------------------------------------
# One step's privacy loss distribution, one direction
# ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Loss:
    """The privacy loss of one Poisson-subsampled Gaussian step in one direction."""

    sigma: float
    q: float
    remove: bool

    def g(self, o: np.ndarray) -> np.ndarray:
        """``log(1 - q + q exp((2o - 1) / (2 sigma^2)))``, stable for all ``o``."""
        z = (2.0 * np.asarray(o, dtype=float) - 1.0) / (2.0 * self.sigma**2)
        if self.q == 1.0:
            return z
        return np.logaddexp(math.log1p(-self.q), math.log(self.q) + z)

    def g_inverse(self, y: np.ndarray) -> np.ndarray:
        """The ``o`` with ``g(o) = y``; ``-inf`` for ``y <= log(1 - q)``."""
        y = np.asarray(y, dtype=float)
        q, s2 = self.q, self.sigma**2
        if q == 1.0:
            return s2 * y + 0.5
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            big = y > 0.5
            yb = np.where(big, y, 0.5)
            ys = np.where(big, 0.0, y)
            log_inner = np.where(
                big,
                yb + np.log1p(-(1.0 - q) * np.exp(-yb)),
                np.log(np.expm1(ys) + q),
            )
            o = s2 * (log_inner - math.log(q)) + 0.5
        return np.where(np.isnan(o) | (y <= math.log1p(-q)), -np.inf, o)

    # CDF and survival function of the loss Y, each accurate in its own tail.
    def cdf(self, y: np.ndarray) -> np.ndarray:
        if self.remove:
            o = self.g_inverse(y)
            return (1 - self.q) * special.ndtr(o / self.sigma) + self.q * special.ndtr((o - 1) / self.sigma)
        o = self.g_inverse(-np.asarray(y, dtype=float))
        return special.ndtr(-o / self.sigma)

    def sf(self, y: np.ndarray) -> np.ndarray:
        if self.remove:
            o = self.g_inverse(y)
            return (1 - self.q) * special.ndtr(-o / self.sigma) + self.q * special.ndtr((1 - o) / self.sigma)
        o = self.g_inverse(-np.asarray(y, dtype=float))
        return special.ndtr(o / self.sigma)

    def truncation(self, tail_mass: float) -> tuple[float, float]:
        """``(a, b)`` with ``P(Y < a) <= tail_mass`` and ``P(Y > b) <= tail_mass``.

        Uses the component bounds ``F_P(o) <= Phi(o / sigma)`` and
        ``1 - F_P(o) <= Phi((1 - o) / sigma)``.
        """
        z = float(special.ndtri(tail_mass))  # negative
        if self.remove:
            a, b = self.g(self.sigma * z), self.g(1.0 - self.sigma * z)
        else:
            a, b = -self.g(-self.sigma * z), -self.g(self.sigma * z)
        return float(a), float(b)

    def clipped_mean(self, a: float, b: float) -> tuple[float, float]:
        """``E[max(Y, a); Y <= b]`` and an error bound of the quadrature."""
        sigma, q = self.sigma, self.q
        if self.remove:
            lo, hi = float(self.g_inverse(a)), float(self.g_inverse(b))

            def integrand(o: float) -> float:
                dens = ((1 - q) * _std_normal_kernel(o / sigma) + q * _std_normal_kernel((o - 1) / sigma)) / (
                    sigma * math.sqrt(2 * math.pi)
                )
                return float(self.g(o)) * dens

        else:
            lo, hi = float(self.g_inverse(-b)), float(self.g_inverse(-a))

            def integrand(o: float) -> float:
                dens = _std_normal_kernel(o / sigma) / (sigma * math.sqrt(2 * math.pi))
                return -float(self.g(o)) * dens

        lo = max(lo, -1e300)
        points = [p for p in (0.0, 0.5, 1.0) if lo < p < hi]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", integrate.IntegrationWarning)
            value, err = integrate.quad(integrand, lo, hi, points=points or None, limit=400, epsabs=1e-15, epsrel=1e-13)
        if caught:  # quad could not reach its tolerance: do not trust its error estimate
            err = max(err, 1e-12 + 1e-9 * abs(value))
        tail = float(self.cdf(a))
        return value + a * tail, abs(err) + 1e-15 * abs(value)


@dataclass(frozen=True)
class _Step:
    """One step's loss (one direction) with its truncation and exact clipped mean."""

    loss: _Loss
    steps: int
    a: float
    b: float

    @cached_property
    def mean(self) -> tuple[float, float]:
        return self.loss.clipped_mean(self.a, self.b)

    @cached_property
    def inf_mass(self) -> float:
        return float(self.loss.sf(self.b))

    def on_grid(self, h: float) -> "_GridStep":
        """Discretise on the grid ``h Z``: masses at ``(k_lo + i) h + shift``."""
        k_lo, k_hi = int(round(self.a / h)), int(round(self.b / h))
        if k_hi == k_lo:
            masses = np.array([float(self.loss.cdf(self.b))])
        else:
            inner = (np.arange(k_lo, k_hi) + 0.5) * h  # interior cell edges
            edges = np.concatenate(([self.a], inner, [self.b]))
            # the CDF is accurate below the median, the survival function above it
            split = int(np.searchsorted(edges, self.median))
            cdf = self.loss.cdf(edges[: split + 1])
            sf = self.loss.sf(edges[split:])
            masses = np.empty(edges.size - 1)
            masses[:split] = np.diff(cdf)
            masses[split:] = -np.diff(sf)
            masses[0] = float(self.loss.cdf(edges[1]))  # the lower tail, raised to a, joins the first cell
            masses = np.maximum(masses, 0.0)
        total = masses.sum()
        cont_mean, mean_err = self.mean
        grid_mean = h * float(np.dot(masses, np.arange(k_lo, k_lo + masses.size)))
        shift = (cont_mean - grid_mean) / total if total > 0 else 0.0
        return _GridStep(self, k_lo, masses, shift, h, mean_err / max(total, 1e-300))

    @cached_property
    def median(self) -> float:
        """A point near the median: where ``on_grid`` switches from the CDF to the survival function.

        Either function is accurate near the median, so a coarse search is enough.
        """
        points = np.linspace(self.a, self.b, 257)
        above = np.flatnonzero(self.loss.cdf(points) >= 0.5)
        return float(points[above[0]]) if above.size else self.b


@dataclass(frozen=True)
class _GridStep:
    step: _Step
    k_lo: int
    masses: np.ndarray  # masses[i] sits at values[i] = (k_lo + i) h + shift
    shift: float  # added to every grid value; makes the conditional mean exact
    h: float
    mean_error: float  # bound on the remaining error of the conditional mean

    @property
    def values(self) -> np.ndarray:
        return (self.k_lo + np.arange(self.masses.size)) * self.h + self.shift

    def log_mgf(self, lams: np.ndarray) -> np.ndarray:
        """Upper bounds on ``log E[exp(lam Y'); Y' finite]`` for each ``lam`` (shape [L]).

        Cells are grouped in at most 256 blocks; within a block the convex
        ``exp(lam y)`` lies below its chord, so the chord at the block's mean bounds it.
        """
        m = self.masses
        size = max(1, -(-m.size // 256))
        starts = np.arange(0, m.size, size)
        w = np.add.reduceat(m, starts)
        mu = np.add.reduceat(m * np.arange(m.size, dtype=float), starts)
        keep = w > 0
        w, mu, starts = w[keep], mu[keep] / w[keep], starts[keep]
        u = starts.astype(float)
        v = np.minimum(starts + size - 1, m.size - 1).astype(float)
        width = np.where(v > u, v - u, 1.0)
        lo_w = np.where(v > u, np.clip((v - mu) / width, 0.0, 1.0), 1.0)
        h = self.h
        lam = np.asarray(lams, dtype=float)[:, None]
        with np.errstate(divide="ignore"):
            terms = np.logaddexp(np.log(lo_w) + lam * u * h, np.log1p(-lo_w) + lam * v * h)
            out = special.logsumexp(terms + np.log(w)[None, :], axis=1)
        return out + np.asarray(lams, dtype=float) * (self.k_lo * h + self.shift)


_LAMS = np.geomspace(1e-3, 1e3, 31)


@dataclass(frozen=True)
class _Chernoff:
    """Upper bounds on the log-MGF of the composed grid distribution's finite part.

    ``up[i] >= log E[exp(lams[i] S)]`` and ``down[i] >= log E[exp(-lams[i] S)]``.
    """

    lams: np.ndarray
    up: np.ndarray
    down: np.ndarray

    @classmethod
    def of(cls, grids: list[_GridStep], lams: np.ndarray = _LAMS) -> "_Chernoff":
        both = sum(g.step.steps * g.log_mgf(np.concatenate((lams, -lams))) for g in grids)
        return cls(lams, np.asarray(both[: lams.size]), np.asarray(both[lams.size :]))

    def window(self, mass: float) -> tuple[float, float]:
        """``[lo, hi]`` with at most ``mass`` of the composed distribution below and above."""
        log_mass = math.log(mass)
        with np.errstate(invalid="ignore"):
            hi = float(np.nanmin((self.up - log_mass) / self.lams))
            lo = float(np.nanmax(-(self.down - log_mass) / self.lams))
        return lo, hi

    def plan(
        self, delta: float, lo: float, hi: float, alias_budget: float, eps_hint: float, max_width: float
    ) -> tuple[float, float]:
        """The FFT's tilt and the top of its window: ``(tilt, hi)``.

        The tilt is at most half the Chernoff-optimal order for the tail ``delta``; the
        largest such order is taken for which a window of width at most ``max_width``
        keeps the wrapped-around tilted mass, read at ``eps_hint`` or above (bounded by
        ``upper_tail``), below ``alias_budget``; the window is widened upwards as needed.
        """
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            best = float(self.lams[int(np.nanargmin((self.up - math.log(delta)) / self.lams))])
            for lam in self.lams[self.lams <= 0.5 * best][::-1]:
                above = self.lams > lam
                need = (self.up[above] - self.lams[above] * eps_hint - math.log(alias_budget)) / (self.lams[above] - lam)
                width = max(hi - lo, float(np.nanmin(need)) if above.any() else math.inf)
                if width <= max_width:
                    return float(lam), lo + width
        return 0.0, hi

    def upper_tail(self, x: float, extra_slope: float = 0.0, above: float = 0.0) -> float:
        """``min_lam exp(up(lam) - lam x - (lam - above) * extra_slope)`` over ``lam > above``."""
        ok = self.lams > above
        if not ok.any():
            return 1.0
        with np.errstate(over="ignore", invalid="ignore"):
            vals = self.up[ok] - self.lams[ok] * x - (self.lams[ok] - above) * extra_slope
        return float(min(1.0, math.exp(min(0.0, float(np.nanmin(vals))))))


@dataclass(frozen=True)
class _Curve:
    """A composed grid distribution: masses ``p`` at ``y0 + j h`` plus ``inf_mass`` at +inf.

    ``p`` is exact up to ``noise`` per point at ``y0`` times ``exp(-tilt (y - y0))``
    (floating-point error of the tilted FFT, see ``_compose``); the curve is only
    read at ``y >= valid_from``.
    """

    p: np.ndarray
    y0: float
    h: float
    inf_mass: float
    tilt: float
    log_noise: float
    alias: _Chernoff
    width: float

    @cached_property
    def _sums(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        p, h = self.p, self.h
        c = _discounted_suffix(p, h)
        after = np.concatenate((np.cumsum(p[::-1])[::-1][1:], [0.0]))  # A_j = sum_{i > j} p_i
        # D_j = delta at y_j = sum_{i > j} p_i (1 - exp(-(i - j) h)): a sum of positive terms
        inc = -math.expm1(-h) * np.concatenate((p[1:] + c[1:], [0.0]))
        d = np.cumsum(inc[::-1])[::-1]
        return after, c, d

    def numeric_error(self, eps: float) -> float:
        """Bound on the delta error at every point >= ``eps`` from FFT rounding and aliasing."""
        lam, h = self.tilt, self.h
        start = max(eps, self.y0)
        count = max(0.0, (self.y0 + self.h * self.p.size - start) / h)
        geometric = min(count, 1.0 / -math.expm1(-lam * h)) if lam > 0 else count
        log_fft = self.log_noise - lam * (start - self.y0) + math.log(max(geometric, 1e-300))
        fft = math.exp(min(0.0, log_fft))
        # tilted mass above the window wraps to y - width, amplified by exp(tilt * width):
        # it lands above eps only from above eps + width
        alias = self.alias.upper_tail(eps, extra_slope=self.width, above=lam)
        return fft + alias

    def delta(self, eps: float) -> float:
        """``sum_j p_j (1 - exp(eps - y_j))_+ + inf_mass``."""
        after, c, d = self._sums
        j = int(math.floor((eps - self.y0) / self.h))
        if j < 0:
            total = float(self.p.sum()) - math.exp(eps - self.y0) * float(self.p[0] + c[0])
            return min(1.0, max(0.0, total) + self.inf_mass)
        if j >= self.p.size:
            return self.inf_mass
        yj = self.y0 + j * self.h
        return max(0.0, float(after[j] - math.exp(eps - yj) * c[j])) + self.inf_mass

    def epsilon(self, delta: float) -> float:
        """The smallest ``eps`` on the window with ``delta(eps) <= delta``; ``inf`` if none, ``-inf`` below it."""
        target = delta - self.inf_mass
        if target <= 0:
            return math.inf
        after, c, d = self._sums
        above = np.flatnonzero(d > target)  # read from the top: only the upper part is accurate
        if above.size == 0:
            return -math.inf
        i = int(above[-1])
        if i == d.size - 1:
            return math.inf
        yi = self.y0 + i * self.h
        # delta(y_i) > target >= delta(y_{i+1}): solve after[i] - exp(eps - y_i) c[i] = target
        if c[i] <= 0 or after[i] <= target:
            return yi + self.h
        return min(yi + self.h, max(yi, yi + math.log((after[i] - target) / c[i])))


def _discounted_suffix(p: np.ndarray, h: float) -> np.ndarray:
    """``C_j = sum_{i > j} p_i exp(-(i - j) h)`` for all ``j`` (shape of ``p``), in O(n).

    Blocks of at most 40 / h points keep ``exp(i h)`` in range; the carry between
    blocks is one multiply-add per block.
    """
    n = p.size
    block = max(1, min(n, int(40.0 / h)))
    weight = np.exp(-h * np.arange(block))
    out = np.empty(n)
    carry = 0.0  # C at the first point of the next block, plus that point's mass
    for start in range(((n - 1) // block) * block, -1, -block):
        chunk = p[start : start + block]
        w = weight[: chunk.size]
        tail = np.cumsum((chunk * w)[::-1])[::-1]  # sum_{i >= j} p_i w_i within the block
        inner = np.concatenate((tail[1:], [0.0])) / w  # sum_{i > j, in block} p_i e^{-(i - j) h}
        out[start : start + chunk.size] = inner + carry * np.exp(-h * (chunk.size - np.arange(chunk.size)))
        carry = out[start] + p[start]
    return out


def _compose(
    grids: list[_GridStep], chernoff: _Chernoff, lo: float, n: int, tilt: float, dtype: type = np.float64
) -> _Curve:
    """Compose the grid steps by FFT exponentiation on ``n`` points starting near ``lo``.

    Exponential tilting (``p(y) exp(tilt y)``, renormalised) commutes with
    convolution, so the composition is computed on the tilted distributions, whose
    mass sits where the answer is read, and untilted afterwards. FFT rounding is
    then small relative to the tail that defines delta, instead of relative to the
    bulk (Gopi et al.'s and dp-accounting's grids lose delta below ~1e-10 to it).
    Where the tilt must stay small (a heavy upper tail limits it), ``dtype=np.longdouble``
    lowers the rounding floor by three orders of magnitude on x86-64 (about 5x slower).
    """
    h = grids[0].h
    total_shift = sum(g.step.steps * g.shift for g in grids)
    k0 = int(math.floor((lo - total_shift) / h))
    y0 = k0 * h + total_shift
    spectrum = None
    log_norm = 0.0
    n_steps = 0
    for g in grids:
        with np.errstate(divide="ignore"):
            logw = np.log(g.masses) + tilt * (g.values - y0 / max(1, sum(x.step.steps for x in grids)))
        lse = float(special.logsumexp(logw))
        log_norm += g.step.steps * lse
        n_steps += g.step.steps
        idx = (g.k_lo + np.arange(g.masses.size)) % n
        a = np.bincount(idx, weights=np.exp(logw - lse), minlength=n).astype(dtype)
        f = _power(sp_fft.rfft(a, workers=-1), g.step.steps)
        spectrum = f if spectrum is None else spectrum * f
    p = np.roll(sp_fft.irfft(spectrum, n, workers=-1).astype(np.float64), -(k0 % n))
    # max error per point of the tilted result: N roundings amplified by the power, plus the FFTs
    l1 = (2.0 * float(np.abs(spectrum).sum()) - abs(spectrum[0])) / n
    noise = 8.0 * float(np.finfo(dtype).eps) * (n_steps + 4 * len(grids) * math.log2(n) + 16) * l1
    y = y0 + h * np.arange(n)
    # untilt: p(y) = p_tilt(y) exp(-tilt (y - y0) + log_norm) with the tilt reference at y0
    with np.errstate(over="ignore", invalid="ignore"):
        factor = np.exp(np.minimum(700.0, -tilt * (y - y0) + log_norm))
        p = np.where(np.isfinite(factor), p * factor, 0.0)
    log_finite = sum(g.step.steps * math.log1p(-g.step.inf_mass) for g in grids)
    log_noise = math.log(noise) + log_norm if noise > 0 else -math.inf
    return _Curve(p, y0, h, -math.expm1(log_finite), tilt, log_noise, chernoff, n * h)


def _power(f: np.ndarray, n: int) -> np.ndarray:
    """``f ** n`` for complex ``f`` in polar form; entries below 1e-300 in modulus become 0."""
    if n == 1:
        return f
    with np.errstate(divide="ignore"):
        log_mag = np.log(np.abs(f)) * n
    keep = log_mag > -690.0
    out = np.zeros_like(f)
    fk = f[keep]
    out[keep] = np.exp(log_mag[keep] + 1j * (np.angle(fk) * n))
    return out


@dataclass(frozen=True)
class _Direction:
    lower: float
    estimate: float
    upper: float
    curve: _Curve
    t: float
    eta: float
    window_mass: float
    tv_tail: float
    numeric: float  # the FFT rounding and aliasing error in delta at the estimate

    @property
    def delta_gap(self) -> float:
        """The part of ``upper - lower`` that comes from the error terms in delta."""
        return self.upper - self.lower - 2 * self.t


def _bounds_one_direction(
    steps: list[_Step], h: float, delta: float, err: float, max_grid: int, eps_hint: float = 0.0
) -> _Direction | None:
    """Bounds for one direction on mesh ``h``; ``None`` if the grid would exceed ``max_grid``.

    ``eps_hint`` (a likely lower bound on epsilon, e.g. from a coarser pass) only
    guides the choice of the tilt; every error term is evaluated at the points
    where the answer is read.
    """
    n_total = sum(s.steps for s in steps)
    grids = [s.on_grid(h) for s in steps]
    eta = err
    window_mass = err / 10
    chernoff = _Chernoff.of(grids)
    lo, hi = chernoff.window(window_mass)
    lo, hi = lo - 2 * h, hi + 2 * h
    tilt, hi = chernoff.plan(delta, lo, hi, err / 100, max(0.0, eps_hint), 4 * (hi - lo))
    n = sp_fft.next_fast_len(int(math.ceil((hi - lo) / h)) + 2, real=True)
    if n > max_grid:
        return None
    curve = _compose(grids, chernoff, lo, n, tilt)
    if curve.numeric_error(max(0.0, curve.epsilon(delta))) > 0.01 * delta and _EXTENDED:
        curve = _compose(grids, chernoff, lo, n, tilt, np.longdouble)
    t = h * math.sqrt(n_total * math.log(1.0 / eta) / 2.0) + sum(g.step.steps * g.mean_error for g in grids)
    tv_tail = sum(s.steps * (s.inf_mass + float(s.loss.cdf(s.a))) for s in steps)
    base = eta + 2 * window_mass
    estimate = curve.epsilon(delta)
    # upper: the answer lies at or above the estimate, where the numeric error is at most this
    numeric = curve.numeric_error(max(0.0, estimate))
    upper = curve.epsilon(delta - base - numeric) + t
    # lower: the answer lies below the estimate; evaluate the numeric error where it lands
    x = max(0.0, estimate)
    lower = -math.inf
    for _ in range(4):
        solution = curve.epsilon(delta + base + tv_tail + curve.numeric_error(x))
        if solution >= x or x == 0.0:
            lower = solution - t
            break
        x = max(0.0, solution - h)
    return _Direction(
        max(lower, 0.0), max(estimate, 0.0), max(upper, 0.0), curve, t, eta, window_mass, tv_tail, numeric
    )


def _check_delta(delta: float) -> float:
    delta = float(delta)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), e.g. 1e-5 or 1/(10 * dataset size); got {delta}")
    return delta


def _check_accuracy(relative_error: float, absolute_error: float) -> None:
    if not 0.0 < relative_error < 1.0:
        raise ValueError(f"relative_error must be in (0, 1), e.g. 0.008; got {relative_error}")
    if not absolute_error > 0.0:
        raise ValueError(f"absolute_error must be > 0, e.g. 5e-4; got {absolute_error}")


def _losses(segments: tuple[Segment, ...], err: float) -> dict[bool, list[_Step]]:
    n_total = sum(s.steps for s in segments)
    tail_mass = max(err / 10 / n_total, 1e-300)
    out: dict[bool, list[_Step]] = {}
    for remove in (True, False):
        steps = []
        for seg in segments:
            loss = _Loss(seg.noise_multiplier, seg.sample_rate, remove)
            a, b = loss.truncation(tail_mass)
            if not remove and seg.sample_rate < 1.0:
                b = min(b, -math.log1p(-seg.sample_rate))  # the add-direction loss is bounded above
            steps.append(_Step(loss, seg.steps, a, b))
        out[remove] = steps
    return out


def prv_epsilon_bounds(
    event: Event,
    delta: float,
    *,
    relative_error: float = DEFAULT_RELATIVE_ERROR,
    absolute_error: float = DEFAULT_ABSOLUTE_ERROR,
    max_grid: int = MAX_GRID,
) -> EpsilonBounds:
    """Bounds on the smallest epsilon with (epsilon, delta)-DP for ``event`` (add/remove-one).

    The grid is refined until ``upper - lower <= max(relative_error * lower, absolute_error)``,
    so ``upper`` is within ``relative_error`` of the exact epsilon. If that would need more
    than ``max_grid`` points, the best bounds within ``max_grid`` are returned with a warning.

    Args:
        event: any event of ``accountants.events``.
        delta: target delta in (0, 1).
    Returns:
        ``EpsilonBounds(lower, estimate, upper)``; ``upper`` is the reportable epsilon.
    """
    delta = _check_delta(delta)
    _check_accuracy(relative_error, absolute_error)
    segments = to_segments(event)
    if not segments:
        return EpsilonBounds(0.0, 0.0, 0.0)
    if any(s.noise_multiplier == 0.0 for s in segments):
        return EpsilonBounds(math.inf, math.inf, math.inf)
    return _refine(segments, delta, relative_error, absolute_error, max_grid)[0]


def _initial_mesh(losses: dict[bool, list[_Step]], err: float) -> float:
    """A coarse first mesh: about ``_FIRST_GRID`` points over the composed window.

    The window is probed on the remove direction only (the add direction's loss is
    bounded above, its window is rarely wider; if it is, its first grid is just larger).
    """
    steps = losses[True]
    probe = max(max(s.b - s.a for s in steps) / 1024.0, 1e-12)
    lo, hi = _Chernoff.of([s.on_grid(probe) for s in steps], _LAMS[::3]).window(err / 10)
    return max((hi - lo) / _FIRST_GRID, 1e-12)


def _refine(
    segments: tuple[Segment, ...], delta: float, rel: float, abs_: float, max_grid: int
) -> tuple[EpsilonBounds, dict[bool, _Direction]]:
    """Refine each direction's mesh until ``upper - lower <= max(rel * lower, abs_)``.

    The direction with the larger epsilon is refined to the requested accuracy; the
    other only until its upper bound falls below the first one's lower bound (usually
    at a much coarser mesh), since only the larger of the two is reported. Where
    epsilon is so sensitive to delta that the error terms in delta dominate the gap,
    they are made 100 times smaller.
    """
    n_total = sum(s.steps for s in segments)
    err = _FIRST_ERROR_FRACTION * delta
    losses = _losses(segments, err)
    h0 = _initial_mesh(losses, err)
    mesh = {True: h0, False: h0}
    results: dict[bool, _Direction] = {}

    def run(d: bool, h: float) -> _Direction | None:
        hint = results[d].lower if d in results else 0.0
        return _bounds_one_direction(losses[d], h, delta, err, max_grid, hint)

    for remove in (True, False):
        res = run(remove, h0)
        if res is None:
            raise RuntimeError(
                f"PRV accounting needs a grid larger than max_grid={max_grid} even at its coarsest mesh; "
                "use the RDP accountant for this history"
            )
        results[remove] = res
    for _ in range(24):
        lower = max(r.lower for r in results.values())
        upper = max(r.upper for r in results.values())
        estimate = max(r.estimate for r in results.values())
        goal = max(rel * lower, abs_)
        if upper - lower <= goal:
            return EpsilonBounds(lower, estimate, upper), results
        goal = max(rel * max(lower, estimate), abs_)
        progressed = False
        for d in sorted(results, key=lambda k: -results[k].estimate):  # the top direction first
            r = results[d]
            lower = max(x.lower for x in results.values())
            if r.upper <= lower + goal:
                continue
            if r.numeric > 0.1 * delta:
                # FFT rounding dominates and a finer mesh cannot help: stop with what is certified
                progressed = False
                break
            if r.delta_gap > 0.25 * goal and err > 1e-12 * delta:
                # epsilon is flat in delta here: shrink the error terms in delta
                err /= 100.0
                losses = _losses(segments, err)
                results = {k: run(k, mesh[k]) or results[k] for k in results}
                progressed = True
                break
            # the top direction needs t ~ goal / 2; a dominated one only needs to clear the top's lower bound
            per_mesh = math.sqrt(n_total * math.log(1.0 / err) / 2.0)  # t = h * per_mesh
            t_needed = max(0.42 * goal, 0.8 * (lower + goal - r.estimate) / 2.0)
            h = min(max(t_needed / per_mesh, mesh[d] / 64.0), mesh[d] / 1.5)
            res = run(d, h)
            if res is not None:
                results[d], mesh[d], progressed = res, h, True
        if not progressed:
            break
    lower = max(r.lower for r in results.values())
    upper = max(r.upper for r in results.values())
    estimate = max(r.estimate for r in results.values())
    warnings.warn(
        f"PRV accounting stopped at max_grid={max_grid}: epsilon in [{lower:.6g}, {upper:.6g}] "
        f"(requested gap {max(rel * lower, abs_):.3g}); returning the upper bound",
        RuntimeWarning,
        stacklevel=3,
    )
    return EpsilonBounds(lower, estimate, upper), results


def prv_epsilon(event: Event, delta: float, **kwargs) -> float:
    """The rigorous upper bound on epsilon (see :func:`prv_epsilon_bounds`)."""
    return prv_epsilon_bounds(event, delta, **kwargs).upper


def prv_delta(
    event: Event,
    epsilon: float,
    *,
    relative_error: float = DEFAULT_RELATIVE_ERROR,
    absolute_error: float = DEFAULT_ABSOLUTE_ERROR,
    max_grid: int = MAX_GRID,
) -> float:
    """An upper bound on delta(epsilon) for ``event`` (add/remove-one).

    The grid is chosen as for epsilon: the bound is at most the exact delta at
    ``epsilon - max(relative_error * epsilon, absolute_error)`` plus error terms of
    about 1e-3 of the answer.
    """
    epsilon = float(epsilon)
    if not epsilon >= 0:
        raise ValueError(f"epsilon must be >= 0; got {epsilon}")
    _check_accuracy(relative_error, absolute_error)
    segments = to_segments(event)
    if not segments:
        return 0.0
    if any(s.noise_multiplier == 0.0 for s in segments):
        return 1.0
    # size the error terms and the tilt from a guess of delta, then again from the answer
    n_total = sum(s.steps for s in segments)
    t_target = 0.45 * max(relative_error * epsilon, absolute_error)
    guess, out = 1e-10, 1.0
    for _ in range(4):
        err = _FIRST_ERROR_FRACTION * guess
        losses = _losses(segments, err)
        h = t_target / math.sqrt(n_total * math.log(1.0 / err) / 2.0)
        out = 0.0
        for remove in (True, False):
            res = _bounds_one_direction(losses[remove], h, guess, err, max_grid)
            while res is None:
                h *= 2.0
                res = _bounds_one_direction(losses[remove], h, guess, err, max_grid)
            x = epsilon - res.t
            bound = res.curve.delta(x) + res.eta + 2 * res.window_mass + res.curve.numeric_error(max(0.0, x))
            out = max(out, bound)
        if 0.1 * guess <= out <= 10 * guess or out <= 1e-300:
            break
        guess = min(max(out, 1e-300), 0.5)
    return min(1.0, out)


def _std_normal_kernel(x: float) -> float:
    """``exp(-x^2 / 2)``, 0 far in the tails (where ``x * x`` would overflow a float)."""
    return math.exp(-0.5 * x * x) if abs(x) < 40.0 else 0.0
