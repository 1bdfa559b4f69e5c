"""Accuracy of dpclip's PRV accountant over a randomised grid, against references.

For each case (q log-uniform in [1e-4, 1], sigma in [0.5, 10], steps log-uniform in
[1, 1e5], delta log-uniform in [1e-12, 1e-3]; every fourth case a 3-segment history)
it prints our [lower, upper] bounds, dp-accounting's PLD epsilon refined until two meshes
agree (``tests/_reference.py``), and the relative error of our reported upper bound.
Cases with epsilon > 50 are outside the accuracy contract and skipped. Sample-rate-1
cases also get the exact closed form. Run: ``python experiments/benchmarks/prv_accuracy.py [--cases N] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from accountants.events import ComposedEvent, dpsgd_event  # noqa: E402
from accountants.prv import prv_epsilon_bounds  # noqa: E402
from tests._reference import gaussian_epsilon, pld_epsilon  # noqa: E402


def cases(count: int, seed: int):
    rng = np.random.default_rng(seed)
    for i in range(count):
        parts = 3 if i % 4 == 3 else 1
        segments = tuple(
            (float(rng.uniform(0.5, 10.0)), float(10 ** rng.uniform(-4, 0)), int(10 ** rng.uniform(0, 5)))
            for _ in range(parts)
        )
        yield segments, float(10 ** rng.uniform(-12, -3))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=60)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    for segments, delta in cases(args.cases, args.seed):
        event = ComposedEvent(tuple(dpsgd_event(*s) for s in segments))
        start = time.perf_counter()
        b = prv_epsilon_bounds(event, delta)
        ms = 1e3 * (time.perf_counter() - start)
        if b.lower > 50:
            continue
        ref, converged = pld_epsilon(segments, delta)
        if len(segments) == 1 and segments[0][1] == 1.0:
            ref, converged = gaussian_epsilon(delta, segments[0][0], segments[0][2]), True
        rows.append(
            dict(segments=segments, delta=delta, lower=b.lower, upper=b.upper, reference=ref,
                 converged=converged, rel=(b.upper / ref - 1) if ref > 0 else math.nan,
                 abs=b.upper - ref, ms=ms)
        )
        if not args.json:
            r = rows[-1]
            print(f"{len(segments)} seg  delta={delta:8.1e}  ours=[{b.lower:9.5f}, {b.upper:9.5f}]  "
                  f"pld={ref:9.5f}{'' if converged else '*'}  rel={r['rel']:+.4f}  {ms:6.0f} ms", flush=True)
    conv = [r for r in rows if r["converged"]]
    big = [r for r in conv if r["reference"] >= 0.1]
    small = [r for r in conv if r["reference"] < 0.1]
    summary = dict(
        cases=len(rows), converged=len(conv),
        max_rel_upper_over_ref=max((r["rel"] for r in big), default=math.nan),
        min_rel_upper_over_ref=min((r["rel"] for r in big), default=math.nan),
        max_abs_small_eps=max((abs(r["abs"]) for r in small), default=math.nan),
        median_ms=float(np.median([r["ms"] for r in rows])) if rows else math.nan,
        max_ms=max((r["ms"] for r in rows), default=math.nan),
    )
    if args.json:
        print(json.dumps(dict(rows=rows, summary=summary), indent=1))
    else:
        print("* = dp-accounting's PLD did not converge between meshes (FFT rounding below delta ~ 1e-9)")
        print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
