#!/usr/bin/env python
"""Accountant benchmark: epsilon and time of each accountant on the same cases.

One process runs every method on every case:

* dpclip's ``accountants.RDPAccountant`` and ``accountants.PRVAccountant``
  (``get_epsilon`` reports the PRV upper bound);
* dp-accounting's ``RdpAccountant`` and ``PLDAccountant`` (value discretisation
  interval 1e-4, the default, and optionally a refined 1e-5 one);
* prv-accountant's ``PRVAccountant`` with ``PoissonSubsampledGaussianMechanism``
  (eps_error 0.01, delta_error delta/1000; the upper bound is reported);
* Opacus's ``RDPAccountant`` and ``PRVAccountant`` (upper bound).

Every case is a history of segments ``(noise_multiplier, sample_rate, steps)`` of
the Poisson-subsampled Gaussian (add/remove-one neighbours) and a delta; the
calibration case asks each method's noise search for the sigma that reaches a
target epsilon.

Timing: every repeat builds a fresh accountant (so no per-instance cache helps),
composes the history and asks for epsilon. ``first ms`` is the first such call in
this process for that case (it pays for any module-level cache or lazy set-up);
``median ms`` is the median of the remaining repeats. Crashes are caught and
printed as ``error: ...``; a case a method cannot express prints ``n/a``. A call
that takes over 20 s is not repeated. Warnings and log records (WARNING and up)
that a method emits on its first call are counted in the note, with the first one.
The ``vs ref`` column is the relative difference to the reference, dp-accounting's
PLD at its default interval 1e-4; for the calibration case it shows the epsilon
that reference gives at each returned sigma.

    python experiments/benchmarks/accountants.py            # table
    python experiments/benchmarks/accountants.py --quick    # fewer repeats, no refined PLD
    python experiments/benchmarks/accountants.py --json out/accountants.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import signal
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Optional

Segment = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps)

# the accountants package lives at the repository root; make it importable when
# the script is run without an installed dpclip
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


class NotSupported(Exception):
    """The method cannot express this case (printed as n/a)."""


class CallTimeout(Exception):
    pass


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    name: str
    description: str
    delta: float
    segments: tuple[Segment, ...] = ()
    # calibration cases: find sigma for target_epsilon at (sample_rate, steps)
    target_epsilon: Optional[float] = None
    sample_rate: Optional[float] = None
    steps: Optional[int] = None
    note: str = ""  # printed in the legend

    @property
    def is_calibration(self) -> bool:
        return self.target_epsilon is not None


CASES: list[Case] = [
    Case("mnist", "q=256/60000 sigma=1.1 T=14062 (MNIST, 60 epochs)", 1e-5, ((1.1, 256 / 60000, 14062),)),
    Case("cifar-de", "q=4096/50000 sigma=3.0 T=2500 (De et al.-like)", 1e-5, ((3.0, 4096 / 50000, 2500),)),
    Case("opacus-mnist", "q=240/60000 sigma=0.7 T=11250 (Opacus MNIST example)", 1e-5, ((0.7, 240 / 60000, 11250),)),
    Case("q0.01", "q=0.01 sigma=1.0 T=10000", 1e-5, ((1.0, 0.01, 10000),)),
    Case(
        "small-delta",
        "q=256/60000 sigma=1.1 T=14062 (small delta)",
        1e-12,
        ((1.1, 256 / 60000, 14062),),
        note="dp-accounting's PLD is not a yardstick at this delta: across discretisation intervals "
        "(1e-3..1e-5), connect-the-dots on/off and tail truncation bounds it gives 4.10..4.89; "
        "the RDP value is a certified upper bound",
    ),
    Case("large-eps", "q=0.1 sigma=0.75 T=1000 (epsilon ~ 46)", 1e-5, ((0.75, 0.1, 1000),)),
    Case("small-eps", "q=0.001 sigma=5 T=1000", 1e-5, ((5.0, 0.001, 1000),)),
    Case(
        "hetero-3",
        "3 segments: (1.0, 0.01, 2000) (1.5, 0.02, 1000) (0.8, 0.005, 3000)",
        1e-5,
        ((1.0, 0.01, 2000), (1.5, 0.02, 1000), (0.8, 0.005, 3000)),
    ),
    Case(
        "calibrate",
        "sigma for eps=3 at q=256/60000 T=14062",
        1e-5,
        target_epsilon=3.0,
        sample_rate=256 / 60000,
        steps=14062,
    ),
]


# --------------------------------------------------------------------------- methods


@dataclass
class Method:
    name: str
    epsilon: Optional[Callable[[tuple[Segment, ...], float], tuple[float, str]]]
    calibrate: Optional[Callable[[float, float, float, int], tuple[float, str]]]
    available: bool = True
    why_unavailable: str = ""
    refined: bool = False  # only with --refined (the slow reference)


def _ours(kind: str) -> Method:
    name = f"dpclip {kind.upper()}"
    try:
        import accountants
        from accountants import get_noise_multiplier

        cls = getattr(accountants, "PRVAccountant" if kind == "prv" else "RDPAccountant")
    except Exception as exc:  # the package is being written; report, don't crash
        return Method(name, None, None, available=False, why_unavailable=_short(exc))

    def epsilon(segments, delta):
        acc = cls()
        for sigma, q, steps in segments:
            acc.step(noise_multiplier=sigma, sample_rate=q, steps=steps)
        return float(acc.get_epsilon(delta=delta)), ""

    def calibrate(target_epsilon, delta, q, steps):
        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=q,
            steps=steps,
            accountant=kind,
            epsilon_tolerance=0.01,
        )
        return float(sigma), ""

    return Method(name, epsilon, calibrate)


def _dp_accounting_event(segments):
    from dp_accounting import dp_event as E

    events = [E.SelfComposedDpEvent(E.PoissonSampledDpEvent(q, E.GaussianDpEvent(s)), n) for s, q, n in segments]
    return events[0] if len(events) == 1 else E.ComposedDpEvent(events)


def _dp_accounting(kind: str, interval: float = 1e-4, refined: bool = False) -> Method:
    name = "dp-accounting RDP" if kind == "rdp" else f"dp-accounting PLD {interval:g}"
    try:
        import dp_accounting
        from dp_accounting import pld, rdp
    except Exception as exc:
        return Method(name, None, None, available=False, why_unavailable=_short(exc))

    if kind == "rdp":
        make = rdp.RdpAccountant
    else:

        def make():
            return pld.PLDAccountant(value_discretization_interval=interval)

    def epsilon(segments, delta):
        return float(make().compose(_dp_accounting_event(segments)).get_epsilon(delta)), ""

    def calibrate(target_epsilon, delta, q, steps):
        sigma = dp_accounting.calibrate_dp_mechanism(
            make,
            lambda s: _dp_accounting_event(((s, q, steps),)),
            target_epsilon,
            delta,
            tol=1e-3,
        )
        return float(sigma), "tol=1e-3 in sigma"

    return Method(name, epsilon, calibrate, refined=refined)


def _prv_accountant() -> Method:
    name = "prv-accountant"
    try:
        import prv_accountant
        from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant
        from prv_accountant.dpsgd import find_noise_multiplier

        version = getattr(prv_accountant, "__version__", "")
        if not version:
            from importlib.metadata import version as _v

            version = _v("prv-accountant")
        name = f"prv-accountant {version}"
    except Exception as exc:
        return Method(name, None, None, available=False, why_unavailable=_short(exc))

    def epsilon(segments, delta):
        prvs = [PoissonSubsampledGaussianMechanism(noise_multiplier=s, sampling_probability=q) for s, q, _ in segments]
        counts = [n for _, _, n in segments]
        acc = PRVAccountant(
            prvs=prvs, max_self_compositions=counts, eps_error=0.01, delta_error=delta / 1000
        )
        low, est, up = acc.compute_epsilon(delta=delta, num_self_compositions=counts)
        return float(up), f"est {est:.4f} low {low:.4f}"

    def calibrate(target_epsilon, delta, q, steps):
        sigma = find_noise_multiplier(
            sampling_probability=q,
            num_steps=steps,
            target_epsilon=target_epsilon,
            target_delta=delta,
            eps_error=0.01,
        )
        return float(sigma), ""

    return Method(name, epsilon, calibrate)


def _opacus(kind: str) -> Method:
    name = f"opacus {kind.upper()}"
    try:
        import opacus
        from opacus.accountants import PRVAccountant, RDPAccountant
        from opacus.accountants.utils import get_noise_multiplier

        name = f"opacus {opacus.__version__} {kind.upper()}"
        cls = PRVAccountant if kind == "prv" else RDPAccountant
    except Exception as exc:
        return Method(name, None, None, available=False, why_unavailable=_short(exc))

    def epsilon(segments, delta):
        acc = cls()
        # what acc.step() builds after `steps` equal calls, without the Python loop
        acc.history = [(float(s), float(q), int(n)) for s, q, n in segments]
        return float(acc.get_epsilon(delta=delta)), ""

    def calibrate(target_epsilon, delta, q, steps):
        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=q,
            steps=steps,
            accountant=kind,
            epsilon_tolerance=0.01,
        )
        return float(sigma), ""

    return Method(name, epsilon, calibrate)


REFERENCE = "dp-accounting PLD 0.0001"


def build_methods() -> list[Method]:
    return [
        _ours("rdp"),
        _ours("prv"),
        _dp_accounting("rdp"),
        _dp_accounting("pld", 1e-4),
        _dp_accounting("pld", 1e-5, refined=True),
        _prv_accountant(),
        _opacus("rdp"),
        _opacus("prv"),
    ]


# --------------------------------------------------------------------------- running


@dataclass
class Result:
    case: str
    method: str
    status: str  # ok | n/a | error | unavailable
    value: Optional[float] = None  # epsilon, or sigma for a calibration case
    first_ms: Optional[float] = None
    median_ms: Optional[float] = None
    repeats: int = 0
    note: str = ""
    vs_ref: Optional[float] = None  # relative difference to the reference
    reference_epsilon: Optional[float] = None  # calibration: reference epsilon at the returned sigma


class _LogCapture(logging.Handler):
    """Collects WARNING+ log records (absl, opacus, ...) during one call, and keeps them off stderr."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"log {record.name}: {record.getMessage()}")

    def __enter__(self) -> "_LogCapture":
        root = logging.getLogger()
        self._saved = root.handlers[:]
        root.handlers = [self]
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger().handlers = self._saved


def _alarm(_signum, _frame):
    raise CallTimeout()


def _call(fn: Callable[[], tuple[float, str]], timeout_s: float) -> tuple[float, str, float]:
    """Run fn under a wall-clock limit; return (value, note, milliseconds)."""
    use_alarm = timeout_s > 0 and hasattr(signal, "SIGALRM")
    if use_alarm:
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        t0 = time.perf_counter()
        value, note = fn()
        ms = (time.perf_counter() - t0) * 1e3
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
    return value, note, ms


def _short(exc: BaseException, limit: int = 90) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_case(case: Case, method: Method, repeats: int, timeout_s: float) -> Result:
    if not method.available:
        return Result(case.name, method.name, "unavailable", note=method.why_unavailable)
    if case.is_calibration:
        if method.calibrate is None:
            return Result(case.name, method.name, "n/a")

        def fn():
            return method.calibrate(case.target_epsilon, case.delta, case.sample_rate, case.steps)

    else:
        if method.epsilon is None:
            return Result(case.name, method.name, "n/a")

        def fn():
            return method.epsilon(case.segments, case.delta)

    times: list[float] = []
    value, note = math.nan, ""
    caught: list[str] = []
    for i in range(repeats):
        try:
            with warnings.catch_warnings(record=True) as recorded, _LogCapture() as logged:
                warnings.simplefilter("always")
                value, note, ms = _call(fn, timeout_s)
            if i == 0:  # what the method said on the first call: warnings and log records
                caught = [f"{w.category.__name__}: {w.message}" for w in recorded] + logged.messages
        except NotSupported as exc:
            return Result(case.name, method.name, "n/a", note=str(exc))
        except CallTimeout:
            return Result(case.name, method.name, "error", note=f"error: timeout after {timeout_s:g} s")
        except Exception as exc:  # crashes of the reference libraries are results too
            return Result(case.name, method.name, "error", note=f"error: {_short(exc)}")
        times.append(ms)
        # a very slow method gets fewer repeats (one when a call takes over 20 s)
        if sum(times) > 20_000:
            break
    rest = times[1:] or times
    if caught:
        first = " ".join(caught[0].split())
        first = first if len(first) <= 70 else first[:67] + "..."
        warned = f"{len(caught)} warning{'s' if len(caught) > 1 else ''}: {first}"
        note = f"{note}; {warned}" if note else warned
    return Result(
        case.name,
        method.name,
        "ok",
        value=float(value),
        first_ms=times[0],
        median_ms=statistics.median(rest),
        repeats=len(times),
        note=note,
    )


def add_reference_columns(case: Case, results: list[Result]) -> None:
    """vs ref: relative difference to dp-accounting PLD at its default interval 1e-4.

    Not the refined 1e-5 one: at delta=1e-12 it reports a larger epsilon than the
    RDP upper bound (its truncated tail mass dominates), so it is a row, not the yardstick.
    """
    ok = {r.method: r for r in results if r.status == "ok"}
    ref = ok.get(REFERENCE)
    if case.is_calibration:
        # the epsilon each returned sigma really gives, by the same reference accountant
        try:
            from dp_accounting import pld

            for r in results:
                if r.status != "ok":
                    continue
                acc = pld.PLDAccountant(value_discretization_interval=1e-4)
                acc.compose(_dp_accounting_event(((r.value, case.sample_rate, case.steps),)))
                r.reference_epsilon = float(acc.get_epsilon(case.delta))
                r.vs_ref = r.reference_epsilon / case.target_epsilon - 1.0
        except Exception:  # pragma: no cover - reference missing
            pass
        return
    if ref is None or not ref.value:
        return
    for r in results:
        if r.status == "ok" and math.isfinite(r.value):
            r.vs_ref = r.value / ref.value - 1.0


# --------------------------------------------------------------------------- output


def _fmt(x: Optional[float], spec: str) -> str:
    return "" if x is None else format(x, spec)


def print_table(cases: list[Case], results: list[Result], file=sys.stdout) -> None:
    headers = ["case", "method", "epsilon", "first ms", "median ms", "vs ref", "note"]
    rows: list[list[str]] = []
    by_case: dict[str, list[Result]] = {}
    for r in results:
        by_case.setdefault(r.case, []).append(r)
    for case in cases:
        case_rows = by_case.get(case.name, [])
        label = case.name
        for r in case_rows:
            if r.status == "ok":
                value = f"{r.value:.4f}" if not case.is_calibration else f"s={r.value:.4f}"
                vs = _fmt(r.vs_ref, "+.2%")
                if case.is_calibration and r.reference_epsilon is not None:
                    vs = f"eps={r.reference_epsilon:.3f}"
                note = r.note
            elif r.status == "n/a":
                value, vs, note = "n/a", "", r.note
            elif r.status == "unavailable":
                value, vs, note = "n/a", "", f"unavailable ({r.note})"
            else:
                value, vs, note = "error", "", r.note
            rows.append(
                [label, r.method, value, _fmt(r.first_ms, ".1f"), _fmt(r.median_ms, ".1f"), vs, note]
            )
            label = ""
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]
    right = {2, 3, 4, 5}

    def line(cells):
        out = []
        for i, c in enumerate(cells):
            out.append(c.rjust(widths[i]) if i in right else c.ljust(widths[i]))
        return "  ".join(out).rstrip()

    print(line(headers), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    previous = None
    for row, r in zip(rows, [r for c in cases for r in by_case.get(c.name, [])]):
        if previous is not None and r.case != previous:
            print(file=file)
        print(line(row), file=file)
        previous = r.case
    print(file=file)
    print("cases:", file=file)
    for case in cases:
        print(f"  {case.name:<13} {case.description}, delta={case.delta:g}", file=file)
        if case.note:
            print(f"  {'':<13} note: {case.note}", file=file)
    print(
        f"vs ref: relative difference to {REFERENCE}; for the "
        "calibration case, eps = the reference epsilon at the returned sigma (target "
        f"{CASES[-1].target_epsilon}).",
        file=file,
    )


def environment() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    env = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    for dist in ["numpy", "scipy", "dp-accounting", "prv-accountant", "opacus", "torch", "dpclip"]:
        try:
            env[dist] = version(dist)
        except PackageNotFoundError:
            env[dist] = None
    return env


# --------------------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats and no refined PLD")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per method and case (default 5, 2 with --quick)")
    parser.add_argument(
        "--refined",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run dp-accounting PLD with value_discretization_interval 1e-5 (default: on unless --quick)",
    )
    parser.add_argument(
        "--json",
        nargs="?",
        const="-",
        default=None,
        metavar="PATH",
        help="write the results as JSON to PATH (no PATH: print JSON instead of the table)",
    )
    parser.add_argument("--cases", default=None, help="comma-separated case names (default: all)")
    parser.add_argument("--methods", default=None, help="comma-separated substrings of method names (default: all)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per call before it counts as an error")
    args = parser.parse_args(argv)

    repeats = args.repeats or (2 if args.quick else 5)
    refined = (not args.quick) if args.refined is None else args.refined

    cases = CASES
    if args.cases:
        wanted = {c.strip() for c in args.cases.split(",")}
        unknown = wanted - {c.name for c in CASES}
        if unknown:
            parser.error(f"unknown case(s) {sorted(unknown)}; choose from {[c.name for c in CASES]}")
        cases = [c for c in CASES if c.name in wanted]

    methods = [m for m in build_methods() if refined or not m.refined]
    if args.methods:
        keys = [k.strip().lower() for k in args.methods.split(",")]
        methods = [m for m in methods if any(k in m.name.lower() for k in keys)]

    to_stdout_json = args.json == "-"
    log = sys.stderr if to_stdout_json else sys.stdout
    env = environment()
    print(
        "environment: " + ", ".join(f"{k} {v}" for k, v in env.items() if v is not None),
        file=log,
    )
    print(f"repeats {repeats}, refined PLD {'on' if refined else 'off'}, timeout {args.timeout:g} s per call", file=log)
    print(file=log)

    results: list[Result] = []
    for case in cases:
        case_results = [run_case(case, m, repeats, args.timeout) for m in methods]
        add_reference_columns(case, case_results)
        results.extend(case_results)
        if not to_stdout_json:
            print(f"  done {case.name}", file=sys.stderr, flush=True)

    payload = {
        "environment": env,
        "repeats": repeats,
        "refined": refined,
        "cases": [asdict(c) for c in cases],
        "results": [asdict(r) for r in results],
    }
    if to_stdout_json:
        json.dump(payload, sys.stdout, indent=2, default=str)
        print()
    else:
        print_table(cases, results)
        if args.json:
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with open(args.json, "w") as fh:
                json.dump(payload, fh, indent=2, default=str)
            print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
