"""Shared pytest set-up.

* matplotlib draws off-screen (plots are written to files by the CLI tests).
* hypothesis: no per-example deadline (timings on a shared 2-core CI machine vary,
  and the first call of an accountant may build caches); under CI=true the
  examples are derandomised so that a failure reproduces.

Markers (declared in pyproject.toml): ``slow`` and ``reference`` (compares against
dp-accounting, prv-accountant or opacus).
"""

from __future__ import annotations

import os

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
