"""Batch clipping (BC) and adaptive layer-wise clipping (ALC) on Fashion-MNIST (Nguyen et al. 2023; anchors.md 6.3).

The claim: under batch clipping a ResNet with BatchNorm trains privately (the unit clipped
is a micro-batch's mean gradient, so BatchNorm's mixing of examples is allowed), where
individual (per-example) clipping cannot use BatchNorm and must use GroupNorm. Methods:

  bc          resnet18-bn, clipping batch (micro-batch units of BATCH_CLIP_SIZE, sensitivity 2C)
  bc-alc      bc with one threshold per layer moved by dpclip's Quantile controller (privatised counts)
  ic          resnet18 (GroupNorm), clipping flat (per-example, sensitivity C)
  ic-alc      resnet18 (GroupNorm), clipping adaptive_layerwise (per-example, per-layer, Quantile)
  bc-alc-fixed, ic-alc-fixed   the same with clip controller quantile-fixed-total: per-layer thresholds
              shaped by the privatised counts, their root sum of squares held at C (closer to the paper's ALC)
  nonprivate  resnet18-bn, sigma = 0 and C = 1e6 (the whole batch is one unit): plain SGD, for scale

Every private cell calibrates sigma for its epsilon (delta 1e-5, PRV) over the planned steps.
The compute budget (a shared 2-core CPU) sets the size: ResNet-18 layout at width 8
(176k parameters), a fixed random 15,000-example training subset, 2 epochs, expected batch 512.

Usage (from the repository root; each cell is one `dpclip.train.train` run, the code behind `dpclip train`):
  nice -n 10 .venv/bin/python experiments/reproduce/batch_clipping.py cell --method bc --epsilon 3 --seed 0
  nice -n 10 .venv/bin/python experiments/reproduce/batch_clipping.py grid --seeds 0 1 2   # skips cells done
  nice -n 10 .venv/bin/python experiments/reproduce/batch_clipping.py tune                 # the short lr tune
Writes docs/results/batch_clipping/<cell>/ (result.json, metrics.csv, curves.png, summary.json; the
checkpoint is deleted) and prints the summary as JSON. The report:
  .venv/bin/python experiments/reproduce/batch_clipping_report.py
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from dpclip.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "results" / "batch_clipping"
SCRIPT = "experiments/reproduce/batch_clipping.py"

# shared by every cell
COMMON: dict[str, Any] = dict(dataset="fashion-mnist", width=8, train_subset=15000, epochs=2, batch_size=512,
                              momentum=0.9, optimizer="sgd", delta=1e-5, accountant="prv", max_grad_norm=1.0)
BATCH_CLIP_SIZE = 8  # 64 micro-batch units per step of 512

# lr per method: chosen by the short tune (`tune`, seed 100, epsilon 3, selected on training accuracy,
# never on the test set; docs/results/batch_clipping.md lists it). The ALC variants use their base lr.
LR = {"bc": 0.5, "bc-alc": 0.5, "bc-alc-fixed": 0.5, "ic": 0.5, "ic-alc": 0.5, "ic-alc-fixed": 0.5,
      "nonprivate": 0.1}
TUNE_LRS = (0.125, 0.5, 2.0)
TUNE_STEPS = 20

METHODS: dict[str, dict[str, Any]] = {
    "bc": dict(model="resnet18-bn", clipping="batch", batch_clip_size=BATCH_CLIP_SIZE),
    "bc-alc": dict(model="resnet18-bn", clipping="batch", batch_clip_size=BATCH_CLIP_SIZE, layerwise=True,
                   clip_controller="quantile"),
    "bc-alc-fixed": dict(model="resnet18-bn", clipping="batch", batch_clip_size=BATCH_CLIP_SIZE, layerwise=True,
                         clip_controller="quantile-fixed-total"),
    "ic": dict(model="resnet18", clipping="flat"),
    "ic-alc": dict(model="resnet18", clipping="adaptive_layerwise"),
    "ic-alc-fixed": dict(model="resnet18", clipping="adaptive_layerwise", clip_controller="quantile-fixed-total"),
    "nonprivate": dict(model="resnet18-bn", clipping="batch", max_grad_norm=1e6),
}
LABELS = {"bc": "BC (BatchNorm)", "bc-alc": "BC + ALC (BatchNorm)", "bc-alc-fixed": "BC + ALC, fixed total (BatchNorm)",
          "ic": "IC (GroupNorm)", "ic-alc": "IC + ALC (GroupNorm)", "ic-alc-fixed": "IC + ALC, fixed total (GroupNorm)",
          "nonprivate": "non-private (BatchNorm)"}
EPSILONS = (3.0, 8.0)
MAIN = ("bc", "bc-alc", "ic", "ic-alc", "nonprivate")  # the grid's default methods


def cell_name(method: str, epsilon: float | None, seed: int) -> str:
    if method == "nonprivate":
        return f"nonprivate-s{seed}"
    return f"{method}-eps{epsilon:g}-s{seed}"


def make_config(method: str, epsilon: float | None, seed: int, out: Path | None, **overrides: Any) -> TrainConfig:
    """The TrainConfig of one cell; ``overrides`` (e.g. lr, max_steps, data_dir, train_subset) win."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
    settings: dict[str, Any] = dict(COMMON)
    settings.update(METHODS[method])
    settings["lr"] = LR[method]
    if method == "nonprivate":
        settings["noise_multiplier"] = 0.0
    else:
        if epsilon is None:
            raise ValueError(f"method {method!r} needs an epsilon")
        settings["target_epsilon"] = float(epsilon)
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(seed=seed, out=None if out is None else str(out), progress=False, **settings)


def command_for(method: str, epsilon: float | None, seed: int, extra: list[str] | None = None) -> str:
    parts = ["nice -n 10 .venv/bin/python", SCRIPT, "cell", "--method", method]
    if method != "nonprivate":
        parts += ["--epsilon", f"{epsilon:g}"]
    parts += ["--seed", str(seed)] + (extra or [])
    return " ".join(shlex.quote(p) if p != "nice -n 10 .venv/bin/python" else p for p in parts)


def run_cell(method: str, epsilon: float | None, seed: int, *, results: Path = RESULTS, name: str | None = None,
             command: str | None = None, log: Any = None, **overrides: Any) -> dict[str, Any]:
    """Train one cell; write ``results/<name>/`` (no checkpoint) and return its summary."""
    out = results / (name or cell_name(method, epsilon, seed))
    cfg = make_config(method, None if method == "nonprivate" else epsilon, seed, out, **overrides)
    result = train(cfg, log=log)
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():
        ckpt.unlink()
    summary = {k: result[k] for k in ("test_accuracy", "epsilon", "delta", "epochs", "steps", "seconds",
                                      "noise_multiplier", "sample_rate", "accountant", "parameters", "train_size",
                                      "clip_thresholds")}
    last = result["metrics"][-1]
    summary.update(method=method, label=LABELS[method], target_epsilon=cfg.target_epsilon, seed=seed,
                   model=cfg.model, clipping=cfg.clipping, layerwise=cfg.layerwise, clip_controller=cfg.clip_controller,
                   batch_clip_size=cfg.batch_clip_size, width=cfg.width, lr=cfg.lr, max_grad_norm=cfg.max_grad_norm,
                   batch_size=cfg.batch_size, train_accuracy=last["train_accuracy"],
                   command=command or command_for(method, epsilon, seed))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def grid_cells(seeds: list[int], methods: list[str], epsilons: list[float]) -> list[tuple[str, float | None, int]]:
    """Seed-major order: the whole grid for the first seed before the next seed."""
    cells = []
    for seed in seeds:
        for eps in epsilons:
            for m in methods:
                if m != "nonprivate":
                    cells.append((m, eps, seed))
        if "nonprivate" in methods:
            cells.append(("nonprivate", None, seed))
    return cells


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("cell", help="one method / epsilon / seed")
    c.add_argument("--method", choices=sorted(METHODS), required=True)
    c.add_argument("--epsilon", type=float, default=None, help="not for nonprivate")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--threads", type=int, default=1)
    g = sub.add_parser("grid", help="every cell not done yet, seed by seed")
    g.add_argument("--seeds", type=int, nargs="+", default=[0])
    g.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(MAIN))
    g.add_argument("--epsilons", type=float, nargs="+", default=list(EPSILONS))
    g.add_argument("--threads", type=int, default=1)
    t = sub.add_parser("tune", help=f"lr in {TUNE_LRS} for bc and ic, epsilon 3, seed 100, {TUNE_STEPS} steps")
    t.add_argument("--methods", nargs="+", choices=("bc", "ic"), default=["bc", "ic"])
    t.add_argument("--lrs", type=float, nargs="+", default=list(TUNE_LRS))
    t.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    if a.command == "cell":
        if a.method != "nonprivate" and a.epsilon is None:
            p.error("--epsilon is required for a private method")
        summary = run_cell(a.method, a.epsilon, a.seed, threads=a.threads)
        json.dump(summary, sys.stdout, indent=2)
        print()
        return 0
    if a.command == "grid":
        for method, eps, seed in grid_cells(a.seeds, a.methods, a.epsilons):
            if (RESULTS / cell_name(method, eps, seed) / "summary.json").exists():
                continue
            s = run_cell(method, eps, seed, threads=a.threads)
            print(json.dumps({k: s[k] for k in ("method", "target_epsilon", "seed", "test_accuracy", "epsilon",
                                                "seconds")}), flush=True)
        return 0
    for method in a.methods:  # tune
        for lr in a.lrs:
            name = f"tune/{method}-lr{lr:g}"
            if (RESULTS / name / "summary.json").exists():
                continue
            cmd = f"nice -n 10 .venv/bin/python {SCRIPT} tune --methods {method} --lrs {lr:g}"
            s = run_cell(method, 3.0, 100, name=name, command=cmd, lr=lr, max_steps=TUNE_STEPS, threads=a.threads)
            print(json.dumps({k: s[k] for k in ("method", "lr", "train_accuracy", "test_accuracy", "seconds")}),
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
