"""A/B of dpclip versions: each cell (a source tree, a method, extra environment) in its own
worker process, all stepped round-robin from this one, so that they share the machine's
conditions while each owns its heap and threads as a training run would (docs/design.md E17).

A cell is ``LABEL=TREE:METHOD``, optionally followed by ``|NAME=VALUE`` environment settings
for its worker. ``TREE`` is a dpclip checkout (its ``dpclip`` and ``experiments/benchmarks``
are imported, so its C extensions must be built in place, without reinstalling:
``python -c "from setuptools import setup; setup()" build_ext --inplace`` in the tree); ``METHOD``
is one of engine.py's methods. Two settings are read by the worker:
``AB_NOISE`` (the noise multiplier, default engine.py's) and ``AB_EXEC`` (Python run after the
set-up, e.g. to switch a module attribute). The first cell is the reference of the ratios.

Compare the working tree with a commit on W1 (``git worktree add /tmp/base <rev>`` first):

    python experiments/benchmarks/ab_trees.py --model mlp --steps 400 \\
        np=/tmp/base:non-private old="/tmp/base:dpclip auto" new=".:dpclip auto" \\
        nonoise=".:dpclip auto|AB_NOISE=0"

Prints the median and the first quartile of each cell's step time (ms) and their ratios to the
first cell's; ``--json`` writes the per-step times. Worker processes start one after another
and take 5 warm-up steps before the timed ones.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORKER = r"""
import os, sys, time
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
tree, model, method = sys.argv[1], sys.argv[2], sys.argv[3]
sys.path.insert(0, tree)
import dpclip, dpclip.privacy_engine  # this tree's package, before the benchmark directory
sys.path.insert(0, os.path.join(tree, "experiments", "benchmarks"))
import torch
torch.set_num_threads(2)
import engine as E
spec = E.MODELS[model]
state = E.initial_state(spec)
ds, batches = E.make_data(spec, spec.batch_size)
runner = E.make_runner(method, spec, state, ds, spec.batch_size, noise=float(os.environ.get("AB_NOISE", E.NOISE)))
exec(os.environ.get("AB_EXEC", ""))
for i in range(5):
    runner.step(*batches[i % len(batches)])
print("ready", dpclip.__file__, flush=True)
i = 0
for line in sys.stdin:
    t = time.perf_counter()
    runner.step(*batches[i % len(batches)])
    i += 1
    print(time.perf_counter() - t, flush=True)
"""


def parse_cell(text: str) -> tuple[str, str, str, dict[str, str]]:
    """``LABEL=TREE:METHOD[|NAME=VALUE...]`` -> (label, tree, method, env)."""
    label, sep, rest = text.partition("=")
    main, *settings = rest.split("|")
    tree, colon, method = main.partition(":")
    if not sep or not colon or not label or not tree or not method:
        raise ValueError(f"cell {text!r}: expected LABEL=TREE:METHOD[|NAME=VALUE...]")
    env = {}
    for s in settings:
        name, eq, value = s.partition("=")
        if not eq or not name:
            raise ValueError(f"cell {text!r}: setting {s!r} is not NAME=VALUE")
        env[name] = value
    return label, str(Path(tree).resolve()), method, env


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cells", nargs="+", help="LABEL=TREE:METHOD[|NAME=VALUE...]; the first is the reference")
    ap.add_argument("--model", default="mlp", help="an engine.py model (default mlp)")
    ap.add_argument("--steps", type=int, default=300, help="timed steps per cell (default 300)")
    ap.add_argument("--json", type=Path, help="also write the per-step times as JSON")
    args = ap.parse_args(argv)
    cells = [parse_cell(c) for c in args.cells]
    labels = [c[0] for c in cells]
    if len(set(labels)) != len(labels):
        ap.error(f"cell labels must differ: {labels}")
    procs: dict[str, subprocess.Popen] = {}
    try:
        for label, tree, method, env in cells:
            p = subprocess.Popen(
                [sys.executable, "-c", WORKER, tree, args.model, method],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, **env},
                cwd=Path(tree).parent,  # not the tree itself, so that its modules come from sys.path only
            )
            first = p.stdout.readline().split()
            if not first or first[0] != "ready":
                p.kill()
                raise RuntimeError(f"cell {label!r}: the worker did not start (see its error above)")
            if not first[1].startswith(tree):
                p.kill()
                raise RuntimeError(f"cell {label!r}: the worker imported dpclip from {first[1]}, not from {tree}")
            procs[label] = p
        times: dict[str, list[float]] = {label: [] for label in labels}
        started = time.time()
        for i in range(args.steps):
            for label in labels[i % len(labels):] + labels[: i % len(labels)]:  # rotating start
                p = procs[label]
                p.stdin.write("step\n")
                p.stdin.flush()
                times[label].append(float(p.stdout.readline()))
    finally:
        for p in procs.values():
            if p.stdin:
                p.stdin.close()
            p.wait(timeout=60)
    median = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    q1 = {k: (statistics.quantiles(v, n=4)[0] if len(v) > 1 else v[0]) * 1e3 for k, v in times.items()}
    ref = labels[0]
    print(f"{args.model}, {args.steps} steps per cell, {time.time() - started:.0f} s")
    print(f"{'cell':12s} {'median ms':>10s} {'x ref':>7s} {'q1 ms':>8s} {'x ref':>7s}")
    for k in labels:
        print(f"{k:12s} {median[k]:10.2f} {median[k] / median[ref]:7.3f} {q1[k]:8.2f} {q1[k] / q1[ref]:7.3f}")
    result = {"model": args.model, "steps": args.steps, "cells": args.cells, "median_ms": median, "q1_ms": q1, "times_s": times}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
