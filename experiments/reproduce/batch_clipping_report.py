"""Make docs/results/batch_clipping.md and docs/results/batch_clipping.png from the cells' summaries.

  .venv/bin/python experiments/reproduce/batch_clipping_report.py

Reads every docs/results/batch_clipping/<cell>/summary.json written by batch_clipping.py (and
the short lr tune under tune/); nothing here is typed in by hand: the tables, the plot and the
comparisons in the text are computed from those files.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import batch_clipping as bc  # noqa: E402

ORDER = ("bc", "bc-alc", "bc-alc-fixed", "ic", "ic-alc", "ic-alc-fixed", "nonprivate")


def load(results: Path) -> list[dict[str, Any]]:
    """The summaries of the grid's cells (not the tune's)."""
    out = []
    for path in sorted(results.glob("*/summary.json")):
        s = json.loads(path.read_text(encoding="utf-8"))
        s["cell"] = path.parent.name
        out.append(s)
    return out


def load_tune(results: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted((results / "tune").glob("*/summary.json"))]


def _mean_std(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def aggregate(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, target epsilon): mean and std over seeds of the test accuracy, and the rest."""
    groups: dict[tuple[str, float | None], list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["method"], c.get("target_epsilon")), []).append(c)
    rows = []
    for (method, eps), cs in groups.items():
        acc_mean, acc_std = _mean_std([100 * c["test_accuracy"] for c in cs])
        train_mean, _ = _mean_std([100 * c["train_accuracy"] for c in cs])
        first = cs[0]
        sigma = first["noise_multiplier"]
        rows.append(dict(
            method=method, label=first["label"], target_epsilon=eps, seeds=sorted(c["seed"] for c in cs),
            n=len(cs), acc_mean=acc_mean, acc_std=acc_std, train_mean=train_mean,
            epsilon=max(c["epsilon"] for c in cs), sigma=sigma, sample_rate=first["sample_rate"],
            steps=first["steps"], seconds=statistics.fmean(c["seconds"] for c in cs), lr=first["lr"],
            max_grad_norm=first["max_grad_norm"], model=first["model"], batch_size=first["batch_size"],
            batch_clip_size=first.get("batch_clip_size"), commands=[c["command"] for c in cs],
            thresholds=[c.get("clip_thresholds") or [] for c in cs], train_size=first["train_size"],
            parameters=first["parameters"],
        ))
    rank = {m: i for i, m in enumerate(ORDER)}
    rows.sort(key=lambda r: (r["target_epsilon"] is None, r["target_epsilon"] or 0.0, rank.get(r["method"], 99)))
    return rows


def noise_per_coordinate(row: dict[str, Any]) -> float:
    """Std of the noise on one coordinate of the averaged update, in units of the total threshold C.

    Individual clipping: sigma C / B (B = expected batch size). Batch clipping: 2 sigma C / U
    (U = units per step, sensitivity 2C). sigma is the accountant's (the gradient's own share is
    slightly larger when a controller's counts share the step). Adaptive thresholds move C,
    so for ALC this is in units of the current C.
    """
    sigma = row["sigma"]
    if row["method"] == "nonprivate":
        return 0.0
    if row["method"].startswith("bc"):
        units = max(1, round(row["batch_size"] / row["batch_clip_size"]))
        return 2 * sigma / units
    return sigma / row["batch_size"]


def _fmt_acc(row: dict[str, Any]) -> str:
    if row["n"] > 1:
        return f"{row['acc_mean']:.2f} ± {row['acc_std']:.2f}"
    return f"{row['acc_mean']:.2f}"


def _fmt_eps(row: dict[str, Any]) -> str:
    return "∞ (σ = 0)" if not math.isfinite(row["epsilon"]) else f"{row['epsilon']:.3f}"


def _find(rows: list[dict[str, Any]], method: str, eps: float | None) -> dict[str, Any] | None:
    return next((r for r in rows if r["method"] == method and r["target_epsilon"] == eps), None)


def comparisons(rows: list[dict[str, Any]]) -> list[str]:
    """Sentences comparing the methods, computed from the rows."""
    lines = []
    epsilons = sorted({r["target_epsilon"] for r in rows if r["target_epsilon"] is not None})
    for eps in epsilons:
        got = {m: _find(rows, m, eps) for m in ORDER}
        parts = [f"{bc.LABELS[m]} {got[m]['acc_mean']:.2f}%" for m in ORDER if got[m] is not None]
        lines.append(f"- ε = {eps:g}: " + ", ".join(parts) + ".")
        if got["bc"] and got["ic"]:
            d = got["bc"]["acc_mean"] - got["ic"]["acc_mean"]
            lines.append(f"  BC is {abs(d):.2f} points {'above' if d > 0 else 'below'} IC with GroupNorm.")
        if got["bc"] and got["bc-alc"]:
            d = got["bc-alc"]["acc_mean"] - got["bc"]["acc_mean"]
            lines.append(f"  Adding ALC to BC changes accuracy by {d:+.2f} points; to IC by "
                         + (f"{got['ic-alc']['acc_mean'] - got['ic']['acc_mean']:+.2f} points."
                            if got["ic"] and got["ic-alc"] else "(IC + ALC not run)."))
        for base in ("bc", "ic"):
            fixed, plain = got[f"{base}-alc-fixed"], got[base]
            if fixed and plain:
                d = fixed['acc_mean'] - plain['acc_mean']
                spread = plain["acc_std"]
                note = (f", within twice {bc.LABELS[base]}'s seed-to-seed std ({spread:.2f}): no clear difference"
                        if not math.isnan(spread) and abs(d) < 2 * spread else "")
                lines.append(f"  {bc.LABELS[fixed['method']]}: {fixed['acc_mean']:.2f}% ({fixed['n']} seed"
                             f"{'s' if fixed['n'] > 1 else ''}), {d:+.2f} points against {bc.LABELS[base]}{note}.")
    chance = 10.0
    for method in ("bc", "bc-alc", "bc-alc-fixed"):
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["target_epsilon"])
        if not rs:
            continue
        accs = ", ".join(f"{r['acc_mean']:.2f}% at ε = {r['target_epsilon']:g}" for r in rs)
        trains = all(r["acc_mean"] > 3 * chance for r in rs)
        lines.append(f"- {bc.LABELS[method]}: {accs}: the BatchNorm ResNet "
                     f"{'trains (well above the 10% of chance)' if trains else 'does not train reliably'} "
                     "under this setting.")
    for method in ("bc-alc", "ic-alc"):  # the fixed-total variants hold the total at C by construction
        rs = [r for r in rows if r["method"] == method]
        for r in sorted(rs, key=lambda r: r["target_epsilon"]):
            totals = [math.sqrt(sum(c * c for c in t)) for t in r["thresholds"] if t]
            if not totals:
                continue
            grew = statistics.fmean(totals) / r["max_grad_norm"]
            text = (f"- {bc.LABELS[method]}, ε = {r['target_epsilon']:g}: the thresholds' root sum of squares "
                    f"(which sets the noise) ended at {statistics.fmean(totals):.3g} (start {r['max_grad_norm']:g}; "
                    f"mean over {len(totals)} seed{'s' if len(totals) > 1 else ''}).")
            if grew > 2:
                text += (f" It grew {grew:.0f}x: Quantile moves each layer's threshold toward the median norm of "
                         "that layer, so the total follows the gradient norms, the noise grows with it, and at a "
                         "learning rate chosen for C = 1 the steps grow too.")
            lines.append(text)
    return lines


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax, ax2 = fig.subplots(1, 2, width_ratios=(1.1, 1))
    for i, method in enumerate(ORDER[:-1]):
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["target_epsilon"])
        if not rs:
            continue
        xs = [r["epsilon"] for r in rs]
        ys = [r["acc_mean"] for r in rs]
        es = [0.0 if math.isnan(r["acc_std"]) else r["acc_std"] for r in rs]
        ax.errorbar(xs, ys, yerr=es, marker="os^Dv<"[i], capsize=3, color=f"C{i}",
                    linestyle="-" if method.startswith("bc") else "--", alpha=0.9,
                    label=f"{bc.LABELS[method]} (n = {min(r['n'] for r in rs)})")
    ref = [r for r in rows if r["method"] == "nonprivate"]
    if ref:
        ax.axhline(ref[0]["acc_mean"], color="0.4", linestyle=":", label=f"{bc.LABELS['nonprivate']}")
    ax.set_xlabel("ε spent (δ = 1e-5, PRV)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Fashion-MNIST, ResNet-18 layout, width 8")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    # final per-layer thresholds of the ALC runs (seed of the first cell, largest epsilon)
    for method in ("bc-alc", "bc-alc-fixed", "ic-alc", "ic-alc-fixed"):
        rs = [r for r in rows if r["method"] == method and r["thresholds"] and r["thresholds"][0]]
        if not rs:
            continue
        r = max(rs, key=lambda r: r["target_epsilon"])
        th = r["thresholds"][0]
        ax2.plot(range(len(th)), th, marker=".", color=f"C{ORDER.index(method)}",
                 label=f"{bc.LABELS[method]}, ε = {r['target_epsilon']:g}")
        ax2.axhline(r["max_grad_norm"] / math.sqrt(len(th)), color=f"C{ORDER.index(method)}", linewidth=0.8,
                    linestyle=":")
    ax2.set_yscale("log")
    ax2.set_xlabel("layer (model order; dotted: the start, C / sqrt(L))")
    ax2.set_ylabel("final threshold C_l")
    ax2.set_title("ALC thresholds after training (privatised counts)")
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def render(rows: list[dict[str, Any]], tune: list[dict[str, Any]], png_name: str) -> str:
    c = bc.COMMON
    private = [r for r in rows if r["method"] != "nonprivate"]
    seeds = sorted({s for r in rows for s in r["seeds"]})
    counts = sorted({r["n"] for r in rows})
    any_row = rows[0] if rows else None
    layers = next((len(t) for r in rows if r["method"].endswith("alc") for t in r["thresholds"] if t), "?")
    out = [
        "# Batch clipping and adaptive layer-wise clipping on Fashion-MNIST",
        "",
        "The claim (Nguyen, Nguyen, Nguyen, van Dijk 2023; anchors.md §6.3 and seed 9): with **batch clipping** "
        "(BC) the clipped unit is a micro-batch's mean gradient, so a ResNet with **BatchNorm** trains privately, "
        "where **individual clipping** (IC, per-example DP-SGD) cannot use BatchNorm (one example's gradient "
        "depends on the whole batch) and needs GroupNorm. Adaptive layer-wise clipping (ALC) gives each layer "
        "its own threshold. Generated by `experiments/reproduce/batch_clipping_report.py` from the runs' "
        "`summary.json` files; nothing in the tables is typed in by hand.",
        "",
        f"![accuracy against epsilon]({png_name})",
        "",
        "## Setup",
        "",
        f"- Fashion-MNIST, a fixed random subset of {c['train_subset']:,} training images (`--train-subset`; the same "
        f"subset for every method at a given seed), full 10,000-image test set; pixels in [0, 1].",
        f"- ResNet-18 layout (`dpclip.models.ResNet18`, 4 stages of 2 basic blocks) at width {c['width']} "
        f"({any_row['parameters'] if any_row else '?'} parameters): `resnet18-bn` (BatchNorm without running "
        "statistics: every batch, also at evaluation, is normalised by its own statistics) for BC, `resnet18` "
        "(GroupNorm, 16 groups) for IC.",
        f"- {c['epochs']} epochs, expected Poisson batch {c['batch_size']}, SGD momentum {c['momentum']}, "
        f"constant lr, starting threshold C = {c['max_grad_norm']:g}; σ calibrated by dpclip (PRV accountant) so the "
        "planned steps spend exactly the target ε at δ = 1e-5.",
        f"- BC: micro-batch units of expected size {bc.BATCH_CLIP_SIZE} ({c['batch_size'] // bc.BATCH_CLIP_SIZE} "
        "units per step; each example is assigned to a unit once, at random, independently of the data), each unit's "
        "mean gradient clipped to C, noise N(0, (2σC)²) (sensitivity 2C), the sum divided by the number of units.",
        f"- ALC: one threshold per layer (module with its own parameters: {layers} layers here), starting at "
        f"C / sqrt({layers}), "
        "moved after every step by dpclip's `Quantile` controller (target unclipped fraction 0.5, geometric "
        "learning rate 0.2; Andrew et al. 2021). BC + ALC is `dpclip train --clipping batch --layerwise "
        "--clip-controller quantile`; IC + ALC is `--clipping adaptive_layerwise`.",
        "- ALC, fixed total (`--clip-controller quantile-fixed-total`, `dpclip.controllers.Quantile(keep_total=C)`): the same "
        "privatised Quantile update per layer, then all thresholds rescaled so that sqrt(Σ_l C_l²) stays C. The noise "
        "(σ times that total) is then fixed and only its split across layers adapts; each layer's threshold settles at "
        "a common quantile of its own norm distribution. Rescaling is post-processing of the noisy counts (no extra "
        "privacy cost). This variant was added after the first ALC runs showed the thresholds' total drifting "
        "upwards (below); the n column gives its seeds.",
        "- Compute: a shared 2-core CPU (other jobs running), 1 torch thread per run under `nice -n 10`; the seconds "
        "column is wall time under that load, not a speed benchmark.",
        "",
        "**Difference from the paper's ALC.** Nguyen et al. estimate the per-layer constants on a public surrogate "
        "data set (their code: MisaNguyen/DPSGD), which costs no privacy. dpclip has no public data here: its "
        "thresholds move from *privatised* counts of the units (examples for IC, micro-batches for BC) whose layer "
        "norm is below the layer's threshold, with Gaussian noise of std σ_c·sqrt(L) (σ_c = units per step / 20), "
        "and that release shares the step's budget (the gradient's noise multiplier rises to "
        "(σ⁻² − σ_c⁻²)^(-1/2); docs/controllers.md). The ε in the tables includes it. "
        f"With {c['batch_size'] // bc.BATCH_CLIP_SIZE} units per step the "
        f"BC counts are far noisier (as a fraction) than IC's counts over {c['batch_size']} examples. The paper also "
        "fixes the scale: its C_l = C·‖∇_l‖ / max_k ‖∇_k‖ are set by C and the layers' relative gradient norms; "
        "dpclip's plain Quantile ALC moves each C_l on its own toward the layer's median norm, so the total (and "
        "with it the noise) is free to drift. The fixed-total variant is the closer analogue (normalised by the "
        "root sum of squares rather than the largest layer).",
        "",
        "## Results",
        "",
        f"Test accuracy (%) after the last epoch; mean ± sample std over the seeds in the `n` column (seeds "
        f"{', '.join(map(str, seeds))}{'; a single value where n = 1' if 1 in counts else ''}). "
        "ε is the PRV upper bound spent by the run (the largest over seeds); σ is the accountant's noise multiplier. "
        "'noise / C' is the std of the noise on one coordinate of the averaged update relative to the threshold: "
        f"σ/B for IC, 2σ/U for BC (B = {c['batch_size']} examples, "
        f"U = {c['batch_size'] // bc.BATCH_CLIP_SIZE} units).",
        "",
        "| method | model | target ε | ε spent | σ | noise / C | lr | test acc (%) | train acc (%) | n | seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        target = "—" if r["target_epsilon"] is None else f"{r['target_epsilon']:g}"
        out.append(f"| {r['label']} | {r['model']} | {target} | {_fmt_eps(r)} | {r['sigma']:.4g} | "
                   f"{noise_per_coordinate(r):.2g} | {r['lr']:g} | {_fmt_acc(r)} | {r['train_mean']:.2f} | {r['n']} | "
                   f"{r['seconds']:.0f} |")
    out += ["", "### What the numbers say", ""]
    out += comparisons(rows) if private else ["- (no private cell yet)"]
    out += [
        "",
        "### Caveats",
        "",
        "- **Signal-to-noise.** At equal σ, BC adds noise 2σC for a sum of U unit gradients, IC adds σC for a sum of "
        "B example gradients. Both sums are divided by their count, so the noise per coordinate of the update is "
        "2σC/U for BC against σC/B for IC: with U = B/k units of k examples, BC's noise is 2k times larger (the "
        "anchor's 'roughly B/2 worse signal-to-noise' is the case of one unit per batch, k = B). The 'noise / C' "
        f"column shows it: {bc.BATCH_CLIP_SIZE * 2}x here. BC's advantages are the architecture (BatchNorm) and speed "
        "(one ordinary backward per unit, no per-example gradients), not accuracy per ε.",
        "- **Small scale.** Width 8, a 15,000-image subset and 2 epochs are what the shared CPU allowed; DP accuracy "
        "grows with data, epochs and (for IC) batch size, so absolute numbers are far below full-scale results "
        "(e.g. the 86% of Tramèr & Boneh's CNN on all of Fashion-MNIST at ε = 3, docs/results/reproductions.md). "
        "The comparison between methods at equal data, steps and ε is the point.",
        "- **BatchNorm at evaluation** normalises each 1,024-image test batch by its own statistics (no running "
        "statistics are kept, since they would leak private data without noise), while training normalises units of "
        f"about {bc.BATCH_CLIP_SIZE} images.",
        "- **Hyper-parameters** were not tuned per ε or per ALC variant (below).",
        "- **Reproducibility.** A cell is deterministic for a given code version (explicit generators from the "
        "seed), but these cells ran over about an hour while other parts of dpclip (per-sample gradient rules, "
        "noise drawing) were being changed in the same checkout, so rerunning a cell today can differ at the "
        "float level and, through training's sensitivity to such differences, by a fraction of a point.",
        "",
        "## Hyper-parameters and the short tune",
        "",
        f"Only the learning rate was tuned, and only for BC and IC, at ε = 3 on seed 100 (not an evaluation seed), "
        f"for {bc.TUNE_STEPS} of the {any_row['steps'] if any_row else '?'} steps, choosing the lr with the higher "
        "**training** accuracy (the running accuracy over the training batches; the test set was not used to choose). "
        "C = 1 for all: when (almost) every unit is clipped, C and lr only enter as their product, so tuning lr "
        "covers it. The ALC variants reuse their base method's lr; the non-private reference uses lr 0.1 (not tuned).",
        "",
    ]
    if tune:
        out += ["| method | lr | train acc at the end (%) | test acc (%, not used to choose) | seconds |",
                "|---|---|---|---|---|"]
        for t in sorted(tune, key=lambda t: (t["method"], t["lr"])):
            out.append(f"| {bc.LABELS[t['method']]} | {t['lr']:g} | {100 * t['train_accuracy']:.2f} | "
                       f"{100 * t['test_accuracy']:.2f} | {t['seconds']:.0f} |")
        out.append("")
        out.append("Tune command: `nice -n 10 .venv/bin/python experiments/reproduce/batch_clipping.py tune`.")
        out.append("")
    out += [
        "## Commands",
        "",
        "Each cell (from the repository root; results in `docs/results/batch_clipping/<cell>/`):",
        "",
        "```",
    ]
    for r in rows:
        out += r["commands"]
    out += [
        "```",
        "",
        "The whole grid (skips cells already done), then this page and the plot:",
        "",
        "```",
        "nice -n 10 .venv/bin/python experiments/reproduce/batch_clipping.py grid --seeds 0 1 2",
        "nice -n 10 .venv/bin/python experiments/reproduce/batch_clipping.py grid --seeds 0 1 2 "
        "--methods bc-alc-fixed ic-alc-fixed",
        ".venv/bin/python experiments/reproduce/batch_clipping_report.py",
        "```",
        "",
        "The same run through the CLI, e.g. BC + ALC at ε = 3, seed 0 (a 15,000-image subset drawn with the same "
        "seed):",
        "",
        "```",
        "nice -n 10 .venv/bin/dpclip train --dataset fashion-mnist --model resnet18-bn --width 8 --clipping batch "
        f"--batch-clip-size {bc.BATCH_CLIP_SIZE} --layerwise --clip-controller quantile --target-epsilon 3 --epochs "
        f"{c['epochs']} --batch-size {c['batch_size']} --lr {bc.LR['bc-alc']:g} --max-grad-norm {c['max_grad_norm']:g} "
        f"--train-subset {c['train_subset']} --seed 0 --threads 1",
        "```",
        "",
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=bc.RESULTS)
    p.add_argument("--md", type=Path, default=bc.ROOT / "docs" / "results" / "batch_clipping.md")
    p.add_argument("--png", type=Path, default=bc.ROOT / "docs" / "results" / "batch_clipping.png")
    a = p.parse_args(argv)
    rows = aggregate(load(a.results))
    if not rows:
        print(f"no results under {a.results}; run batch_clipping.py first", file=sys.stderr)
        return 1
    plot(rows, a.png)
    a.md.write_text(render(rows, load_tune(a.results), a.png.name), encoding="utf-8")
    print(f"wrote {a.md} and {a.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
