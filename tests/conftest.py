"""Shared pytest set-up.

* matplotlib draws off-screen (plots are written to files by the CLI tests).
* hypothesis: no per-example deadline (timings on a shared 2-core CI machine vary,
  and the first call of an accountant may build caches); under CI=true the
  examples are derandomised so that a failure reproduces.

Markers (declared in pyproject.toml): ``slow`` and ``reference`` (compares against
dp-accounting, prv-accountant or opacus).

Fixture ``one_thread``: one torch thread for the test (restored afterwards); modules that train
small models use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is a dev extra; tests that need it import it themselves
    pass
else:
    settings.register_profile("dev", deadline=None)
    settings.register_profile(
        "ci",
        deadline=None,
        derandomize=True,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.load_profile(
        os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev")
    )


@pytest.fixture
def one_thread():
    """Small models on a shared CPU: one torch thread is faster and steadier than a contended pool."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

