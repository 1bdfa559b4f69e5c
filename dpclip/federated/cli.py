"""``dpclip federated``: DP-FedAvg on MNIST, Fashion-MNIST or a synthetic task, in one process.

::

    dpclip federated --dataset mnist --clients 100 --clients-per-round 10 --rounds 50 \\
        --partition dirichlet:0.5 --clip-controller quantile --target-epsilon 3 --delta 1e-5 [--json]

``add_parser(subparsers)`` registers the command (its handler is :func:`run`), so
``dpclip.cli`` needs two lines; :func:`main` runs it on its own (for tests and
``python -m dpclip.federated.cli``). Building the parser imports neither torch nor flwr.

``--json`` prints one JSON object with ``epsilon``, ``delta``, ``rounds``, ``test_accuracy``,
``clip_history`` (one float per round, or one list per round with per-layer clipping) and
the rest of the run's record; an infinite epsilon (no noise) is ``null``. Exit status: 0 on
success, 2 for invalid input (one line on stderr), 1 if training fails.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

from dpclip.cli import _finite, _fmt, _momentum, _number, _positive  # shared, torch-free

__all__ = ["add_parser", "run", "main", "CONTROLLERS"]

DATASETS = ("mnist", "fashion-mnist", "synthetic")  # repeated from .datasets so the parser needs no torch
CONTROLLERS = {  # CLI name -> class in dpclip.controllers
    "fixed": "Fixed",
    "quantile": "Quantile",
    "multiobjective": "MultiObjective",
    "autoclip": "PrivateAutoClip",
    "zclip": "PrivateZClip",
}
_EPILOG = (
    "q = clients-per-round / clients: every client joins each round independently with probability q; "
    "the noisy sum of clipped client updates is divided by the expected count q * clients. epsilon is "
    "user-level (one client = one unit). Data: mnist is fetched into $DPCLIP_DATA or ~/.cache/dpclip, "
    "fashion-mnist comes from the Debian package dataset-fashion-mnist (see dpclip train --help)."
)


# -- argument types (errors name the value and the fix) -----------------------------------------------
def _whole(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {low}; got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {low}; got {text}")
        return value

    return parse


def _nonnegative(text: str) -> float:
    value = _number(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (e.g. 1.0; 0 for no noise); got {text}")
    return value


def _unit_open(text: str) -> float:
    value = _number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1); got {text}")
    return value


def _partition(text: str) -> str:
    from .spec import parse_partition  # torch-free

    try:
        return str(parse_partition(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# -- the parser -----------------------------------------------------------------------------------------
def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``federated`` on ``subparsers`` (from ``add_subparsers``); returns the sub-parser."""
    p = subparsers.add_parser(
        "federated", help="DP-FedAvg simulation (user-level DP) on MNIST, Fashion-MNIST or synthetic data",
        description="Simulate DP-FedAvg (McMahan et al. 2018): Poisson client sampling, local SGD, clipped client "
                    "updates, Gaussian noise once per round, a server optimizer; reports the user-level epsilon.",
        epilog=_EPILOG)
    p.add_argument("--dataset", choices=DATASETS, default="mnist", help="default: mnist")
    p.add_argument("--data-dir", metavar="DIR", help="read MNIST/Fashion-MNIST IDX files from DIR")
    p.add_argument("--model", choices=("auto", "mlp", "cnn"), default="auto",
                   help="auto: cnn for images, mlp for synthetic (default)")
    p.add_argument("--clients", type=_whole(1), default=100, metavar="K", help="number of clients (default: 100)")
    p.add_argument("--clients-per-round", type=_positive, default=10.0, metavar="M",
                   help="EXPECTED clients per round; q = M / K (default: 10)")
    p.add_argument("--rounds", type=_whole(1), default=50, metavar="T", help="default: 50")
    p.add_argument("--local-epochs", type=_whole(1), default=1, metavar="E", help="default: 1")
    p.add_argument("--local-batch-size", type=_whole(1), default=32, metavar="B", help="default: 32")
    p.add_argument("--local-lr", type=_positive, default=0.1, metavar="LR", help="clients' SGD step (default: 0.1)")
    p.add_argument("--partition", type=_partition, default="iid", metavar="P",
                   help="iid | dirichlet:ALPHA | shards:K (default: iid)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--noise-multiplier", type=_nonnegative, metavar="S",
                        help="noise std / clip norm per round (clip statistics included)")
    budget.add_argument("--target-epsilon", type=_positive, metavar="E",
                        help="calibrate the noise multiplier so that --rounds rounds spend this epsilon")
    p.add_argument("--delta", type=float, default=1e-5, metavar="D",
                   help="default: 1e-5; must be below 1 / clients")
    p.add_argument("--clipping", choices=("flat", "per_layer"), default="flat", help="default: flat")
    p.add_argument("--clip-norm", type=_positive, default=1.0, metavar="C",
                   help="initial bound on a client update's L2 norm (per_layer: C / sqrt(layers) each; default: 1.0)")
    p.add_argument("--clip-controller", choices=tuple(CONTROLLERS), default="fixed", help="default: fixed")
    p.add_argument("--target-quantile", type=_unit_open, default=0.5, metavar="Q",
                   help="quantile controller: fraction of client updates left unclipped (default: 0.5)")
    p.add_argument("--clip-lr", type=_positive, default=0.2, metavar="ETA",
                   help="quantile controller: geometric step size (default: 0.2)")
    p.add_argument("--count-noise-multiplier", type=_positive, metavar="SC",
                   help="noise multiplier of the controller's statistics (default: the larger of expected clients "
                        "per round / 20 and 3 x the noise multiplier, so the aggregate keeps sigma x 1.06; must exceed "
                        "the noise multiplier)")
    p.add_argument("--server-optimizer", choices=("sgd", "adam"), default="sgd", help="default: sgd")
    p.add_argument("--server-lr", type=_positive, default=1.0, metavar="LR", help="default: 1.0")
    p.add_argument("--server-momentum", type=_momentum, default=0.0, metavar="M",
                   help="SGD momentum, or Adam's beta1 (default: 0.0; 0.9 trained much worse in "
                        "docs/results/federated.md)")
    p.add_argument("--local-dp-noise-multiplier", type=_nonnegative, metavar="S",
                   help="also run sample-level DP-SGD inside each client (make_private) with this noise multiplier")
    p.add_argument("--local-dp-max-grad-norm", type=_positive, default=1.0, metavar="C",
                   help="per-sample clip bound of the clients' DP-SGD (default: 1.0)")
    p.add_argument("--accountant", choices=("prv", "rdp"), default="prv", help="default: prv")
    p.add_argument("--client-path", choices=("auto", "vmap", "loop"), default="auto",
                   help="auto: vmap the clients with torch.func when the model allows (default)")
    p.add_argument("--secure-mode", action="store_true", help="draw the noise with SecureGaussianNoise")
    p.add_argument("--eval-every", type=_whole(0), default=0, metavar="N",
                   help="also evaluate every N rounds (default: only at the end)")
    p.add_argument("--train-subset", type=_whole(1), metavar="N",
                   help="use N random training examples (synthetic: generate N; default 6000)")
    p.add_argument("--threads", type=_whole(1), metavar="N", help="torch threads (default: torch's)")
    p.add_argument("--seed", type=_whole(0), default=0, metavar="N", help="default: 0")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None,
                     help="always show the progress bar (default: only on a terminal)")
    bar.add_argument("--no-progress", dest="progress", action="store_false", help="never show it")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(handler=run)
    return p


# -- the command ----------------------------------------------------------------------------------------
def _controller(args: argparse.Namespace, sigma: float = 0.0) -> Any:
    from .. import controllers

    cls = getattr(controllers, CONTROLLERS[args.clip_controller], None)
    if cls is None:
        raise ValueError(f"--clip-controller {args.clip_controller}: dpclip.controllers has no "
                         f"{CONTROLLERS[args.clip_controller]} in this build; use fixed or quantile")
    if args.clip_controller == "fixed":
        return cls()
    kwargs: dict[str, Any] = {}
    if args.count_noise_multiplier is not None:
        kwargs["count_noise_multiplier"] = args.count_noise_multiplier
    elif sigma > 0:  # with few clients per round, Andrew et al.'s B / 20 would take the whole budget
        kwargs["count_noise_multiplier"] = max(args.clients_per_round / 20.0, 3.0 * sigma)
    if args.clip_controller == "quantile":
        kwargs.update(target_unclipped_quantile=args.target_quantile, learning_rate=args.clip_lr)
    return cls(**kwargs)


def _check(args: argparse.Namespace) -> None:
    if args.clients_per_round > args.clients:
        raise ValueError(f"--clients-per-round {args.clients_per_round:g} exceeds --clients {args.clients}; "
                         f"use at most {args.clients} (it is the expected number of clients per round)")
    if not 0 < args.delta < 1 / args.clients:
        raise ValueError(f"--delta {args.delta:g} must be in (0, 1 / clients = {1 / args.clients:g}): a client is "
                         "the privacy unit, and delta >= 1 / clients allows releasing one client's data; e.g. 1e-5")
    if args.model == "cnn" and args.dataset == "synthetic":
        raise ValueError("--model cnn needs 28x28 images; use --model mlp (or auto) with --dataset synthetic")
    if args.clip_controller != "quantile":
        for flag, value, default in (("--target-quantile", args.target_quantile, 0.5), ("--clip-lr", args.clip_lr, 0.2)):
            if value != default:
                raise ValueError(f"{flag} applies to --clip-controller quantile; got --clip-controller "
                                 f"{args.clip_controller}")
    if args.clip_controller == "fixed" and args.count_noise_multiplier is not None:
        raise ValueError("--count-noise-multiplier applies to a controller that reads statistics; "
                         "--clip-controller fixed reads none")


def run(args: argparse.Namespace) -> int:
    """Run ``dpclip federated`` with parsed ``args``; print the result; return the exit status.

    Invalid input raises ``ValueError`` (``dpclip.cli.main`` prints it on one line and exits
    with 2); a failure during training prints one line and returns 1.
    """
    _check(args)
    import torch
    from accountants import get_noise_multiplier

    from .datasets import build_model, load
    from .fedavg import FedAvgConfig, LocalDP, simulate
    from .partitions import partition

    start = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    data = load(args.dataset, generator, data_dir=args.data_dir, train_subset=args.train_subset)
    model_name = args.model if args.model != "auto" else ("mlp" if args.dataset == "synthetic" else "cnn")
    model = build_model(model_name, data, generator)
    parts = partition(data.train_y, args.clients, args.partition, generator)
    q = args.clients_per_round / args.clients
    sigma = args.noise_multiplier
    if args.target_epsilon is not None:
        sigma = get_noise_multiplier(target_epsilon=args.target_epsilon, target_delta=args.delta, sample_rate=q,
                                     steps=args.rounds, accountant=args.accountant)
    controller = _controller(args, sigma)
    local_dp = None
    if args.local_dp_noise_multiplier is not None:
        local_dp = LocalDP(args.local_dp_noise_multiplier, args.local_dp_max_grad_norm)
    config = FedAvgConfig(
        rounds=args.rounds, clients_per_round=args.clients_per_round, local_epochs=args.local_epochs,
        local_batch_size=args.local_batch_size, local_lr=args.local_lr, noise_multiplier=sigma,
        clip=args.clip_norm, clipping=args.clipping, controller=controller,
        server_optimizer=args.server_optimizer, server_lr=args.server_lr, server_momentum=args.server_momentum,
        local_dp=local_dp, client_path=args.client_path, accountant=args.accountant, delta=args.delta,
        secure_mode=args.secure_mode, eval_every=args.eval_every,
    )
    # the controller's budget split is checked before any training
    from ..controllers import gradient_noise_multiplier

    sigma_c = controller.statistics_noise_multiplier(args.clients_per_round)
    try:
        gradient_noise_multiplier(sigma, sigma_c)
    except ValueError as e:
        raise ValueError(f"{e} (--count-noise-multiplier)") from None

    show = args.progress if args.progress is not None else sys.stderr.isatty()
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=args.rounds, desc="rounds", file=sys.stderr, dynamic_ncols=True, leave=False, unit="round")

    def on_round(rnd: int, info: dict[str, Any]) -> None:
        if bar is not None:
            clip = info["clip"]
            post = {"clip": f"{clip[0]:.3g}" if len(clip) == 1 else f"{math.sqrt(sum(c * c for c in clip)):.3g}"}
            if "test_accuracy" in info:
                post["acc"] = f"{100 * info['test_accuracy']:.1f}%"
            bar.set_postfix(post, refresh=False)
            bar.update(1)

    try:
        result = simulate(model, (data.train_x, data.train_y), parts, config, generator,
                          test=(data.test_x, data.test_y), on_round=on_round)
    except RuntimeError as e:
        print(f"dpclip: federated training failed: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    finally:
        if bar is not None:
            bar.close()

    flat = args.clipping == "flat"
    out = {
        "epsilon": _finite(result.epsilon),
        "delta": result.delta,
        "sample_epsilon": None if result.sample_epsilon is None else _finite(result.sample_epsilon),
        "rounds": result.rounds,
        "test_accuracy": result.test_accuracy,
        "test_loss": result.test_loss,
        "clip_history": [c[0] if flat else list(c) for c in result.clip_history],
        "accuracy_history": [list(a) for a in result.accuracy_history],
        "noise_multiplier": result.noise_multiplier,
        "gradient_noise_multiplier": result.gradient_noise_multiplier,
        "target_epsilon": args.target_epsilon,
        "sample_rate": result.sample_rate,
        "clients": result.clients,
        "clients_per_round": result.expected_clients_per_round,
        "participants": list(result.participants),
        "accountant": result.accountant,
        "accountant_history": [list(h) for h in result.accountant_history],
        "sample_accountant_history": None if result.sample_accountant_history is None
        else [list(h) for h in result.sample_accountant_history],
        "dataset": args.dataset,
        "model": model_name,
        "partition": args.partition,
        "clipping": args.clipping,
        "clip_controller": args.clip_controller,
        "server_optimizer": args.server_optimizer,
        "local_epochs": args.local_epochs,
        "client_path": result.client_path,
        "client_path_reason": result.client_path_reason,
        "rounds_per_second": result.rounds_per_second,
        "train_seconds": result.train_seconds,
        "seconds": time.perf_counter() - start,
        "seed": args.seed,
    }
    if args.json:
        print(json.dumps(out, default=_json_default))
        return 0
    clip = result.clip_history[-1] if result.clip_history else ()
    rows = [
        ("dataset", f"{args.dataset} ({len(data.train_y)} train / {len(data.test_y)} test), model {model_name}"),
        ("clients", f"{args.clients}, {args.partition}, expected {args.clients_per_round:g} per round (q = {q:.4g})"),
        ("rounds", f"{result.rounds} ({result.client_path}: {result.rounds_per_second:.3g} rounds/s)"),
        ("noise multiplier", f"{result.noise_multiplier:.4g} (aggregate's share {result.gradient_noise_multiplier:.4g})"),
        ("clip norm", f"{args.clip_controller}: last " + ", ".join(f"{c:.4g}" for c in clip)),
        ("test accuracy", f"{100 * result.test_accuracy:.2f}%" if result.test_accuracy is not None else "n/a"),
        ("epsilon", f"{_fmt(result.epsilon)} user-level (delta {result.delta:g}, {result.accountant})"),
    ]
    if result.sample_epsilon is not None:
        rows.append(("sample epsilon", f"{_fmt(result.sample_epsilon)} (clients' DP-SGD over all rounds)"))
    rows.append(("time", f"{out['seconds']:.1f} s"))
    width = max(len(k) for k, _ in rows) + 2
    for k, v in rows:
        print(f"{k:<{width}}{v}")
    return 0




def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


# -- standalone entry point -----------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    """``dpclip federated ARGS`` on its own: ``main(["--dataset", "synthetic", ...])`` -> exit status."""
    parser = _Parser(prog="dpclip")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    add_parser(sub)
    try:
        args = parser.parse_args(["federated", *(sys.argv[1:] if argv is None else argv)])
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        return args.handler(args)
    except (ValueError, TypeError, OSError) as e:
        print(f"dpclip: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
