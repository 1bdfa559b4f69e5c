"""Opacus's MNIST example setting, trained by dpclip and by Opacus with the same user loop.

The setting is Opacus's ``examples/mnist.py``: ``SampleConvNet``, MNIST standardised with mean
0.1307 and std 0.3081, batch 240 (Poisson, q = 240/60000), SGD lr 0.25 without momentum,
sigma 1.1, max_grad_norm 1.0, delta 1e-5 and 10 epochs. The training loop below is written
once. The only difference between the libraries is where ``PrivacyEngine`` comes from
(``from dpclip import PrivacyEngine`` or ``from opacus import PrivacyEngine``). Each library
keeps its own defaults: PRV accountant, and grad_sample_mode "auto" (dpclip) or "hooks" (Opacus).

Each epoch records the test accuracy and the train loss. It also records the wall seconds and
the process CPU seconds (``time.process_time``) of the training pass alone, and epsilon at delta
from a PRV and an RDP accountant built from the engine's history. dpclip runs use dpclip's
``accountants`` package; Opacus runs use ``opacus.accountants``.

Usage:
  nice -n 10 .venv/bin/python experiments/reproduce/opacus_mnist.py train --library dpclip --seed 0
  nice -n 10 .venv/bin/python experiments/reproduce/opacus_mnist.py train --library both --seed 1 --json
  .venv/bin/python experiments/reproduce/opacus_mnist.py report
``train`` writes docs/results/opacus_mnist/<library>-e<epochs>-s<seed>.json and .csv.
``report`` reads every JSON file there. It rewrites the generated part of
docs/results/opacus_mnist.md (between the ``<!-- generated -->`` markers) and
docs/results/opacus_mnist.png.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

import argparse  # noqa: E402
import csv  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "results" / "opacus_mnist"
REPORT_MD = ROOT / "docs" / "results" / "opacus_mnist.md"
REPORT_PNG = ROOT / "docs" / "results" / "opacus_mnist.png"
LIBRARIES = ("dpclip", "opacus")
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081

#: Opacus examples/mnist.py as run here (its own defaults are batch 64, lr 0.1, sigma 1.0).
SETTING = dict(batch_size=240, lr=0.25, noise_multiplier=1.1, max_grad_norm=1.0, delta=1e-5, epochs=10,
               test_batch_size=1024)
CSV_FIELDS = ("epoch", "steps", "train_loss", "test_loss", "test_accuracy", "epsilon_prv", "epsilon_rdp",
              "train_wall_s", "train_cpu_s", "eval_wall_s", "accounting_wall_s")


class SampleConvNet(nn.Module):
    """Opacus ``examples/mnist.py``'s model (26,010 parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 8, 2, padding=3)
        self.conv2 = nn.Conv2d(16, 32, 4, 2)
        self.fc1 = nn.Linear(32 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))  # [B, 16, 14, 14]
        x = F.max_pool2d(x, 2, 1)  # [B, 16, 13, 13]
        x = F.relu(self.conv2(x))  # [B, 32, 5, 5]
        x = F.max_pool2d(x, 2, 1)  # [B, 32, 4, 4]
        x = x.view(-1, 32 * 4 * 4)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


# -- data ---------------------------------------------------------------------------------------
def load_mnist() -> tuple[TensorDataset, TensorDataset]:
    """MNIST through dpclip.data (cached uint8 arrays), standardised with 0.1307 / 0.3081."""
    from dpclip.data import load_arrays

    a = load_arrays("mnist")

    def standard(x: Any) -> torch.Tensor:
        return (torch.from_numpy(x).float().div_(255.0) - MNIST_MEAN) / MNIST_STD

    return (TensorDataset(standard(a.train_x), torch.from_numpy(a.train_y)),
            TensorDataset(standard(a.test_x), torch.from_numpy(a.test_y)))


# -- the two libraries --------------------------------------------------------------------------
def privacy_engine_class(library: str) -> type:
    """``PrivacyEngine`` from ``library``: the only library-specific line the training loop sees."""
    if library == "dpclip":
        from dpclip import PrivacyEngine
    elif library == "opacus":
        from opacus import PrivacyEngine
    else:
        raise ValueError(f"library must be one of {LIBRARIES}; got {library!r}")
    return PrivacyEngine


def epsilons(library: str, history: list[tuple[float, float, int]], delta: float) -> dict[str, float]:
    """Epsilon at ``delta`` from a PRV and an RDP accountant of ``library``, both built from ``history``."""
    if not history:
        return {"epsilon_prv": 0.0, "epsilon_rdp": 0.0}
    if library == "dpclip":
        from accountants import PRVAccountant, RDPAccountant

        out = {}
        for key, cls in (("epsilon_prv", PRVAccountant), ("epsilon_rdp", RDPAccountant)):
            acc = cls()
            for sigma, q, steps in history:
                acc.step(noise_multiplier=sigma, sample_rate=q, steps=steps)
            out[key] = float(acc.get_epsilon(delta))
        return out
    from opacus.accountants import PRVAccountant, RDPAccountant

    out = {}
    for key, cls in (("epsilon_prv", PRVAccountant), ("epsilon_rdp", RDPAccountant)):
        acc = cls()
        acc.history = [tuple(h) for h in history]
        out[key] = float(acc.get_epsilon(delta=delta))
    return out


def history_of(engine: Any) -> list[tuple[float, float, int]]:
    return [(float(s), float(q), int(n)) for s, q, n in engine.accountant.history]


def git_state() -> dict[str, Any]:
    """HEAD and the uncommitted changes under dpclip/ and accountants/ (others edit the same checkout)."""
    import subprocess

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return "?"

    return {"head": git("rev-parse", "HEAD"),
            "uncommitted": git("status", "--porcelain", "--", "dpclip", "accountants").splitlines()}


def versions() -> dict[str, str]:
    v = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("dpclip", "opacus", "numpy"):
        try:
            v[name] = getattr(importlib.import_module(name), "__version__", "?")
        except ImportError:
            v[name] = "not installed"
    return v


# -- one run ------------------------------------------------------------------------------------
@torch.no_grad()
def test(model: nn.Module, test_set: TensorDataset, batch_size: int) -> tuple[float, float]:
    model.eval()
    loss_sum, correct = 0.0, 0
    for x, y in DataLoader(test_set, batch_size=batch_size):
        out = model(x)
        loss_sum += float(F.cross_entropy(out, y, reduction="sum"))
        correct += int((out.argmax(1) == y).sum())
    n = len(test_set)
    return loss_sum / n, correct / n


def run(library: str, train_set: TensorDataset, test_set: TensorDataset, *, seed: int = 0,
        epochs: int = SETTING["epochs"], batch_size: int = SETTING["batch_size"], lr: float = SETTING["lr"],
        noise_multiplier: float = SETTING["noise_multiplier"], max_grad_norm: float = SETTING["max_grad_norm"],
        delta: float = SETTING["delta"], test_batch_size: int = SETTING["test_batch_size"],
        max_steps: int | None = None, progress: bool = True, verbose: bool | None = None) -> dict[str, Any]:
    """Train SampleConvNet with ``library``'s PrivacyEngine; one record per epoch.

    ``max_steps`` caps the steps per epoch (for tests). Seeds: the model's initialisation
    uses ``torch.manual_seed(seed)``, because ``nn.Module`` constructors take no generator.
    Sampling uses the DataLoader's generator (seed ``2 * seed + 1``) and the noise uses
    ``noise_generator`` (seed ``2 * seed + 2``). Opacus samples from the DataLoader's
    generator. dpclip ignores it and seeds its sampler from ``noise_generator``.
    """
    PrivacyEngine = privacy_engine_class(library)
    from tqdm import tqdm

    verbose = progress if verbose is None else verbose

    # ---- the user's code, identical for both libraries --------------------------------------
    torch.manual_seed(seed)
    model = SampleConvNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0)
    train_loader = DataLoader(train_set, batch_size=batch_size,
                              generator=torch.Generator().manual_seed(2 * seed + 1))
    privacy_engine = PrivacyEngine(accountant="prv")
    model, optimizer, train_loader = privacy_engine.make_private(
        module=model, optimizer=optimizer, data_loader=train_loader, noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm, poisson_sampling=True,
        noise_generator=torch.Generator().manual_seed(2 * seed + 2))
    criterion = nn.CrossEntropyLoss()

    records: list[dict[str, Any]] = []
    steps = 0
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        model.train()
        losses = []
        w0, c0 = time.perf_counter(), time.process_time()
        total = len(train_loader) if max_steps is None else min(max_steps, len(train_loader))
        bar = tqdm(total=total, desc=f"{library} seed {seed} epoch {epoch}/{epochs}", leave=False,
                   disable=not progress, file=sys.stderr, mininterval=1.0)
        for i, (data, target) in enumerate(train_loader):
            if max_steps is not None and i >= max_steps:
                break
            optimizer.zero_grad()
            output = model(data)
            loss = criterion(output, target)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            steps += 1
            bar.update(1)
        bar.close()
        train_wall, train_cpu = time.perf_counter() - w0, time.process_time() - c0
        # ---- measurement, outside the timed region --------------------------------------------
        e0 = time.perf_counter()
        test_loss, acc = test(model, test_set, test_batch_size)
        e1 = time.perf_counter()
        eps = epsilons(library, history_of(privacy_engine), delta)
        e2 = time.perf_counter()
        finite = [v for v in losses if math.isfinite(v)]
        records.append({
            "epoch": epoch, "steps": steps,
            "train_loss": sum(finite) / len(finite) if finite else math.nan,
            "test_loss": test_loss, "test_accuracy": acc, **eps,
            "train_wall_s": train_wall, "train_cpu_s": train_cpu,
            "eval_wall_s": e1 - e0, "accounting_wall_s": e2 - e1,
        })
        if verbose:
            print(f"{library} seed {seed} epoch {epoch}: test acc {100 * acc:.2f}%  eps PRV "
                  f"{eps['epsilon_prv']:.3f} RDP {eps['epsilon_rdp']:.3f}  train {train_wall:.1f} s wall, "
                  f"{train_cpu:.1f} s CPU", file=sys.stderr, flush=True)

    history = history_of(privacy_engine)
    return {
        "library": library, "seed": seed, "epochs": epochs,
        "setting": {"model": "SampleConvNet", "batch_size": batch_size, "lr": lr, "momentum": 0.0,
                    "noise_multiplier": noise_multiplier, "max_grad_norm": max_grad_norm, "delta": delta,
                    "n_train": len(train_set), "n_test": len(test_set),
                    "sample_rate": history[0][1] if history else None, "max_steps": max_steps,
                    "grad_sample_mode": "library default", "engine_accountant": "prv"},
        "records": records,
        "final": records[-1] if records else None,
        "history": history,
        "total_wall_s": time.perf_counter() - start,
        "threads": torch.get_num_threads(),
        "versions": versions(),
    }


# -- files --------------------------------------------------------------------------------------
def write_run(result: dict[str, Any], out: Path, extra: dict[str, Any]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{result['library']}-e{result['epochs']}-s{result['seed']}"
    result = {**result, **extra}
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    with open(out / f"{stem}.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in result["records"]:
            w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in CSV_FIELDS})
    return out / f"{stem}.json"


def load_runs(folder: Path = RESULTS) -> list[dict[str, Any]]:
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*-e*-s*.json"))]


REFERENCE = "accounting_reference.json"


def accounting_reference(history: list[tuple[float, float, int]], delta: float, epochs: int) -> dict[str, Any]:
    """Epsilon of ``history`` after 1..epochs epochs: dp-accounting's PLD (a third opinion), dpclip, Opacus."""
    (sigma, q, total), = history
    per_epoch = total // epochs
    rows = []
    for e in range(1, epochs + 1):
        row: dict[str, Any] = {"epoch": e, "steps": e * per_epoch}
        h = [(sigma, q, e * per_epoch)]
        for lib in LIBRARIES:
            try:
                row.update({f"{lib}_{k}": v for k, v in epsilons(lib, h, delta).items()})
            except ImportError:
                pass
        try:
            from dp_accounting import dp_event
            from dp_accounting.pld import pld_privacy_accountant

            acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
            acc.compose(dp_event.SelfComposedDpEvent(
                dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), e * per_epoch))
            row["dp_accounting_pld"] = float(acc.get_epsilon(delta))
        except ImportError:
            pass
        rows.append(row)
    return {"noise_multiplier": sigma, "sample_rate": q, "delta": delta,
            "pld_value_discretization_interval": 1e-4, "rows": rows, "versions": versions()}


# -- report -------------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float, float]:
    m = statistics.fmean(values)
    return m, (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
    """Per (library, epochs): the mean/std over seeds of the final numbers, medians of the times."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in runs:
        if r["setting"].get("max_steps") is None and r["setting"]["n_train"] == 60000:
            groups.setdefault((r["library"], r["epochs"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        walls = [e["train_wall_s"] for r in rs for e in r["records"]]
        cpus = [e["train_cpu_s"] for r in rs for e in r["records"]]
        out[key] = {
            "seeds": sorted(r["seed"] for r in rs),
            "acc": _mean_std([100 * r["final"]["test_accuracy"] for r in rs]),
            "eps_prv": _mean_std([r["final"]["epsilon_prv"] for r in rs]),
            "eps_rdp": _mean_std([r["final"]["epsilon_rdp"] for r in rs]),
            "wall": statistics.median(walls), "cpu": statistics.median(cpus),
            "wall_range": (min(walls), max(walls)), "cpu_range": (min(cpus), max(cpus)),
            "per_seed_acc": {r["seed"]: 100 * r["final"]["test_accuracy"] for r in rs},
            "per_epoch_acc": {e: [100 * r["records"][e - 1]["test_accuracy"] for r in rs if len(r["records"]) >= e]
                              for e in range(1, key[1] + 1)},
            "load": [r.get("load_average") for r in rs],
            "threads": sorted({r["threads"] for r in rs}),
            "versions": rs[0]["versions"],
        }
    return out


def report_table(summary: dict[tuple[str, int], dict[str, Any]]) -> str:
    lines = ["| library | epochs | seeds | final test acc % (mean ± std) | ε PRV | ε RDP | "
             "wall s/epoch (median, range) | CPU s/epoch (median, range) |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for (lib, ep), s in sorted(summary.items()):
        lines.append(
            f"| {lib} | {ep} | {','.join(map(str, s['seeds']))} | {s['acc'][0]:.2f} ± {s['acc'][1]:.2f} | "
            f"{s['eps_prv'][0]:.3f} | {s['eps_rdp'][0]:.3f} | {s['wall']:.2f} ({s['wall_range'][0]:.1f}–"
            f"{s['wall_range'][1]:.1f}) | {s['cpu']:.2f} ({s['cpu_range'][0]:.1f}–{s['cpu_range'][1]:.1f}) |")
    epochs = sorted({ep for _, ep in summary})
    for ep in epochs:
        d, o = summary.get(("dpclip", ep)), summary.get(("opacus", ep))
        if d and o:
            lines.append("")
            lines.append(
                f"Ratio dpclip / Opacus ({ep} epochs): accuracy difference {d['acc'][0] - o['acc'][0]:+.2f} points; "
                f"ε PRV {d['eps_prv'][0] / o['eps_prv'][0]:.4f}, ε RDP {d['eps_rdp'][0] / o['eps_rdp'][0]:.4f}; "
                f"median wall s/epoch **{d['wall'] / o['wall']:.2f}×**, median CPU s/epoch "
                f"**{d['cpu'] / o['cpu']:.2f}×**.")
    lines += ["", "Test accuracy % per epoch (mean ± std over seeds):", "",
              "| epoch | " + " | ".join(f"{lib} ({ep} epochs)" for lib, ep in sorted(summary)) + " |",
              "|---:|" + "---:|" * len(summary)]
    for e in range(1, max(ep for _, ep in summary) + 1):
        cells = []
        for key in sorted(summary):
            accs = summary[key]["per_epoch_acc"].get(e)
            cells.append("" if not accs else "{:.2f} ± {:.2f}".format(*_mean_std(accs)))
        lines.append(f"| {e} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Per seed, final test accuracy %:")
    lines.append("")
    for (lib, ep), s in sorted(summary.items()):
        accs = ", ".join(f"seed {k}: {v:.2f}" for k, v in sorted(s["per_seed_acc"].items()))
        loads = ", ".join("?" if la is None else f"{la[0]:.2f}" for la in s["load"])
        lines.append(f"- {lib}, {ep} epochs: {accs} (1-min load average at the start of each run: {loads}; "
                     f"threads {s['threads']})")
    return "\n".join(lines)


def reference_table(ref: dict[str, Any]) -> str:
    cols = [("dpclip_epsilon_prv", "dpclip PRV"), ("opacus_epsilon_prv", "Opacus PRV"),
            ("dp_accounting_pld", "dp-accounting PLD"), ("dpclip_epsilon_rdp", "dpclip RDP"),
            ("opacus_epsilon_rdp", "Opacus RDP")]
    cols = [c for c in cols if c[0] in ref["rows"][0]]
    lines = [f"ε at δ = {ref['delta']:g} for σ = {ref['noise_multiplier']:g}, q = {ref['sample_rate']:g} "
             f"({REFERENCE}; PLD discretisation {ref['pld_value_discretization_interval']:g}):", "",
             "| epoch | steps | " + " | ".join(c[1] for c in cols) + " |",
             "|---:|---:|" + "---:|" * len(cols)]
    for row in ref["rows"]:
        lines.append(f"| {row['epoch']} | {row['steps']} | " + " | ".join(f"{row[c[0]]:.4f}" for c in cols) + " |")
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colours = {"dpclip": "tab:blue", "opacus": "tab:orange"}
    full = [r for r in runs if r["setting"].get("max_steps") is None and r["setting"]["n_train"] == 60000]
    for r in full:
        ep = [e["epoch"] for e in r["records"]]
        kw = dict(color=colours[r["library"]], alpha=0.8, marker="o", ms=3,
                  linestyle=("-", "--", ":", "-.")[r["seed"] % 4])
        label = f"{r['library']} seed {r['seed']}"
        axes[0].plot(ep, [100 * e["test_accuracy"] for e in r["records"]], label=label, **kw)
        axes[1].plot(ep, [e["train_wall_s"] for e in r["records"]], label=label, **kw)
        axes[2].plot(ep, [e["train_cpu_s"] for e in r["records"]], label=label, **kw)
    for ax, title in zip(axes, ("test accuracy (%)", "training wall s / epoch", "training CPU s / epoch")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    for ax in axes[1:]:
        ax.set_ylim(bottom=0)
    fig.suptitle("Opacus MNIST example setting (SampleConvNet, B=240, σ=1.1, C=1.0, lr 0.25): dpclip vs Opacus")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


START, END = "<!-- generated: start (experiments/reproduce/opacus_mnist.py report) -->", "<!-- generated: end -->"


def report(folder: Path = RESULTS, md: Path = REPORT_MD, png: Path = REPORT_PNG) -> str:
    runs = load_runs(folder)
    if not runs:
        raise SystemExit(f"no runs in {folder}; run the train subcommand first")
    table = report_table(summarise(runs))
    quiet = load_runs(folder / "quiet") if (folder / "quiet").is_dir() else []
    if quiet:
        table += ("\n\nShort runs on a quiet machine (`quiet/`; the 1-minute load average is at the start of each run):"
                  "\n\n" + report_table(summarise(quiet)))
    ref_path = folder / REFERENCE
    if ref_path.is_file():
        table += "\n\n" + reference_table(json.loads(ref_path.read_text(encoding="utf-8")))
    block = f"{START}\n{table}\n\n![accuracy and time per epoch]({png.name})\n{END}"
    plot(runs, png)
    if md.is_file() and START in (text := md.read_text(encoding="utf-8")) and END in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = f"# Opacus MNIST example: dpclip beside Opacus\n\n{block}\n"
    md.write_text(text, encoding="utf-8")
    return block


# -- CLI ----------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train one seed with one library (or both in turn)")
    t.add_argument("--library", choices=(*LIBRARIES, "both", "both-reversed"), default="dpclip",
                   help="both: dpclip then opacus in this process; both-reversed: opacus then dpclip")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--epochs", type=int, default=SETTING["epochs"])
    t.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    t.add_argument("--max-steps", type=int, default=None, help="cap on steps per epoch (smoke runs)")
    t.add_argument("--out", default=str(RESULTS))
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    r = sub.add_parser("report", help="regenerate the table in docs/results/opacus_mnist.md and the PNG")
    r.add_argument("--out", default=str(RESULTS))
    ref = sub.add_parser("reference", help=f"epsilon of the runs' history from dp-accounting's PLD too ({REFERENCE})")
    ref.add_argument("--out", default=str(RESULTS))
    a = p.parse_args(argv)
    if a.cmd == "reference":
        runs = [r for r in load_runs(Path(a.out)) if r["setting"].get("max_steps") is None]
        if not runs:
            raise SystemExit(f"no full runs in {a.out}")
        r0 = runs[0]
        out = accounting_reference(r0["history"], r0["setting"]["delta"], r0["epochs"])
        (Path(a.out) / REFERENCE).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
        print(json.dumps(out["rows"][-1], indent=2))
        return 0
    if a.cmd == "report":
        print(report(Path(a.out)))
        return 0
    torch.set_num_threads(a.threads)
    libs = {"both": ["dpclip", "opacus"], "both-reversed": ["opacus", "dpclip"]}.get(a.library, [a.library])
    train_set, test_set = load_mnist()
    printed = []
    for lib in libs:
        load = os.getloadavg()
        result = run(lib, train_set, test_set, seed=a.seed, epochs=a.epochs, max_steps=a.max_steps,
                     progress=not a.no_progress, verbose=True)
        extra = {"load_average": load, "load_average_end": os.getloadavg(), "cpus": os.cpu_count(),
                 "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "niceness": os.nice(0),
                 "command": "nice -n 10 .venv/bin/python experiments/reproduce/opacus_mnist.py "
                            + " ".join(sys.argv[1:] if argv is None else argv),
                 "git": git_state(),
                 "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        path = write_run(result, Path(a.out), extra)
        printed.append({**result, **extra, "file": str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)})
        if not a.json:
            f = result["final"]
            print(f"{lib} seed {a.seed}: acc {100 * f['test_accuracy']:.2f}% eps PRV {f['epsilon_prv']:.3f} "
                  f"RDP {f['epsilon_rdp']:.3f} -> {path}")
    if a.json:
        json.dump(printed if len(printed) > 1 else printed[0], sys.stdout, indent=2)
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
