"""Accountants: a record of the DP-SGD steps that were run, and epsilon / delta queries on it.

An accountant is thin: it keeps the history ``[(noise_multiplier, sample_rate, steps), ...]``
and answers ``get_epsilon(delta)`` / ``get_delta(epsilon)`` by handing the history, as an
event (:mod:`accountants.events`), to a pure function (:mod:`accountants.rdp` or
:mod:`accountants.prv`). Both accountants record the same history; they differ only in how
they bound the privacy loss of it.

* :class:`PRVAccountant`: numerical composition of privacy random variables (Gopi, Lee,
  Wutschitz 2021) with explicit error bounds; ``get_epsilon`` returns the rigorous upper
  bound. The default: tight (RDP over-states epsilon by about 8-12% on DP-SGD).
* :class:`RDPAccountant`: Renyi DP of the Poisson-subsampled Gaussian (Mironov, Talwar,
  Zhang 2019); an upper bound, cheap, and the usual conservative fallback.

Example::

    acc = PRVAccountant()
    acc.step(noise_multiplier=1.1, sample_rate=0.004, steps=7500)
    acc.get_epsilon(delta=1e-5)          # about 2.4
    state = acc.state_dict()             # JSON-serialisable; resuming never resets epsilon

A noise multiplier of 0 is a non-private release: ``get_epsilon`` is ``inf`` and
``get_delta(epsilon)`` adds the probability ``1 - prod (1 - q)^steps`` that the record was
ever sampled by such a step (such steps are (0, that)-DP; basic composition).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np

from .events import ComposedEvent, dpsgd_event, validate_step
from .prv import DEFAULT_ABSOLUTE_ERROR, DEFAULT_RELATIVE_ERROR, EpsilonBounds, prv_delta, prv_epsilon_bounds
from .rdp import DEFAULT_ORDERS, compute_rdp, rdp_to_delta, rdp_to_epsilon

__all__ = [
    "ACCOUNTANTS",
    "PRVAccountant",
    "RDPAccountant",
    "check_delta",
    "check_epsilon",
    "make_accountant",
]

STATE_VERSION = 1
_CACHE_SIZE = 64

History = list[tuple[float, float, int]]


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number; got {value!r} of type {type(value).__name__}")
    return float(value)


def check_delta(delta: object) -> float:
    """Return ``delta`` as a float; raise ``ValueError`` unless ``0 < delta < 1``."""
    value = _real("delta", delta)
    if not 0.0 < value < 1.0:
        raise ValueError(
            f"delta must be in (0, 1), typically below 1/dataset_size (e.g. 1e-5); got {delta!r}"
        )
    return value


def check_epsilon(epsilon: object, name: str = "epsilon") -> float:
    """Return ``epsilon`` as a float; raise ``ValueError`` unless it is finite and ``>= 0``."""
    value = _real(name, epsilon)
    if not 0.0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0 (e.g. 3.0); got {epsilon!r}")
    return value


def _positive(name: str, value: object) -> float:
    x = _real(name, value)
    if not 0.0 < x < math.inf:
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")
    return x


class _Accountant(abc.ABC):
    """History, merging, caching and state for both accountants; subclasses do the maths."""

    name: ClassVar[str]

    def __init__(self) -> None:
        self._history: History = []
        self._cache: dict[tuple[str, float], Any] = {}

    # -- recording ---------------------------------------------------------------------------
    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> "_Accountant":
        """Record ``steps`` DP-SGD steps with Poisson sampling rate ``sample_rate``.

        Consecutive calls with equal settings merge into one history entry; zero steps
        record nothing. Returns ``self`` so calls can be chained.

        Raises:
            ValueError / TypeError: for a negative noise multiplier, a sample rate outside
                (0, 1] or a negative / non-integer number of steps (nothing is recorded).
        """
        sigma, q, n = validate_step(noise_multiplier, sample_rate, steps)
        if n == 0:
            return self
        if self._history and self._history[-1][:2] == (sigma, q):
            self._history[-1] = (sigma, q, self._history[-1][2] + n)
        else:
            self._history.append((sigma, q, n))
        self._cache.clear()
        return self

    @property
    def history(self) -> History:
        """A copy of the record: ``[(noise_multiplier, sample_rate, steps), ...]`` in order."""
        return list(self._history)

    @property
    def event(self) -> ComposedEvent:
        """The history as a privacy event: one ``dpsgd_event`` per entry."""
        return ComposedEvent(tuple(dpsgd_event(s, q, n) for s, q, n in self._history))

    def __len__(self) -> int:
        """The total number of steps recorded."""
        return sum(n for _, _, n in self._history)

    def __bool__(self) -> bool:  # an accountant is an object, not a container: never falsy
        return True

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._settings_repr()}steps={len(self)}, segments={len(self._history)})"

    @classmethod
    def mechanism(cls) -> str:
        """The accountant's name, "prv" or "rdp" (Opacus's ``IAccountant.mechanism``)."""
        return cls.name

    # -- queries -----------------------------------------------------------------------------
    def get_epsilon(self, delta: float) -> float:
        """The epsilon of the whole history at ``delta`` (an upper bound); 0 for no steps."""
        delta = check_delta(delta)
        return self._cached(("epsilon", delta), lambda: self._epsilon(delta))

    def get_delta(self, epsilon: float) -> float:
        """The delta of the whole history at ``epsilon`` (an upper bound); 0 for no steps."""
        epsilon = check_epsilon(epsilon)
        return self._cached(("delta", epsilon), lambda: self._delta(epsilon))

    def get_privacy_spent(self, *, delta: float) -> tuple[float, float | None]:
        """Opacus's name: ``(epsilon, best Renyi order)`` for RDP, ``(epsilon, None)`` for PRV.

        Opacus's ``examples/mnist.py`` prints ``engine.accountant.get_privacy_spent(delta=...)``
        after every epoch; the same line runs here. :meth:`get_epsilon` is the dpclip name.
        """
        return self.get_epsilon(delta), None

    def _cached(self, key: tuple[str, float], compute: Any) -> Any:
        if key not in self._cache:
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()
            self._cache[key] = compute()
        return self._cache[key]

    def _split(self) -> tuple[ComposedEvent | None, float]:
        """(event of the noisy entries or None, probability a zero-noise step sampled the record)."""
        noisy = tuple(dpsgd_event(s, q, n) for s, q, n in self._history if s > 0)
        log_unsampled = sum(n * math.log1p(-q) if q < 1 else -math.inf for s, q, n in self._history if s == 0)
        return (ComposedEvent(noisy) if noisy else None), -math.expm1(log_unsampled)

    def _epsilon(self, delta: float) -> float:
        event, p_leak = self._split()
        if p_leak > 0:
            return math.inf
        return 0.0 if event is None else self._event_epsilon(event, delta)

    def _delta(self, epsilon: float) -> float:
        event, p_leak = self._split()
        delta = 0.0 if event is None else self._event_delta(event, epsilon)
        return min(1.0, delta + p_leak)

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The accountant's state as a plain, JSON-serialisable dict.

        ``{"mechanism": "prv", "version": 1, "history": [[sigma, q, steps], ...],
        "settings": {...}}``. The keys ``history`` and ``mechanism`` are Opacus's.
        """
        return {
            "mechanism": self.name,
            "version": STATE_VERSION,
            "history": [[s, q, n] for s, q, n in self._history],
            "settings": self._settings(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any], *, convert: bool = False) -> None:
        """Replace the history (and settings) with those in ``state_dict``.

        The state is validated completely before anything changes. A state saved by the
        other kind of accountant is refused unless ``convert=True``: the history is the
        same data, so converting is sound, but the reported epsilon then changes at the
        resume (PRV usually reports less than RDP), which is easy to mistake for a reset.
        Settings (RDP orders, PRV error bounds) are restored from a state of the same
        kind, so a resumed accountant reports exactly what the saved one did; on
        ``convert`` this accountant keeps its own settings. Opacus accountant states
        (``{"history": ..., "mechanism": ...}``) load too.

        Raises:
            ValueError / TypeError: for a malformed state, an unknown version or mechanism,
                or a state of the other accountant without ``convert=True``.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"state_dict must be a mapping as returned by state_dict(); got {type(state_dict).__name__}"
            )
        missing = [k for k in ("mechanism", "history") if k not in state_dict]
        if missing:
            raise ValueError(
                f"accountant state is missing {', '.join(map(repr, missing))}; pass the dict returned by "
                "an accountant's state_dict()"
            )
        mechanism = state_dict["mechanism"]
        if mechanism not in ACCOUNTANTS:
            raise ValueError(
                f"accountant state has mechanism {mechanism!r}; this version knows {sorted(ACCOUNTANTS)}"
            )
        version = state_dict.get("version", STATE_VERSION)
        if version != STATE_VERSION:
            raise ValueError(
                f"accountant state has version {version!r}; this version of dpclip reads version "
                f"{STATE_VERSION}: upgrade dpclip"
            )
        if mechanism != self.name and not convert:
            raise ValueError(
                f"cannot load a {mechanism!r} accountant state into {type(self).__name__} ({self.name!r}): "
                f"create {ACCOUNTANTS[mechanism].__name__}() to resume with the same accountant, or pass "
                f"convert=True to account the same history with {self.name!r} (the reported epsilon changes)"
            )
        history = state_dict["history"]
        if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
            raise TypeError("accountant state 'history' must be a list of [noise_multiplier, sample_rate, steps]")
        entries: History = []
        for i, entry in enumerate(history):
            if isinstance(entry, (str, bytes)) or not isinstance(entry, Sequence) or len(entry) != 3:
                raise ValueError(
                    f"accountant state history[{i}] must be [noise_multiplier, sample_rate, steps]; got {entry!r}"
                )
            try:
                entries.append(validate_step(*entry))
            except (TypeError, ValueError) as e:
                raise type(e)(f"accountant state history[{i}]: {e}") from None
        restored = self._settings()
        if mechanism == self.name:
            settings = state_dict.get("settings", restored)
            if not isinstance(settings, Mapping):
                raise TypeError(f"accountant state 'settings' must be a dict; got {type(settings).__name__}")
            restored = self._check_settings(settings)

        self._apply_settings(restored)
        self._history = []
        for entry in entries:  # re-merge: a hand-written history may repeat settings
            self.step(*entry)
        self._cache.clear()

    # -- per-accountant ----------------------------------------------------------------------
    @abc.abstractmethod
    def _event_epsilon(self, event: ComposedEvent, delta: float) -> float:
        """Implemented by each accountant."""

    @abc.abstractmethod
    def _event_delta(self, event: ComposedEvent, epsilon: float) -> float:
        """Implemented by each accountant."""

    @abc.abstractmethod
    def _settings(self) -> dict[str, Any]:
        """Implemented by each accountant."""

    @abc.abstractmethod
    def _check_settings(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        """Implemented by each accountant."""

    @abc.abstractmethod
    def _apply_settings(self, settings: Mapping[str, Any]) -> None:
        """Implemented by each accountant."""

    def _settings_repr(self) -> str:
        return ""


class RDPAccountant(_Accountant):
    """Renyi-DP accountant for DP-SGD with Poisson sampling (an upper bound on epsilon).

    Args:
        orders: the Renyi orders (> 1) over which the conversion to (epsilon, delta) is
            optimised; ``accountants.rdp.DEFAULT_ORDERS`` by default.
        fractional: how fractional orders are summed: ``"dp_accounting"`` (the default:
            equal to dp-accounting's RdpAccountant, a valid but at small fractional orders
            loose bound) or ``"exact"`` (the signed series: the true RDP, never above it).
            See :mod:`accountants.rdp`.
    """

    name = "rdp"

    def __init__(self, orders: Sequence[float] = DEFAULT_ORDERS, fractional: str = "dp_accounting") -> None:
        super().__init__()
        self._apply_settings(self._check_settings({"orders": orders, "fractional": fractional}))

    @property
    def fractional(self) -> str:
        return self._fractional

    @property
    def orders(self) -> tuple[float, ...]:
        return self._orders

    def _rdp(self, event: ComposedEvent) -> np.ndarray:
        # The RDP vector serves every delta and epsilon query on this history.
        return self._cached(
            ("rdp", 0.0), lambda: np.asarray(compute_rdp(event, self._orders, fractional=self._fractional), dtype=float)
        )

    def _event_epsilon(self, event: ComposedEvent, delta: float) -> float:
        return float(rdp_to_epsilon(self._orders, self._rdp(event), delta)[0])

    def get_privacy_spent(self, *, delta: float, orders: Sequence[float] | None = None,
                          alphas: Sequence[float] | None = None) -> tuple[float, float | None]:
        """``(epsilon, best order)`` at ``delta``, as Opacus's ``RDPAccountant.get_privacy_spent``.

        ``orders`` (Opacus: ``alphas``) overrides this accountant's orders for this query only.
        The best order is None when no noisy step was taken (epsilon 0 or infinite).
        """
        delta = check_delta(delta)
        grid = orders if orders is not None else alphas
        event, p_leak = self._split()
        if event is None:
            return 0.0, None
        if p_leak > 0:
            return math.inf, None
        if grid is None:  # this accountant's orders: the cached RDP vector get_epsilon uses
            eps, order = rdp_to_epsilon(self._orders, self._rdp(event), delta)
        else:
            values = tuple(_real("orders[i]", a) for a in grid)
            eps, order = rdp_to_epsilon(values, compute_rdp(event, values, fractional=self._fractional), delta)
        return float(eps), float(order)

    def _event_delta(self, event: ComposedEvent, epsilon: float) -> float:
        return float(rdp_to_delta(self._orders, self._rdp(event), epsilon)[0])

    def _settings(self) -> dict[str, Any]:
        return {"orders": list(self._orders), "fractional": self._fractional}

    def _check_settings(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        orders = settings.get("orders", DEFAULT_ORDERS)
        if isinstance(orders, (str, bytes)) or not isinstance(orders, (Sequence, np.ndarray)) or len(orders) == 0:
            raise ValueError(f"orders must be a non-empty sequence of numbers > 1; got {orders!r}")
        values = tuple(_real("orders[i]", a) for a in orders)
        bad = [a for a in values if not 1.0 < a < math.inf]
        if bad:
            raise ValueError(f"every Renyi order must be a finite number > 1; got {bad[:3]}")
        fractional = settings.get("fractional", "dp_accounting")
        if fractional not in ("dp_accounting", "exact"):
            raise ValueError(f"fractional must be 'dp_accounting' or 'exact'; got {fractional!r}")
        return {"orders": values, "fractional": fractional}

    def _apply_settings(self, settings: Mapping[str, Any]) -> None:
        self._orders = tuple(settings["orders"])
        self._fractional = settings["fractional"]
        self._cache.clear()

    def _settings_repr(self) -> str:
        out = "" if self._orders == tuple(DEFAULT_ORDERS) else f"orders=<{len(self._orders)}>, "
        return out + ("" if self._fractional == "dp_accounting" else f"fractional={self._fractional!r}, ")


class PRVAccountant(_Accountant):
    """Privacy-random-variable accountant (Gopi, Lee, Wutschitz 2021) with error bounds.

    ``get_epsilon`` returns the rigorous upper bound; ``get_epsilon_bounds`` all three.

    Args:
        relative_error, absolute_error: the target accuracy of the numerical composition:
            the bounds are at most ``max(relative_error * epsilon, absolute_error)`` apart, so the
            reported upper bound is within ``relative_error`` of the exact epsilon.
    """

    name = "prv"

    def __init__(
        self, relative_error: float = DEFAULT_RELATIVE_ERROR, absolute_error: float = DEFAULT_ABSOLUTE_ERROR
    ) -> None:
        super().__init__()
        self._apply_settings(
            self._check_settings({"relative_error": relative_error, "absolute_error": absolute_error})
        )

    @property
    def relative_error(self) -> float:
        return self._relative_error

    @property
    def absolute_error(self) -> float:
        return self._absolute_error

    def get_epsilon_bounds(self, delta: float) -> EpsilonBounds:
        """``EpsilonBounds(lower, estimate, upper)`` with ``lower <= epsilon <= upper`` at ``delta``."""
        delta = check_delta(delta)
        return self._cached(("bounds", delta), lambda: self._bounds(delta))

    def _bounds(self, delta: float) -> EpsilonBounds:
        event, p_leak = self._split()
        if p_leak > 0:
            return EpsilonBounds(math.inf, math.inf, math.inf)
        if event is None:
            return EpsilonBounds(0.0, 0.0, 0.0)
        return prv_epsilon_bounds(event, delta, **self._settings())

    def _event_epsilon(self, event: ComposedEvent, delta: float) -> float:
        return float(self.get_epsilon_bounds(delta).upper)

    def _event_delta(self, event: ComposedEvent, epsilon: float) -> float:
        return float(prv_delta(event, epsilon, **self._settings()))

    def _settings(self) -> dict[str, Any]:
        return {"relative_error": self._relative_error, "absolute_error": self._absolute_error}

    def _check_settings(self, settings: Mapping[str, Any]) -> dict[str, Any]:
        rel = settings.get("relative_error", DEFAULT_RELATIVE_ERROR)
        ab = settings.get("absolute_error", DEFAULT_ABSOLUTE_ERROR)
        return {"relative_error": _positive("relative_error", rel), "absolute_error": _positive("absolute_error", ab)}

    def _apply_settings(self, settings: Mapping[str, Any]) -> None:
        self._relative_error = float(settings["relative_error"])
        self._absolute_error = float(settings["absolute_error"])
        self._cache.clear()

    def _settings_repr(self) -> str:
        if (self._relative_error, self._absolute_error) == (DEFAULT_RELATIVE_ERROR, DEFAULT_ABSOLUTE_ERROR):
            return ""
        return f"relative_error={self._relative_error}, absolute_error={self._absolute_error}, "


ACCOUNTANTS: Mapping[str, type[_Accountant]] = MappingProxyType({"prv": PRVAccountant, "rdp": RDPAccountant})
"""The accountants by name (read-only)."""


def make_accountant(name: str = "prv", **kwargs: Any) -> _Accountant:
    """A fresh accountant by name: ``"prv"`` or ``"rdp"``; ``kwargs`` go to its constructor."""
    try:
        cls = ACCOUNTANTS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown accountant {name!r}; choose one of {', '.join(ACCOUNTANTS)}") from None
    return cls(**kwargs)
