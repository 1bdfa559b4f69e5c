"""``dpclip train``: DP-SGD on a real image dataset, end to end, from one call.

::

    from dpclip.train import TrainConfig, train
    result = train(TrainConfig(dataset="mnist", target_epsilon=3.0, epochs=10))
    result["test_accuracy"], result["epsilon"]

The loop is the ordinary PyTorch loop on the model, optimizer and Poisson loader that
:meth:`dpclip.PrivacyEngine.make_private` (or ``make_private_with_epsilon``) returns::

    loss = F.cross_entropy(model(x), y); loss.backward(); optimizer.step(); optimizer.zero_grad()

After every epoch the model is evaluated on the test split under ``model.eval()`` and
``torch.no_grad()`` (the engine's hooks record nothing without autograd, so evaluation
neither spends privacy nor disturbs the next private step), and one row of metrics is
written. With ``out``, the run leaves in that folder:

* ``metrics.csv`` — one row per epoch: ``epoch, steps, train_loss, train_accuracy,
  test_loss, test_accuracy, epsilon, seconds``;
* ``curves.png`` — test accuracy and ε against epochs;
* ``checkpoint.pt`` — model and optimizer ``state_dict``, the privacy state (the engine's
  ``state_dict()``: accountant history, generator states, clipping thresholds), the config
  and the metrics;
* ``result.json`` — what :func:`train` returns.

All randomness comes from explicit ``torch.Generator`` s derived from ``seed`` (model
initialisation, the training subset, Poisson sampling and noise); torch's global RNG is
never used.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from .data import DATASETS, load_dataset
from .models import MODELS, build_model, count_parameters

__all__ = ["TrainConfig", "train", "evaluate", "check_config", "random_subset", "make_optimizer", "default_threads",
           "layer_bounds", "METRIC_FIELDS"]

OPTIMIZERS = ("sgd", "adam")
CLIPPINGS = ("flat", "per_layer", "automatic", "batch", "adaptive_layerwise")
ACCOUNTANTS = ("prv", "rdp")
CONTROLLERS = ("none", "quantile", "quantile-fixed-total")
LR_SCHEDULES = ("constant", "cosine")
METRIC_FIELDS = ("epoch", "steps", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "epsilon", "seconds")


@dataclass(frozen=True)
class TrainConfig:
    """One training run. Give exactly one of ``target_epsilon`` and ``noise_multiplier``.

    ``batch_size`` is the *expected* Poisson batch size: ``sample_rate = batch_size / N``.
    ``max_grad_norm`` is the clipping bound C (``per_layer`` / ``adaptive_layerwise``: the
    engine gives each of the L layers C / sqrt(L), so the total sensitivity is still C;
    ``automatic`` ignores it). ``clip_controller``: ``"none"`` keeps C fixed, ``"quantile"``
    moves it towards the median per-sample norm from privatised counts (Andrew et al. 2021;
    ``adaptive_layerwise`` uses it by default); ``"quantile-fixed-total"`` moves per-layer thresholds
    the same way, then rescales them so that ``sqrt(sum_l C_l^2)`` stays ``max_grad_norm``
    (``dpclip.controllers.Quantile(keep_total=max_grad_norm)``). ``batch_clip_size``: ``batch`` clipping only,
    the expected micro-batch size (default: the whole batch is one unit). ``layerwise``:
    ``batch`` clipping only, one threshold per layer (module with its own trainable
    parameters), each ``max_grad_norm / sqrt(L)``, so the unit's sensitivity is still
    ``2 max_grad_norm``; with ``clip_controller="quantile"`` the per-layer thresholds move
    from privatised counts: batch clipping with adaptive layer-wise clipping (Nguyen et al.
    2023). ``width``: channels of the first stage of the ``resnet18`` / ``resnet18-bn``
    models (default: :class:`dpclip.models.ResNet18`'s 32).
    ``lr_schedule``: ``"constant"``, or ``"cosine"`` (from ``lr`` down to 0 over the planned
    steps, one update per step). ``pixels``: how images are scaled (:func:`dpclip.data.to_tensors`);
    by default ``"unit"`` ([0, 1]) for MNIST and Fashion-MNIST and ``"standard"`` for CIFAR-10,
    as Tramèr & Boneh do. ``max_steps`` stops the run early (ε is what the steps run spent);
    ``train_subset`` trains on a random subset of that many training examples; ``threads``
    defaults to the CPUs this process may use less the machine's current load
    (:func:`default_threads`); the previous torch thread count is restored afterwards.
    """

    dataset: str = "mnist"
    data_dir: str | None = None
    model: str = "cnn"
    target_epsilon: float | None = None
    noise_multiplier: float | None = None
    delta: float = 1e-5
    epochs: int = 10
    batch_size: int = 512
    lr: float = 0.5
    lr_schedule: str = "constant"
    momentum: float = 0.9
    optimizer: str = "sgd"
    clipping: str = "flat"
    max_grad_norm: float = 0.1
    clip_controller: str = "none"
    batch_clip_size: int | None = None
    layerwise: bool = False
    width: int | None = None
    accountant: str = "prv"
    grad_sample_mode: str = "auto"
    seed: int = 0
    max_steps: int | None = None
    train_subset: int | None = None
    threads: int | None = None
    out: str | None = None
    progress: bool | None = None  # None: a progress bar when stderr is a terminal
    eval_batch_size: int = 1024
    pixels: str | None = None  # None: "unit" for MNIST/Fashion-MNIST, "standard" for CIFAR-10 (as the paper)


def check_config(cfg: TrainConfig) -> None:
    """Raise ``ValueError`` listing every invalid setting of ``cfg`` with its fix."""
    problems = []
    if cfg.dataset not in DATASETS:
        problems.append(f"dataset {cfg.dataset!r} is not one of {', '.join(DATASETS)}")
    if cfg.model not in MODELS:
        problems.append(f"model {cfg.model!r} is not one of {', '.join(MODELS)}")
    if (cfg.target_epsilon is None) == (cfg.noise_multiplier is None):
        problems.append("give exactly one of target_epsilon (e.g. 3) and noise_multiplier (e.g. 1.0)")
    if cfg.target_epsilon is not None and not 0 < cfg.target_epsilon < math.inf:
        problems.append(f"target_epsilon must be a finite number > 0 (e.g. 3); got {cfg.target_epsilon}")
    if cfg.noise_multiplier is not None and not 0 <= cfg.noise_multiplier < math.inf:
        problems.append(f"noise_multiplier must be >= 0 (e.g. 1.0); got {cfg.noise_multiplier}")
    if not 0 < cfg.delta < 1:
        problems.append(f"delta must be in (0, 1), below 1 / dataset size (e.g. 1e-5); got {cfg.delta}")
    for name in ("epochs", "batch_size", "eval_batch_size"):
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{name} must be a whole number >= 1; got {value!r}")
    for name in ("max_steps", "train_subset", "threads", "batch_clip_size", "width"):
        value = getattr(cfg, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            problems.append(f"{name} must be a whole number >= 1 (or unset); got {value!r}")
    if not 0 < cfg.lr < math.inf:
        problems.append(f"lr must be a finite number > 0 (e.g. 0.5); got {cfg.lr}")
    if cfg.lr_schedule not in LR_SCHEDULES:
        problems.append(f"lr_schedule {cfg.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
    if cfg.pixels not in (None, "unit", "standard"):
        problems.append(f"pixels {cfg.pixels!r} is not one of unit, standard")
    if not 0 <= cfg.momentum < 1:
        problems.append(f"momentum must be in [0, 1) (e.g. 0.9); got {cfg.momentum}")
    if cfg.optimizer not in OPTIMIZERS:
        problems.append(f"optimizer {cfg.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if cfg.clipping not in CLIPPINGS:
        problems.append(f"clipping {cfg.clipping!r} is not one of {', '.join(CLIPPINGS)}")
    if not 0 < cfg.max_grad_norm < math.inf:
        problems.append(f"max_grad_norm must be a finite number > 0 (e.g. 0.1); got {cfg.max_grad_norm}")
    if cfg.clip_controller not in CONTROLLERS:
        problems.append(f"clip_controller {cfg.clip_controller!r} is not one of {', '.join(CONTROLLERS)}")
    if cfg.batch_clip_size is not None and cfg.clipping != "batch":
        problems.append(f"batch_clip_size is for clipping 'batch'; got clipping {cfg.clipping!r}")
    if not isinstance(cfg.layerwise, bool):
        problems.append(f"layerwise must be True or False; got {cfg.layerwise!r}")
    elif cfg.layerwise and cfg.clipping != "batch":
        problems.append(f"layerwise is for clipping 'batch' (per_layer and adaptive_layerwise are already "
                        f"layer-wise); got clipping {cfg.clipping!r}")
    if cfg.width is not None and cfg.model not in ("resnet18", "resnet18-bn"):
        problems.append(f"width is for the resnet18 / resnet18-bn models; got model {cfg.model!r}")
    if cfg.accountant not in ACCOUNTANTS:
        problems.append(f"accountant {cfg.accountant!r} is not one of {', '.join(ACCOUNTANTS)}")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        problems.append(f"seed must be a whole number >= 0; got {cfg.seed!r}")
    if problems:
        raise ValueError("; ".join(problems))


# -- small pieces -----------------------------------------------------------------------------
def _generators(seed: int) -> dict[str, torch.Generator]:
    """Independent generators for the model, the subset and the private steps, all from ``seed``."""
    root = torch.Generator().manual_seed(seed)
    seeds = torch.randint(0, 2**62, (3,), generator=root).tolist()
    return {k: torch.Generator().manual_seed(s) for k, s in zip(("model", "subset", "private"), seeds)}


def random_subset(dataset: TensorDataset, n: int | None, generator: torch.Generator) -> TensorDataset:
    """``n`` examples of ``dataset`` drawn without replacement (all of it if ``n`` is None)."""
    total = len(dataset)
    if n is None:
        return dataset
    if n > total:
        raise ValueError(f"train_subset={n} is larger than the training set ({total} examples); use at most {total}")
    index = torch.randperm(total, generator=generator)[:n]
    return TensorDataset(*(t[index] for t in dataset.tensors))


def layer_bounds(model: nn.Module, max_grad_norm: float) -> dict[str, float]:
    """``{module name: max_grad_norm / sqrt(L)}`` for the ``L`` modules with their own trainable parameters.

    The same layers, and the same split of ``max_grad_norm``, as the engine's ``per_layer``
    clipping with a float bound; as a dict it also works with ``clipping="batch"``.
    """
    names = [name for name, m in model.named_modules()
             if any(p.requires_grad for p in m.parameters(recurse=False))]
    return {name: max_grad_norm / math.sqrt(len(names)) for name in names}


def _build_model(cfg: TrainConfig, channels: int, image_size: int, generator: torch.Generator) -> nn.Module:
    """``build_model``, or a :class:`ResNet18` of ``cfg.width`` seeded from ``generator`` the same way."""
    if cfg.width is None:
        return build_model(cfg.model, channels, 10, image_size=image_size, generator=generator)
    from .models import ResNet18, init_parameters

    with torch.random.fork_rng(devices=[]):  # construction draws from the global RNG: undo that
        model = ResNet18(channels, 10, norm="batch" if cfg.model == "resnet18-bn" else "group", width=cfg.width)
    return init_parameters(model, generator)


def make_optimizer(name: str, params: Any, lr: float, momentum: float) -> torch.optim.Optimizer:
    """``"sgd"`` (with ``momentum``) or ``"adam"`` (``momentum`` is Adam's beta1)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(momentum, 0.999))
    raise ValueError(f"optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}")


def lr_schedule(optimizer: torch.optim.Optimizer, kind: str, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step learning-rate factor: 1 (``"constant"``) or ``(1 + cos(pi t / total_steps)) / 2`` (``"cosine"``).

    Post-processing of the private gradients: a schedule costs no privacy.
    """
    if kind == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1.0)
    if kind == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda t: 0.5 * (1.0 + math.cos(math.pi * min(t, total_steps) / total_steps)))
    raise ValueError(f"lr_schedule {kind!r} is not one of {', '.join(LR_SCHEDULES)}")


@torch.no_grad()
def evaluate(model: nn.Module, dataset: TensorDataset, batch_size: int = 1024) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy)`` of ``model`` on ``dataset``, in eval mode, without autograd.

    ``dataset`` holds images ``[N, C, H, W]`` and labels ``[N]``. The model's training mode is
    restored afterwards. Without autograd, dpclip's hooks record nothing, so this spends no
    privacy and leaves the next private step as it was.
    """
    was_training = model.training
    model.eval()
    try:
        x_all, y_all = dataset.tensors[:2]
        loss_sum, correct = 0.0, 0
        for start in range(0, len(y_all), batch_size):
            x, y = x_all[start:start + batch_size], y_all[start:start + batch_size]
            logits = model(x)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
        n = max(1, len(y_all))
        return loss_sum / n, correct / n
    finally:
        model.train(was_training)


class _Running:
    """Running mean loss and accuracy over the non-empty training batches of an epoch."""

    def __init__(self) -> None:
        self.loss_sum, self.correct, self.count = 0.0, 0, 0

    def add(self, logits: torch.Tensor, y: torch.Tensor, loss: torch.Tensor) -> None:
        n = len(y)
        self.loss_sum += float(loss) * n
        self.correct += int((logits.argmax(1) == y).sum())
        self.count += n

    @property
    def loss(self) -> float:
        return self.loss_sum / self.count if self.count else math.nan

    @property
    def accuracy(self) -> float:
        return self.correct / self.count if self.count else math.nan


def _progress_bar(total: int, desc: str, enabled: bool, log: TextIO):
    """A tqdm bar on ``log`` (None when disabled); its postfix shows loss, accuracy and epsilon so far."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=False, file=log, dynamic_ncols=True, unit="step", mininterval=0.5)


# -- output files -----------------------------------------------------------------------------
def write_metrics(path: Path, rows: list[dict[str, float]]) -> None:
    """Write ``rows`` (dicts with :data:`METRIC_FIELDS`) to ``path`` as CSV."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row[k] for k in METRIC_FIELDS})


def plot_curves(path: Path, rows: list[dict[str, float]], title: str, delta: float) -> None:
    """A PNG of test accuracy (left axis, %) and ε (right axis) against epochs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    epochs = [r["epoch"] for r in rows]
    ax.plot(epochs, [100 * r["test_accuracy"] for r in rows], marker="o", color="C0", label="test accuracy")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)", color="C0")
    ax.grid(True, alpha=0.3)
    eps_ax = ax.twinx()
    eps_ax.plot(epochs, [r["epsilon"] for r in rows], marker="s", color="C1", label="\u03b5")
    eps_ax.set_ylabel(f"\u03b5 at \u03b4 = {delta:g}", color="C1")
    eps_ax.set_ylim(bottom=0)
    ax.set_title(title)
    fig.savefig(path, dpi=120)


def privacy_state(engine: Any, generator: torch.Generator) -> dict[str, Any]:
    """``{"engine": engine.state_dict()}`` (accountant, generators, thresholds) where the engine has one,
    else ``{"accountant": ..., "generator": ...}``: the accountant's history and the generator's state."""
    if hasattr(engine, "state_dict"):
        return {"engine": engine.state_dict()}
    return {"accountant": engine.accountant.state_dict(), "generator": generator.get_state()}


# -- the run ----------------------------------------------------------------------------------
@dataclass
class _Setup:
    """Everything a run trains with, after ``make_private``."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    engine: Any
    test_set: TensorDataset
    train_size: int
    pixels: str
    generator: torch.Generator
    total_steps: int
    schedule: torch.optim.lr_scheduler.LambdaLR
    steps_per_epoch: int  # logical (private) steps; in batch clipping the loader yields several units per step


def default_threads(cpus: int | None = None, load: float | None = None) -> int:
    """Torch threads for a run: the CPUs this process may use, less those other work keeps busy.

    ``cpus`` defaults to the CPU affinity count, ``load`` to the 1-minute load average. On a
    shared machine, torch's thread pool slows down by an order of magnitude when it has to
    wait for cores other processes hold (measured here: a DP step of the MNIST CNN took 137 ms
    with 1 thread and 0.9-2.3 s with 2 threads at a load average of 5 on 2 cores), so a busy
    machine gets fewer threads; an idle one gets all of them.
    """
    if cpus is None:
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:  # pragma: no cover - not Linux
            cpus = os.cpu_count() or 1
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # pragma: no cover - no load average on this platform
            load = 0.0
    return max(1, min(cpus, cpus - int(load + 0.5)))


def _epochs_done(epoch: int, steps_this_epoch: int, steps_per_epoch: int) -> float | int:
    """``epoch`` when it ran in full, else the fraction done (``max_steps`` cut it short)."""
    if steps_this_epoch >= steps_per_epoch:
        return epoch
    return round(epoch - 1 + steps_this_epoch / steps_per_epoch, 4)


def _epsilon(engine: Any, delta: float) -> float:
    return float(engine.get_epsilon(delta)) if engine.accountant.history else 0.0


def _prepare(cfg: TrainConfig, gens: dict[str, torch.Generator]) -> _Setup:
    """Data, model, optimizer and the private engine for ``cfg``."""
    from . import PrivacyEngine

    pixels = cfg.pixels or ("standard" if cfg.dataset == "cifar10" else "unit")
    train_set, test_set = load_dataset(cfg.dataset, cfg.data_dir, pixels=pixels)
    train_set = random_subset(train_set, cfg.train_subset, gens["subset"])
    if cfg.delta >= 1 / len(train_set):
        raise ValueError(f"delta={cfg.delta:g} is not below 1 / training-set size (1/{len(train_set)}); "
                         "use a smaller delta (e.g. 1e-5)")
    channels, height = train_set.tensors[0].shape[1:3]
    model = _build_model(cfg, channels, height, gens["model"])
    optimizer = make_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.momentum)
    loader = DataLoader(train_set, batch_size=min(cfg.batch_size, len(train_set)))
    steps_per_epoch = len(loader)  # the engine's Poisson sampler draws this many logical batches per pass
    engine = PrivacyEngine(accountant=cfg.accountant)
    common: dict[str, Any] = dict(module=model, optimizer=optimizer, data_loader=loader,
                                  max_grad_norm=layer_bounds(model, cfg.max_grad_norm) if cfg.layerwise
                                  else cfg.max_grad_norm, poisson_sampling=True, clipping=cfg.clipping,
                                  grad_sample_mode=cfg.grad_sample_mode, generator=gens["private"])
    if cfg.clip_controller == "quantile":
        from .controllers import Quantile

        common["clip_controller"] = Quantile()
    elif cfg.clip_controller == "quantile-fixed-total":
        from .controllers import Quantile

        common["clip_controller"] = Quantile(keep_total=cfg.max_grad_norm)
    if cfg.batch_clip_size is not None:
        common["batch_clip_size"] = cfg.batch_clip_size
    if cfg.target_epsilon is not None:
        model, optimizer, loader = engine.make_private_with_epsilon(
            target_epsilon=cfg.target_epsilon, target_delta=cfg.delta, epochs=cfg.epochs, **common)
    else:
        model, optimizer, loader = engine.make_private(noise_multiplier=cfg.noise_multiplier, **common)
    planned = cfg.epochs * steps_per_epoch
    total = planned if cfg.max_steps is None else min(cfg.max_steps, planned)
    return _Setup(model, optimizer, loader, engine, test_set, len(train_set), pixels, gens["private"], total,
                  lr_schedule(optimizer, cfg.lr_schedule, total), steps_per_epoch)


def _train_epoch(s: _Setup, cfg: TrainConfig, epoch: int, steps: int, log: TextIO,
                 show_bar: bool) -> tuple[_Running, int]:
    """One pass over the Poisson loader (or up to ``s.total_steps``); returns running stats and steps done.

    A step is a logical (private) step: in batch clipping with micro-batches the loader yields
    one unit per item and the engine releases the step after the last unit, so steps are
    counted from the engine's own count.
    """
    running = _Running()
    per_epoch = s.steps_per_epoch
    bar = _progress_bar(min(per_epoch, s.total_steps - steps), f"epoch {epoch}/{cfg.epochs}", show_bar, log)
    eps_every = max(1, per_epoch // 10)  # epsilon for the bar about ten times an epoch (it costs milliseconds)
    epsilon = _epsilon(s.engine, cfg.delta)
    for x, y in s.loader:
        if len(y) > 0:
            logits = s.model(x)
            loss = F.cross_entropy(logits, y)
            loss.backward()
            running.add(logits.detach(), y, loss.detach())
        released_before = getattr(s.engine, "steps", None)
        s.optimizer.step()  # an empty Poisson batch still adds noise and an accounting step
        s.optimizer.zero_grad(set_to_none=True)
        if released_before is not None and s.engine.steps == released_before:
            continue  # a micro-batch unit that is not the last of its step: nothing released yet
        s.schedule.step()
        steps += 1
        if steps == 1:
            sigma, q, _ = s.engine.accountant.history[-1]
            calibrated = f" (calibrated for \u03b5 = {cfg.target_epsilon:g} after {cfg.epochs} epochs)" \
                if cfg.target_epsilon is not None else ""
            print(f"noise multiplier {sigma:.4g}, sample rate {q:.4g}{calibrated}", file=log, flush=True)
        if bar is not None:
            fresh = steps % eps_every == 0  # about ten times an epoch: new epsilon, and redraw
            if fresh:
                epsilon = _epsilon(s.engine, cfg.delta)
            bar.update(1)
            bar.set_postfix(loss=f"{running.loss:.3f}", acc=f"{100 * running.accuracy:.1f}%", eps=f"{epsilon:.3g}",
                            refresh=fresh)
        if steps >= s.total_steps:
            break
    if bar is not None:
        bar.close()
    return running, steps


def _result(cfg: TrainConfig, s: _Setup, rows: list[dict[str, float]], steps: int, threads: int) -> dict[str, Any]:
    last = rows[-1]
    noise_multiplier, sample_rate, _ = s.engine.accountant.history[-1]  # what the engine ran with
    return {
        "test_accuracy": last["test_accuracy"], "test_loss": last["test_loss"], "epsilon": last["epsilon"],
        "delta": cfg.delta, "epochs": last["epoch"], "steps": steps, "seconds": None,
        "noise_multiplier": noise_multiplier, "sample_rate": sample_rate, "accountant": cfg.accountant,
        "history": [list(h) for h in s.engine.accountant.history], "target_epsilon": cfg.target_epsilon,
        "dataset": cfg.dataset, "model": cfg.model, "parameters": count_parameters(s.model),
        "train_size": s.train_size, "test_size": len(s.test_set), "batch_size": cfg.batch_size, "lr": cfg.lr,
        "lr_schedule": cfg.lr_schedule, "pixels": s.pixels, "momentum": cfg.momentum, "optimizer": cfg.optimizer,
        "clipping": cfg.clipping, "max_grad_norm": cfg.max_grad_norm, "clip_controller": cfg.clip_controller,
        "batch_clip_size": cfg.batch_clip_size, "layerwise": cfg.layerwise, "width": cfg.width,
        "clip_thresholds": [float(c) for c in getattr(s.engine, "max_grad_norm", ())],
        "seed": cfg.seed, "threads": threads, "metrics": rows, "files": {},
    }


def _write_outputs(out: Path, cfg: TrainConfig, s: _Setup, result: dict[str, Any]) -> dict[str, str]:
    """curves.png and checkpoint.pt (metrics.csv is written after every epoch); returns the paths."""
    files = {"metrics": out / "metrics.csv", "plot": out / "curves.png", "checkpoint": out / "checkpoint.pt",
             "result": out / "result.json"}
    plot_curves(files["plot"], result["metrics"], f"dpclip: {cfg.dataset}, {cfg.model}, "
                f"\u03c3 = {result['noise_multiplier']:.3g}, q = {result['sample_rate']:.3g}", cfg.delta)
    torch.save({"model": s.model.state_dict(), "optimizer": s.optimizer.state_dict(),
                "privacy": privacy_state(s.engine, s.generator), "config": asdict(cfg), "metrics": result["metrics"],
                "noise_multiplier": result["noise_multiplier"], "sample_rate": result["sample_rate"],
                "steps": result["steps"]}, files["checkpoint"])
    return {k: str(v) for k, v in files.items()}


def train(cfg: TrainConfig, *, log: TextIO | None = None,
          on_epoch: Callable[[dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Train ``cfg.model`` on ``cfg.dataset`` with DP-SGD; returns the result (see the keys below).

    Result keys: ``test_accuracy``, ``test_loss``, ``epsilon`` (spent, at ``delta``),
    ``delta``, ``epochs`` (completed, fractional if ``max_steps`` cut the last one short),
    ``steps``, ``seconds`` (wall time: data, training and evaluation), ``noise_multiplier``,
    ``sample_rate``, ``accountant``, ``history`` (the accountant's ``(noise_multiplier,
    sample_rate, steps)`` segments), ``train_size``, ``test_size``, ``parameters``, the
    settings, ``metrics`` (one row per epoch) and ``files`` (paths written under ``out``).
    Progress and one line per epoch go to ``log`` (default ``sys.stderr``); ``on_epoch`` is
    called with each epoch's metrics row.
    """
    check_config(cfg)
    previous_threads = torch.get_num_threads()
    threads = cfg.threads or default_threads()
    torch.set_num_threads(threads)
    try:
        return _run(cfg, threads, sys.stderr if log is None else log, on_epoch)
    finally:
        torch.set_num_threads(previous_threads)


def _run(cfg: TrainConfig, threads: int, log: TextIO,
         on_epoch: Callable[[dict[str, float]], None] | None) -> dict[str, Any]:
    start = time.perf_counter()
    s = _prepare(cfg, _generators(cfg.seed))
    print(f"dpclip train: {cfg.dataset} ({s.train_size} train / {len(s.test_set)} test), model {cfg.model} "
          f"({count_parameters(s.model)} parameters), expected batch {cfg.batch_size}, "
          f"{s.steps_per_epoch} steps/epoch, "
          f"{threads} thread{'s' if threads != 1 else ''}", file=log, flush=True)
    out = Path(cfg.out) if cfg.out is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    show_bar = cfg.progress if cfg.progress is not None else bool(getattr(log, "isatty", lambda: False)())
    rows: list[dict[str, float]] = []
    steps, epoch = 0, 0
    s.model.train()
    while steps < s.total_steps:
        epoch += 1
        epoch_start, first_step = time.perf_counter(), steps
        running, steps = _train_epoch(s, cfg, epoch, steps, log, show_bar)
        test_loss, test_accuracy = evaluate(s.model, s.test_set, cfg.eval_batch_size)
        row = {"epoch": _epochs_done(epoch, steps - first_step, s.steps_per_epoch), "steps": steps,
               "train_loss": running.loss, "train_accuracy": running.accuracy, "test_loss": test_loss,
               "test_accuracy": test_accuracy, "epsilon": _epsilon(s.engine, cfg.delta),
               "seconds": time.perf_counter() - epoch_start}
        rows.append(row)
        print(f"epoch {row['epoch']:g}/{cfg.epochs}  train loss {row['train_loss']:.4f}  train acc "
              f"{100 * row['train_accuracy']:.2f}%  test acc {100 * test_accuracy:.2f}%  "
              f"\u03b5 {row['epsilon']:.3f}  {row['seconds']:.1f}s", file=log, flush=True)
        if out is not None:
            write_metrics(out / "metrics.csv", rows)
        if on_epoch is not None:
            on_epoch(row)
    result = _result(cfg, s, rows, steps, threads)
    if out is not None:
        result["files"] = _write_outputs(out, cfg, s, result)
    result["seconds"] = time.perf_counter() - start
    if out is not None:
        Path(result["files"]["result"]).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result
