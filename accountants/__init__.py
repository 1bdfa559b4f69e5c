"""accountants: privacy accounting for DP-SGD, torch-free (numpy and scipy only).

::

    from accountants import PRVAccountant, get_noise_multiplier
    acc = PRVAccountant()
    acc.step(noise_multiplier=1.1, sample_rate=0.004, steps=7500)
    acc.get_epsilon(delta=1e-5)
    get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.004, steps=7500)

This package never imports torch or dpclip.
"""

from .accountant import ACCOUNTANTS, PRVAccountant, RDPAccountant, make_accountant
from .calibrate import get_noise_multiplier
from .events import (
    ComposedEvent,
    Event,
    GaussianEvent,
    PoissonSampledEvent,
    Segment,
    SelfComposedEvent,
    dpsgd_event,
    to_segments,
)
from .prv import EpsilonBounds

__all__ = [
    "ACCOUNTANTS",
    "ComposedEvent",
    "EpsilonBounds",
    "Event",
    "GaussianEvent",
    "PRVAccountant",
    "PoissonSampledEvent",
    "RDPAccountant",
    "Segment",
    "SelfComposedEvent",
    "dpsgd_event",
    "get_noise_multiplier",
    "make_accountant",
    "to_segments",
]
