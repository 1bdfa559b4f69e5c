"""Calibration: the noise multiplier that meets a target (epsilon, delta).

``get_noise_multiplier`` returns the smallest noise multiplier ``sigma`` (to within
``epsilon_tolerance``) whose epsilon is at most the target: the result is never above the
target, and ``epsilon(sigma) >= target * (1 - epsilon_tolerance)``.

Strategy (coarse to fine, few evaluations of the slow accountant):

0. A starting point from the CLT (mu-GDP) approximation: no accountant call.
1. RDP (cheap, an upper bound): search for the RDP-calibrated ``sigma_rdp`` and the
   local slope ``d log eps / d log sigma``. The PRV answer is a little below ``sigma_rdp``.
2. PRV: search a cheap proxy, the point estimate of a coarse PRV grid (within about 0.3%
   of the fine upper bound, ~10x cheaper), for the middle of the accepted window
   ``[target (1 - tol), target]``; then evaluate the accountant's own (fine) upper bound
   there. Accept it if it lies in the window, else rescale the proxy by the observed
   ratio and repeat. Usually one fine evaluation.

The searches extrapolate in log-log space until the answer is bracketed, then use
regula falsi (Illinois) in log-log space; every returned value was evaluated and met the
target, so the result is never above it.

:func:`calibrate` is the general search, for any non-increasing ``epsilon_of(x)``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from scipy import optimize, special

from .accountant import ACCOUNTANTS, check_delta, make_accountant
from .events import ComposedEvent, dpsgd_event, validate_step
from .prv import prv_epsilon_bounds

__all__ = ["calibrate", "get_noise_multiplier"]

MIN_NOISE_MULTIPLIER = 1e-3
MAX_NOISE_MULTIPLIER = 1e6
# PRV accuracy of the cheap proxy that steers the PRV search: its bounds are wide, but its
# point estimate is within about 0.3% of the fine upper bound at a tenth of the cost.
_PROXY_ACCURACY = {"relative_error": 0.1, "absolute_error": 1e-2}


@dataclass(frozen=True)
class _Result:
    x: float  # the answer: epsilon_of(x) <= target
    epsilon: float  # epsilon_of(x)
    slope: float  # d log eps / d log x near x (negative), from the last two evaluations
    evaluations: int


def calibrate(
    epsilon_of: Callable[[float], float],
    target: float,
    start: float,
    *,
    epsilon_tolerance: float = 0.01,
    lower: float = 0.0,
    upper: float = math.inf,
    slope: float = -1.0,
    max_evaluations: int = 100,
) -> float:
    """The smallest ``x`` in ``[lower, upper]`` with ``epsilon_of(x) <= target``.

    ``epsilon_of`` must be non-increasing in ``x > 0`` (more noise, less epsilon). The
    search starts at ``start``, extrapolates in log-log space with the hint ``slope``
    (``d log epsilon / d log x``) or the measured one until the answer is bracketed, then
    refines by regula falsi. The result is always a point that was evaluated and met the
    target, with ``epsilon_of(x) >= target * (1 - epsilon_tolerance)`` unless ``x == lower``.

    Raises:
        ValueError: if the target is not met at ``upper`` (it cannot be reached), or
            after ``max_evaluations``.
    """
    return _calibrate(
        epsilon_of, target, start, epsilon_tolerance=epsilon_tolerance, lower=lower, upper=upper,
        slope=slope, max_evaluations=max_evaluations,
    ).x


def _calibrate(
    epsilon_of: Callable[[float], float],
    target: float,
    start: float,
    *,
    epsilon_tolerance: float,
    lower: float,
    upper: float,
    slope: float,
    max_evaluations: int,
) -> _Result:
    if not (0.0 < target < math.inf):
        raise ValueError(f"target epsilon must be a finite number > 0; got {target!r}")
    if not 0.0 < epsilon_tolerance < 1.0:
        raise ValueError(f"epsilon_tolerance must be in (0, 1) (a relative tolerance, e.g. 0.01); got {epsilon_tolerance!r}")
    if not (0.0 <= lower < upper and lower <= start <= upper and start > 0):
        raise ValueError(f"need 0 <= lower <= start <= upper and start > 0; got {lower}, {start}, {upper}")
    floor = target * (1.0 - epsilon_tolerance)
    aim = math.log(target * (1.0 - epsilon_tolerance / 2.0))  # the middle of the window
    lo: tuple[float, float] | None = None  # (x, eps) with eps > target
    hi: tuple[float, float] | None = None  # (x, eps) with eps <= target
    last: list[tuple[float, float]] = []  # the evaluations, newest last
    stale = 0  # Illinois: +n when lo was kept n times in a row, -n for hi
    x = start
    for evaluations in range(1, max_evaluations + 1):
        eps = float(epsilon_of(x))
        if math.isnan(eps):
            raise ValueError(f"the accountant returned nan at {x}")
        last.append((x, eps))
        if eps <= target:
            if hi is None or x < hi[0]:
                hi = (x, eps)
            if eps >= floor or x <= lower:
                return _Result(x, eps, _slope(last, slope), evaluations)
            stale = stale - 1 if stale <= 0 else -1
        else:
            if x >= upper:
                raise ValueError(
                    f"the target epsilon {target} is not reached even at {upper:g} "
                    f"(epsilon there is {eps:.4g}): raise the target or change the other settings"
                )
            if lo is None or x > lo[0]:
                lo = (x, eps)
            stale = stale + 1 if stale >= 0 else 1
        if lo is not None and hi is not None:
            a, b = math.log(lo[0]), math.log(hi[0])
            if b - a < 1e-12:
                return _Result(hi[0], hi[1], _slope(last, slope), evaluations)
            x = _refine(a, lo[1], b, hi[1], aim, stale)
        elif hi is None:  # too little noise so far: go up
            x = min(upper, _extrapolate(x, eps, aim, _slope(last, slope), up=True))
        else:  # too much noise: go down
            x = max(lower, _extrapolate(x, eps, aim, _slope(last, slope), up=False))
    raise ValueError(f"calibration did not converge in {max_evaluations} evaluations (best: {hi})")


def _slope(points: Sequence[tuple[float, float]], default: float) -> float:
    """d log eps / d log x from the two newest finite, positive evaluations; ``default`` otherwise."""
    good = [(x, e) for x, e in points if 0 < e < math.inf and x > 0]
    if len(good) >= 2:
        (x1, e1), (x2, e2) = good[-2], good[-1]
        if x1 != x2:
            s = (math.log(e2) - math.log(e1)) / (math.log(x2) - math.log(x1))
            if -50.0 < s < -0.05:
                return s
    return default


def _extrapolate(x: float, eps: float, aim: float, slope: float, up: bool) -> float:
    """The next x on one side: follow the log-log line, at least 2% and at most 100x away."""
    if not 0 < eps < math.inf:
        return x * 4.0 if up else x / 4.0
    factor = math.exp((aim - math.log(eps)) / slope)
    factor = min(max(factor, 1.02), 100.0) if up else max(min(factor, 1 / 1.02), 0.01)
    return x * factor


def _refine(a: float, eps_a: float, b: float, eps_b: float, aim: float, stale: int) -> float:
    """Regula falsi (Illinois) on log eps - aim over log x in (a, b); bisection if it fails."""
    if not (0 < eps_a < math.inf and 0 < eps_b < math.inf):
        return math.exp((a + b) / 2)
    fa, fb = math.log(eps_a) - aim, math.log(eps_b) - aim
    # Illinois: halve the value at an end that was kept twice or more, to avoid stalling
    if stale >= 2:
        fb /= 2.0 ** (stale - 1)
    elif stale <= -2:
        fa /= 2.0 ** (-stale - 1)
    if fa > 0 > fb:
        c = b - fb * (b - a) / (fb - fa)
        width = b - a
        if a + 1e-3 * width < c < b - 1e-3 * width:
            return math.exp(c)
    return math.exp((a + b) / 2)


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an integer; got {value!r}")
    if int(value) < 0:
        raise ValueError(f"{name} must be >= 0; got {value!r}")
    return int(value)


def get_noise_multiplier(
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int | None = None,
    accountant: Any = "prv",
    epsilon_tolerance: float = 0.01,
    *,
    epochs: float | None = None,
    history: Iterable[Sequence[Any]] = (),
) -> float:
    """The smallest noise multiplier whose epsilon at ``target_delta`` is at most ``target_epsilon``.

    Args:
        target_epsilon, target_delta: the budget of the whole run (history included).
        sample_rate: the Poisson sampling rate ``q`` of the steps to calibrate.
        steps: the number of steps to calibrate; or ``epochs`` (steps = round(epochs / q)).
        accountant: "prv" (default) or "rdp", or an accountant instance (its kind and
            settings are used, not its history).
        epsilon_tolerance: relative: the result's epsilon is in
            ``[target_epsilon * (1 - epsilon_tolerance), target_epsilon]``.
        history: earlier ``(noise_multiplier, sample_rate, steps)`` segments of a run that
            continues (e.g. ``accountant.history``); they count against the budget.

    Returns:
        The noise multiplier; 0.0 if there are no steps to calibrate and the history
        alone meets the target.

    Raises:
        ValueError / TypeError: for invalid arguments, or a target that cannot be reached
            (``target_epsilon <= 0``, or the history alone already spends it).
    """
    target_epsilon = _check_target(target_epsilon)
    target_delta = check_delta(target_delta)
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps= or epochs= (steps = round(epochs / sample_rate))")
    _, sample_rate, _ = validate_step(1.0, sample_rate, 0)
    if epochs is not None:
        if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not 0 <= epochs < math.inf:
            raise ValueError(f"epochs must be a finite number >= 0; got {epochs!r}")
        steps = round(epochs / sample_rate)
    steps = _check_positive_int("steps", steps)
    tolerance = float(epsilon_tolerance)
    if not 0.0 < tolerance < 1.0:
        raise ValueError(f"epsilon_tolerance must be in (0, 1) (relative, e.g. 0.01); got {epsilon_tolerance!r}")
    kind, settings = _accountant_kind(accountant)
    prior = [_segment(i, segment) for i, segment in enumerate(history)]

    def epsilon_at(name: str, sigma: float | None) -> float:
        acc = make_accountant(name, **(settings if name == kind else {}))
        for segment in prior:
            acc.step(*segment)
        if sigma is not None:
            acc.step(sigma, sample_rate, steps)
        return acc.get_epsilon(target_delta)

    if prior:
        spent = epsilon_at(kind, None)
        if spent >= target_epsilon:
            raise ValueError(
                f"the history already spends epsilon {spent:.4g} ({kind}) of the target {target_epsilon:g} "
                f"at delta {target_delta:g}: no noise multiplier is enough; raise target_epsilon"
            )
    if steps == 0:
        return 0.0

    def rdp_eps(sigma: float) -> float:
        return epsilon_at("rdp", sigma)

    coarse = _calibrate(
        rdp_eps, target_epsilon, _initial_guess(target_epsilon, target_delta, sample_rate, steps),
        epsilon_tolerance=tolerance if kind == "rdp" else max(tolerance, 0.05),
        lower=MIN_NOISE_MULTIPLIER, upper=MAX_NOISE_MULTIPLIER, slope=-1.5, max_evaluations=100,
    )
    if kind == "rdp":
        return coarse.x

    def prv_estimate(sigma: float) -> float:  # cheap and close to the fine upper bound
        event = ComposedEvent(tuple(dpsgd_event(*seg) for seg in [*prior, (sigma, sample_rate, steps)]))
        with warnings.catch_warnings():  # a coarse grid's warnings are not the user's concern
            warnings.simplefilter("ignore", RuntimeWarning)
            return prv_epsilon_bounds(event, target_delta, **_PROXY_ACCURACY).estimate

    return _calibrate_with_proxy(
        lambda sigma: epsilon_at(kind, sigma), prv_estimate, target_epsilon, coarse.x,
        epsilon_tolerance=tolerance, slope=coarse.slope,
    ).x


def _calibrate_with_proxy(
    epsilon_of: Callable[[float], float],
    proxy: Callable[[float], float],
    target: float,
    start: float,
    *,
    epsilon_tolerance: float,
    slope: float,
) -> _Result:
    """:func:`_calibrate` of a slow ``epsilon_of`` steered by a cheap ``proxy`` for it.

    Search the proxy, scaled by ``ratio``, for the middle of the window; evaluate
    ``epsilon_of`` there; accept it if it is in the window, otherwise correct ``ratio`` to
    ``epsilon_of / proxy`` at that point and repeat. Usually one slow evaluation. Falls
    back to the plain search on ``epsilon_of`` after a few tries.
    """
    tol = epsilon_tolerance
    floor = target * (1.0 - tol)
    ratio, x, evaluations = 1.0, start, 0
    for _ in range(4):
        guess = _calibrate(
            lambda sigma: proxy(sigma) * ratio, target * (1.0 - tol / 4.0), x, epsilon_tolerance=tol / 2.0,
            lower=MIN_NOISE_MULTIPLIER, upper=MAX_NOISE_MULTIPLIER, slope=slope, max_evaluations=60,
        )
        x, slope = guess.x, guess.slope
        eps = float(epsilon_of(x))
        evaluations += guess.evaluations + 1
        if floor <= eps <= target:
            return _Result(x, eps, slope, evaluations)
        if not (0.0 < eps < math.inf and guess.epsilon > 0.0):
            break
        ratio *= eps / guess.epsilon
    return _calibrate(
        epsilon_of, target, x, epsilon_tolerance=tol, lower=MIN_NOISE_MULTIPLIER,
        upper=MAX_NOISE_MULTIPLIER, slope=slope, max_evaluations=60,
    )


def _segment(i: int, segment: Any) -> tuple[float, float, int]:
    if isinstance(segment, (str, bytes)) or not isinstance(segment, Sequence) or len(segment) != 3:
        raise TypeError(f"history[{i}] must be (noise_multiplier, sample_rate, steps); got {segment!r}")
    try:
        return validate_step(*segment)
    except (TypeError, ValueError) as e:
        raise type(e)(f"history[{i}]: {e}") from None


def _check_target(target_epsilon: object) -> float:
    if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, (int, float)):
        raise TypeError(f"target_epsilon must be a number; got {target_epsilon!r}")
    value = float(target_epsilon)
    if not 0.0 < value < math.inf:
        raise ValueError(
            f"target_epsilon must be a finite number > 0 (epsilon 0 would need infinite noise); got {target_epsilon!r}"
        )
    return value


def _accountant_kind(accountant: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(accountant, str):
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant {accountant!r}; choose one of {', '.join(ACCOUNTANTS)}")
        return accountant, {}
    name = getattr(type(accountant), "name", None)
    if name in ACCOUNTANTS and isinstance(accountant, ACCOUNTANTS[name]):
        settings = accountant.state_dict()["settings"]
        return name, dict(settings)
    raise TypeError(f"accountant must be one of {', '.join(ACCOUNTANTS)} or an accountant; got {accountant!r}")


def _initial_guess(epsilon: float, delta: float, q: float, steps: int) -> float:
    """A starting sigma from the CLT (mu-GDP) approximation of DP-SGD (Bu, Dong et al. 2020).

    ``mu = q sqrt(steps (exp(1 / sigma^2) - 1))``; the mu whose GDP curve meets
    (epsilon, delta) is solved for, then inverted for sigma. Only a guess: the search
    that follows needs no accuracy from it.
    """

    def log_delta(log_mu: float) -> float:
        mu = math.exp(log_mu)
        a = special.log_ndtr(-epsilon / mu + mu / 2)
        b = epsilon + special.log_ndtr(-epsilon / mu - mu / 2)
        return a + math.log(-math.expm1(min(b - a, -1e-300))) - math.log(delta)

    try:
        mu = math.exp(optimize.brentq(log_delta, math.log(1e-4), math.log(1e2), xtol=1e-3))
        guess = 1.0 / math.sqrt(math.log1p(mu * mu / (q * q * steps)))
    except (ValueError, ArithmeticError):  # not bracketed: fall back to a moments-accountant scale
        guess = q * math.sqrt(2.0 * steps * math.log(1.25 / delta)) / epsilon
    return min(max(guess, 0.1), 1e4)
