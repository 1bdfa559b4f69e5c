"""Privacy events: small frozen descriptions of what a training run released.

An accountant is a function of an event. Events are data, never behaviour, in the
spirit of dp_accounting's ``DpEvent`` algebra; keeping them apart from the
accountants lets one history be accounted by several methods (RDP, PRV) and be
saved with ``state_dict``.

The algebra that dpclip needs:

* ``GaussianEvent(noise_multiplier)``: the Gaussian mechanism with noise std
  ``noise_multiplier`` times the L2 sensitivity.
* ``PoissonSampledEvent(sample_rate, event)``: ``event`` applied to a batch in
  which every record takes part independently with probability ``sample_rate``.
  Neighbouring datasets differ by adding or removing one record.
* ``SelfComposedEvent(event, count)``: ``event`` run ``count`` times (adaptively).
* ``ComposedEvent(events)``: the events run one after another (adaptively).

Every event normalises to a tuple of :class:`Segment` s (``to_segments``):
``count`` steps of a Poisson-subsampled Gaussian with one noise multiplier and one
sample rate. Both accountants work on segments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

__all__ = [
    "GaussianEvent",
    "PoissonSampledEvent",
    "SelfComposedEvent",
    "ComposedEvent",
    "Event",
    "Segment",
    "dpsgd_event",
    "to_segments",
    "validate_step",
]


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise TypeError(f"{name} must be a real number; got {value!r} of type {type(value).__name__}")
    value = float(value)
    if math.isnan(value):
        raise ValueError(f"{name} must be a number; got nan")
    return value


def validate_step(noise_multiplier: float, sample_rate: float, steps: int) -> tuple[float, float, int]:
    """Check one accounting step's arguments and return them as (float, float, int).

    Raises ``ValueError`` naming the value, the reason and the fix.
    """
    noise_multiplier = _check_real("noise_multiplier", noise_multiplier)
    if noise_multiplier < 0:
        raise ValueError(
            f"noise_multiplier must be >= 0 (the noise std divided by the sensitivity); got {noise_multiplier}"
        )
    sample_rate = _check_real("sample_rate", sample_rate)
    if not 0.0 < sample_rate <= 1.0:
        raise ValueError(
            f"sample_rate must be in (0, 1] (batch size / dataset size under Poisson sampling); got {sample_rate}"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) and not (hasattr(steps, "__index__")):
        raise TypeError(f"steps must be an integer; got {steps!r} of type {type(steps).__name__}")
    steps = int(steps)
    if steps < 0:
        raise ValueError(f"steps must be >= 0; got {steps}")
    return noise_multiplier, sample_rate, steps


@dataclass(frozen=True)
class GaussianEvent:
    """Gaussian mechanism: noise std = ``noise_multiplier`` x L2 sensitivity.

    ``noise_multiplier == 0`` is a non-private release (epsilon = inf).
    """

    noise_multiplier: float

    def __post_init__(self) -> None:
        validate_step(self.noise_multiplier, 1.0, 1)


@dataclass(frozen=True)
class PoissonSampledEvent:
    """``event`` on a Poisson sample: each record is in the batch with probability ``sample_rate``."""

    sample_rate: float
    event: "Event"

    def __post_init__(self) -> None:
        validate_step(0.0, self.sample_rate, 1)
        if not isinstance(self.event, GaussianEvent):
            raise TypeError(
                f"PoissonSampledEvent supports a GaussianEvent inside; got {type(self.event).__name__}"
            )


@dataclass(frozen=True)
class SelfComposedEvent:
    """``event`` composed with itself ``count`` times."""

    event: "Event"
    count: int

    def __post_init__(self) -> None:
        validate_step(0.0, 1.0, self.count)


@dataclass(frozen=True)
class ComposedEvent:
    """The events in ``events``, composed in order."""

    events: tuple["Event", ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "events", tuple(self.events))


Event = Union[GaussianEvent, PoissonSampledEvent, SelfComposedEvent, ComposedEvent]


@dataclass(frozen=True)
class Segment:
    """``steps`` steps of the Poisson-subsampled Gaussian mechanism.

    ``sample_rate == 1`` is the plain Gaussian mechanism (every record in every batch).
    """

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        validate_step(self.noise_multiplier, self.sample_rate, self.steps)


def dpsgd_event(noise_multiplier: float, sample_rate: float, steps: int = 1) -> SelfComposedEvent:
    """The event of ``steps`` DP-SGD steps with Poisson sampling."""
    return SelfComposedEvent(PoissonSampledEvent(sample_rate, GaussianEvent(noise_multiplier)), steps)


def to_segments(event: Event) -> tuple[Segment, ...]:
    """Normalise ``event`` to segments, one per distinct (noise_multiplier, sample_rate).

    Composition of privacy losses is commutative (RDP adds, PRV convolves), so steps
    with equal settings are merged wherever they occur; the order of first
    appearance is kept. Segments with zero steps are dropped. Raises ``TypeError``
    for anything that is not an Event.
    """
    steps: dict[tuple[float, float], int] = {}
    _walk(event, 1, steps)
    return tuple(Segment(sigma, q, n) for (sigma, q), n in steps.items() if n > 0)


def _walk(event: Event, count: int, steps: dict[tuple[float, float], int]) -> None:
    if isinstance(event, GaussianEvent):
        key = (float(event.noise_multiplier), 1.0)
    elif isinstance(event, PoissonSampledEvent):
        key = (float(event.event.noise_multiplier), float(event.sample_rate))
    elif isinstance(event, SelfComposedEvent):
        _walk(event.event, count * int(event.count), steps)
        return
    elif isinstance(event, ComposedEvent):
        for inner in event.events:
            _walk(inner, count, steps)
        return
    else:
        raise TypeError(f"not a privacy event: {event!r}; build one from accountants.events")
    steps[key] = steps.get(key, 0) + count
