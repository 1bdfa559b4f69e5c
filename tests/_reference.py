"""Independent references for the accountant tests (test-only dependencies).

* ``gaussian_epsilon`` / ``gaussian_delta``: the exact privacy curve of N
  compositions of the Gaussian mechanism (sample rate 1), a Gaussian mechanism with
  mu = sqrt(N) / sigma (Balle & Wang 2018, Theorem 8), in closed form.
* ``pld_epsilon``: dp-accounting's PLD accountant (connect-the-dots, pessimistic),
  refined until two discretisations agree.
"""

from __future__ import annotations

import math

from scipy import optimize, special


def gaussian_delta(epsilon: float, sigma: float, steps: int) -> float:
    mu = math.sqrt(steps) / sigma
    # delta = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2), the second term in log space
    a = special.log_ndtr(-epsilon / mu + mu / 2)
    b = epsilon + special.log_ndtr(-epsilon / mu - mu / 2)
    return math.exp(a) * -math.expm1(b - a) if b < a else 0.0


def gaussian_epsilon(delta: float, sigma: float, steps: int) -> float:
    mu = math.sqrt(steps) / sigma
    if gaussian_delta(0.0, sigma, steps) <= delta:
        return 0.0
    hi = 1.0
    while gaussian_delta(hi, sigma, steps) > delta:
        hi *= 2
    return optimize.brentq(lambda e: math.log(gaussian_delta(e, sigma, steps)) - math.log(delta), 0.0, hi, xtol=1e-12, rtol=1e-13)


def pld_epsilon(segments, delta: float, tolerance: float = 2e-3):
    """dp-accounting PLD epsilon, refined until two meshes agree; returns (epsilon, converged).

    The mesh starts at dp-accounting's default (1e-4) and is refined relative to the
    answer (small epsilons need a mesh far below 1e-4). Below delta ~ 1e-9 the PLD's
    FFT rounding makes its answer scatter by about 1% between meshes, so it may
    report ``converged=False`` there.
    """
    from dp_accounting.pld import privacy_loss_distribution as pld_lib

    def at(vdi: float) -> float:
        pld = None
        for sigma, q, steps in segments:
            one = pld_lib.from_gaussian_mechanism(sigma, sampling_prob=q, value_discretization_interval=vdi).self_compose(steps)
            pld = one if pld is None else pld.compose(one)
        return pld.get_epsilon_for_delta(delta)

    vdi = 1e-4
    previous = at(vdi)
    for _ in range(3):
        vdi = min(vdi / 4, max(previous, 1e-3) / 300)
        value = at(vdi)
        if abs(value - previous) <= tolerance * max(value, 1e-2):
            return value, True
        previous = value
    return previous, False
