"""Table and plot of the Tramer & Boneh reproductions from docs/results/tramer_boneh/*/.

  .venv/bin/python experiments/reproduce/report.py
prints the markdown table (paste into docs/results/reproductions.md) and writes
docs/results/reproductions.png (test accuracy and epsilon against epochs, one line per run).
"""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "docs" / "results" / "tramer_boneh"


def load() -> list[tuple[dict, list[dict]]]:
    runs = []
    for d in sorted(RUNS.glob("*/summary.json")):
        s = json.loads(d.read_text())
        with open(d.parent / "metrics.csv", newline="") as f:
            rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
        s["dir"] = d.parent.relative_to(ROOT).as_posix()
        runs.append((s, rows))
    return runs


def table(runs) -> str:
    lines = ["| dataset | paper target (ε=3) | our test accuracy | gap to paper | ε (PRV) | δ | σ | epochs | seed | wall time | command |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for s, _ in runs:
        acc = 100 * s["test_accuracy"]
        lines.append(f"| {s['dataset']} | {s['paper_accuracy']:.1f}% | {acc:.2f}% | {acc - s['paper_accuracy']:+.2f} pt | "
                     f"{s['epsilon']:.3f} | {s['delta']:g} | {s['noise_multiplier']:.3f} | {s['epochs']:g} | {s['seed']} | "
                     f"{s['seconds'] / 60:.1f} min | `{s['command']}` |")
    by_ds: dict[str, list[float]] = {}
    for s, _ in runs:
        by_ds.setdefault(s["dataset"], []).append(100 * s["test_accuracy"])
    for ds, accs in by_ds.items():
        if len(accs) > 1:
            lines.append(f"| {ds} mean ± std ({len(accs)} seeds) | | {statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f}% | | | | | | | | |")
    return "\n".join(lines)


def plot(runs, path: Path) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for s, rows in runs:
        label = f"{s['dataset']} seed {s['seed']} (paper {s['paper_accuracy']}%)"
        ep = [r["epoch"] for r in rows]
        line, = ax1.plot(ep, [100 * r["test_accuracy"] for r in rows], label=label)
        ax1.axhline(s["paper_accuracy"], color=line.get_color(), ls=":", lw=1)
        ax2.plot(ep, [r["epsilon"] for r in rows], color=line.get_color(), label=label)
    ax1.set(xlabel="epoch", ylabel="test accuracy (%)", title="Tramèr & Boneh CNN, DP-SGD (dotted: paper)")
    ax1.set_ylim(70, 100)
    ax2.axhline(3.0, color="grey", ls=":", lw=1)
    ax2.set(xlabel="epoch", ylabel="ε spent (PRV, δ=1e-5)", title="privacy spent")
    ax1.legend(fontsize=8, loc="lower right")
    ax1.grid(alpha=0.3)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    runs = load()
    print(table(runs))
    plot(runs, ROOT / "docs" / "results" / "reproductions.png")


if __name__ == "__main__":
    main()
