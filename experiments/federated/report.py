"""Tables and plots from the JSON lines of ``controllers.py``.

    python experiments/federated/report.py [--results experiments/federated/results/controllers.jsonl]
        [--plots docs/results] [--clip-setting mnist,0]

Prints markdown tables (test accuracy mean ± sample std over the seeds present, and the final
clip norm per run: geometric mean and range over seeds, plus the best controller per cell) and
writes ``federated_accuracy.png`` (accuracy vs epsilon, one panel per dataset),
``federated_clip.png`` (clip norm vs round for one dataset and seed, one panel per epsilon) and
``federated_curves.png`` (test accuracy vs round, mean over seeds, one panel per dataset x epsilon)
and, when runs at other starting clip norms (``NAME@C``) exist, ``federated_clip_norms.png``
(accuracy vs the fixed / starting clip norm).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
ORDER = ("fixed", "quantile", "multiobjective", "autoclip", "zclip")
DATASETS = ("mnist", "fashion-mnist")


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def cells(rows: list[dict]) -> dict[tuple[str, float, str], list[dict]]:
    out: dict[tuple[str, float, str], list[dict]] = defaultdict(list)
    for r in rows:
        out[(r["dataset"], float(r["target_epsilon"]), r["controller"])].append(r)
    for v in out.values():
        v.sort(key=lambda r: r["seed"])
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def accuracy_table(rows: list[dict]) -> str:
    c = cells(rows)
    datasets = [d for d in DATASETS if any(k[0] == d for k in c)]
    epsilons = sorted({k[1] for k in c})
    controllers = [n for n in ORDER if any(k[2] == n for k in c)]
    head = "| dataset | ε | " + " | ".join(controllers) + " |"
    lines = [head, "|" + "---|" * (2 + len(controllers))]
    for d in datasets:
        for e in epsilons:
            stats = {}
            for n in controllers:
                runs = c.get((d, e, n), [])
                if runs:
                    stats[n] = (*mean_std([100 * r["test_accuracy"] for r in runs]), len(runs))
            best = max(stats, key=lambda n: stats[n][0]) if stats else None
            row = []
            for n in controllers:
                if n not in stats:
                    row.append("–")
                    continue
                m, s, k = stats[n]
                text = f"{m:.1f} ± {s:.1f} ({k})" if k > 1 else f"{m:.1f} (1)"
                row.append(f"**{text}**" if n == best else text)
            lines.append(f"| {d} | {e:g} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def clip_table(rows: list[dict]) -> str:
    c = cells(rows)
    datasets = [d for d in DATASETS if any(k[0] == d for k in c)]
    epsilons = sorted({k[1] for k in c})
    controllers = [n for n in ORDER if any(k[2] == n for k in c)]
    lines = ["| dataset | ε | " + " | ".join(controllers) + " |", "|" + "---|" * (2 + len(controllers))]
    for d in datasets:
        for e in epsilons:
            row = []
            for n in controllers:
                runs = c.get((d, e, n), [])
                if not runs:
                    row.append("–")
                    continue
                finals = [r["final_clip"] for r in runs]
                gm = math.exp(statistics.fmean(math.log(f) for f in finals))
                row.append(f"{gm:.3g}" if len(finals) == 1 or max(finals) / min(finals) < 1.005
                           else f"{gm:.3g} [{min(finals):.2g}, {max(finals):.2g}]")
            lines.append(f"| {d} | {e:g} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def start_table(rows: list[dict], base: str) -> str:
    """Controller ``base`` at each starting clip norm present (``base`` alone starts at the settings' clip)."""
    runs_of = [r for r in rows if r["controller"].partition("@")[0] == base]
    if not any("@" in r["controller"] for r in runs_of):
        return ""
    by = defaultdict(list)
    for r in runs_of:
        by[(r["dataset"], float(r["target_epsilon"]), float(r.get("start_clip", r["settings"]["clip"])))].append(r)
    norms = sorted({k[2] for k in by})
    lines = ["| dataset | ε | " + " | ".join(f"{base}, C₀ = {c:g}" for c in norms) + " |",
             "|" + "---|" * (2 + len(norms))]
    for d in DATASETS:
        for e in sorted({k[1] for k in by if k[0] == d}):
            row = []
            for cn in norms:
                runs = by.get((d, e, cn), [])
                if not runs:
                    row.append("–")
                    continue
                m, sd = mean_std([100 * r["test_accuracy"] for r in runs])
                text = f"{m:.1f} ± {sd:.1f} ({len(runs)})" if len(runs) > 1 else f"{m:.1f} (1)"
                if base != "fixed":
                    gm = math.exp(statistics.fmean(math.log(r["final_clip"]) for r in runs))
                    text += f", final C {gm:.2g}"
                row.append(text)
            lines.append(f"| {d} | {e:g} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def privacy_table(rows: list[dict]) -> str:
    by = defaultdict(list)
    for r in rows:
        by[(r["dataset"], float(r["target_epsilon"]))].append(r)
    lines = ["| ε target | σ (accountant) | σ_grad with a controller | σ_c | ε spent (max over runs) |", "|---|---|---|---|---|"]
    for e in sorted({k[1] for k in by}):
        rs = [r for k, v in by.items() if k[1] == e for r in v]
        sig = rs[0]["noise_multiplier"]
        ctl = [r for r in rs if r["controller"] != "fixed"]
        sg = f"{ctl[0]['gradient_noise_multiplier']:.3f}" if ctl else "–"
        sc = f"{ctl[0]['count_noise_multiplier']:.3f}" if ctl else "–"
        lines.append(f"| {e:g} | {sig:.3f} | {sg} | {sc} | {max(r['epsilon'] for r in rs):.3f} |")
    return "\n".join(lines)


def plots(rows: list[dict], outdir: Path, clip_setting: tuple[str, int]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    c = cells(rows)
    datasets = [d for d in DATASETS if any(k[0] == d for k in c)]
    epsilons = sorted({k[1] for k in c})
    controllers = [n for n in ORDER if any(k[2] == n for k in c)]
    colors = dict(zip(ORDER, ("black", "tab:blue", "tab:red", "tab:green", "tab:orange")))
    written = []

    fig, axes = plt.subplots(1, len(datasets), figsize=(5.2 * len(datasets), 4), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        for i, n in enumerate(controllers):
            xs, ms, ss = [], [], []
            for e in epsilons:
                runs = c.get((d, e, n), [])
                if runs:
                    m, s = mean_std([100 * r["test_accuracy"] for r in runs])
                    xs.append(e * (1 + 0.03 * (i - 2)))  # small offsets so error bars do not overlap
                    ms.append(m)
                    ss.append(0 if math.isnan(s) else s)
            ax.errorbar(xs, ms, yerr=ss, marker="o", capsize=3, label=n, color=colors[n])
        n_seeds = sorted({len(v) for k, v in c.items() if k[0] == d})
        ax.set_xscale("log")
        ax.set_xticks(epsilons, [f"{e:g}" for e in epsilons])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("ε (user-level, δ = 1e-5)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{d}: DP-FedAvg, 100 clients, Dir(0.5)\nmean ± std over {'/'.join(map(str, n_seeds))} seeds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = outdir / "federated_accuracy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    d, seed = clip_setting
    fig, axes = plt.subplots(1, len(epsilons), figsize=(4.3 * len(epsilons), 3.8), squeeze=False, sharey=True)
    for ax, e in zip(axes[0], epsilons):
        for n in controllers:
            runs = [r for r in c.get((d, e, n), []) if r["seed"] == seed]
            if runs:
                h = runs[0]["clip_history"]
                ax.plot(range(1, len(h) + 1), h, label=n, color=colors[n])
        ax.set_yscale("log")
        ax.set_xlabel("round")
        ax.set_title(f"{d}, ε = {e:g}, seed {seed}", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("clip norm C (start 1.0)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path = outdir / "federated_clip.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    fig, axes = plt.subplots(len(datasets), len(epsilons), figsize=(4 * len(epsilons), 3.2 * len(datasets)),
                             squeeze=False, sharey=True)
    for i, d in enumerate(datasets):
        for j, e in enumerate(epsilons):
            ax = axes[i][j]
            for n in controllers:
                runs = c.get((d, e, n), [])
                if not runs:
                    continue
                rounds = [a[0] for a in runs[0]["accuracy_history"]]
                acc = [statistics.fmean(100 * r["accuracy_history"][k][1] for r in runs) for k in range(len(rounds))]
                ax.plot(rounds, acc, marker=".", label=n, color=colors[n])
            ax.set_title(f"{d}, ε = {e:g}", fontsize=9)
            ax.grid(alpha=0.3)
            if i == len(datasets) - 1:
                ax.set_xlabel("round")
            if j == 0:
                ax.set_ylabel("test accuracy (%)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = outdir / "federated_curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    written.append(path)
    return written


def start_plot(all_rows: list[dict], outdir: Path) -> Path | None:
    """Test accuracy vs the starting clip norm C0: fixed (lines), quantile / autoclip (markers), per dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    if not any("@" in r["controller"] for r in all_rows):
        return None
    by = defaultdict(list)
    for r in all_rows:
        base = r["controller"].partition("@")[0]
        by[(r["dataset"], float(r["target_epsilon"]), base, float(r.get("start_clip", r["settings"]["clip"])))].append(
            100 * r["test_accuracy"])
    datasets = [d for d in DATASETS if any(k[0] == d for k in by)]
    epsilons = sorted({k[1] for k in by})
    ecolor = dict(zip(epsilons, ("tab:purple", "tab:cyan", "tab:olive", "tab:gray")))
    markers = {"fixed": "o", "quantile": "s", "autoclip": "^", "multiobjective": "v", "zclip": "D"}
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4), squeeze=False, sharey=True)
    for ax, d in zip(axes[0], datasets):
        for e in epsilons:
            for base in ORDER:
                pts = sorted((k[3], statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0)
                             for k, v in by.items() if k[0] == d and k[1] == e and k[2] == base)
                if not pts or (base != "fixed" and len(pts) < 2):
                    continue
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], color=ecolor[e],
                            marker=markers[base], linestyle="-" if base == "fixed" else ":", capsize=2,
                            label=f"{base}, ε={e:g}")
        ax.set_xscale("log")
        norms = sorted({k[3] for k in by if k[0] == d})
        ax.set_xticks(norms, [f"{c:g}" for c in norms])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("clip norm: fixed C, or the controller's starting C₀")
        ax.set_title(f"{d}: accuracy vs clip norm (mean ± std, 3 seeds)", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%)")
    axes[0][-1].legend(fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = outdir / "federated_clip_norms.png"
    fig.savefig(path, dpi=105)
    plt.close(fig)
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=HERE / "results" / "controllers.jsonl")
    p.add_argument("--plots", type=Path, default=ROOT / "docs" / "results")
    p.add_argument("--clip-setting", default="mnist,0", help="dataset,seed of the clip-norm plot (one panel per epsilon)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args()
    all_rows = load(args.results)
    rows = [r for r in all_rows if r["controller"] in ORDER]
    seconds = sum(r["seconds"] for r in all_rows)
    print(f"{len(all_rows)} runs, {seconds / 60:.1f} process-minutes in total\n")
    print("Test accuracy (%), mean ± std (seeds); best per row in bold\n")
    print(accuracy_table(rows))
    print("\nFinal clip norm (geometric mean over seeds [min, max])\n")
    print(clip_table(rows))
    for base in ORDER:
        table = start_table(all_rows, base)
        if table:
            print(f"\n{base} at other starting clip norms (test accuracy %, mean ± std (seeds))\n")
            print(table)
    print("\nNoise\n")
    print(privacy_table(rows))
    if not args.no_plots:
        args.plots.mkdir(parents=True, exist_ok=True)
        d, s = args.clip_setting.split(",")
        for path in plots(rows, args.plots, (d, int(s))):
            print(f"\nwrote {path}")
        path = start_plot(all_rows, args.plots)
        if path is not None:
            print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
