#!/usr/bin/env python
"""Engine benchmark: one DP-SGD step, non-private vs dpclip (each mode) vs Opacus 1.6 (each mode).

One process times every method on the same models, the same batches and the same batch size:

* ``non-private``      plain ``loss.backward(); optimizer.step()``;
* ``dpclip auto``      ``dpclip.PrivacyEngine().make_private(grad_sample_mode="auto")``;
* ``dpclip auto+anchor`` the same with ``GradSampler.anchor_first_layers`` switched on (first
  layers' weight gradients skipped by autograd as well); make_private's default since 274e1ae,
  so now the same as ``dpclip auto`` (kept to compare with older results);
* ``dpclip hooks``     ``grad_sample_mode="hooks"`` (norms from materialised per-sample grads);
* ``dpclip bookkeeping`` ``grad_sample_mode="bookkeeping"``;
* ``dpclip vmap``      ``grad_sample_mode="vmap"`` (every layer through torch.func; skipped with
  the reason if this dpclip does not have the mode);
* ``opacus hooks`` / ``opacus functorch`` / ``opacus ghost`` -- Opacus 1.6's ``PrivacyEngine``;
  ghost uses the criterion wrapper that ``make_private(..., criterion=...)`` returns, whose
  ``loss.backward()`` runs Opacus's two backward passes.

A step is ``zero_grad -> forward -> loss -> backward -> optimizer.step()`` (clip, noise, SGD
update). Settings: ``poisson_sampling=False`` with a fixed batch size (every method sees the
same batches, cycled from 4 fixed synthetic batches), ``noise_multiplier=1.0``,
``max_grad_norm=1.0``, flat clipping, mean loss, SGD lr 0.05, ``torch.set_num_threads(2)``.

Models (synthetic data; sizes picked for a 2-core CPU):

* ``mlp``  784-512-512-10 MLP (perf-baseline W1), 28x28 inputs, B=256;
* ``cnn``  Opacus's MNIST SampleConvNet with GroupNorm after each conv (perf-baseline W2), B=256;
* ``text`` Embedding(5000, 64) + LayerNorm + per-token Linear(64, 64) + ReLU, mean-pool over
  T=64, Linear(64, 2), B=128;
* ``cifar`` Opacus's CIFAR-10 convnet, 4 x (conv3x3 + GroupNorm + ReLU + avg-pool) (W3), B=256;
* ``transformer`` Embedding(10k, 128) + sinusoidal positions + 2 pre-LN blocks with hand-written
  4-head attention, T=64 (W4), B=256;
* ``lstm`` Embedding(1000, 32) + ``nn.LSTM(32, 64, batch_first=True)`` + Linear(64, 2) on the
  last step, T=32, B=64;
* ``lstm-w5`` the same at W5's size: Embedding(10k, 128) + ``nn.LSTM(128, 128)`` + Linear(128, 2),
  T=32, B=256 (perf-baseline W5). dpclip hooks the user's ``nn.LSTM`` and takes its exact
  per-sample gradients by recomputing the recurrence batched (``dpclip.grad_sample.rnn``).
  Opacus cannot train ``nn.LSTM``: its rows use ``ModuleValidator.fix(model)``, which swaps in
  ``opacus.layers.DPLSTM`` (same function, same parameter names, a Python loop over time), so
  the Opacus rows run a slower module than the ``non-private`` row. A ``non-private DPLSTM``
  row shows that floor.

Timing. Every method has its own copy of the same initial model. After ``WARMUP`` (5)
warm-up steps per method (dpclip's first step also runs its one-off audit), timed steps are
interleaved: each round steps every method once, in an order drawn afresh per round (seeded
by the round: :func:`round_order`), ``--steps`` (default 20) rounds. Reported: the median
wall ms/step, samples/s (B / median), the ratio to the ``non-private`` median of the same
run, the minimum, and the median process CPU time per step (user+sys of both threads; less
sensitive to other tenants of a shared machine).

Peak memory. Each (model, method) cell runs in a fresh subprocess in which glibc returns every
freed block of 64 KiB or more to the kernel (``MALLOC_MMAP_THRESHOLD_=65536``), so RSS follows
the live tensor bytes rather than what the allocator keeps. Imports (torch, dpclip and Opacus:
their imports alone add 43 / 74 MB of RSS), model and data are built, and RSS is read; the
method is set up and runs its 2 warm-up steps (dpclip's first-step audit included); the RSS
high-water mark is reset (``echo 5 > /proc/self/clear_refs``) and 2 more steps run.
``peak MB = VmHWM(end) - VmRSS(before set-up)``: the steady-state peak of what the method adds
on top of the model and data (gradients, activations, autograd graph, per-sample tensors,
hooks' captures, noise, and anything kept between steps). ``ru_maxrss`` is not used: in a
child it inherits the parent's high-water mark. torch has no CPU allocator statistics
(``torch.cuda.memory_stats`` is CUDA-only), and ``tracemalloc`` does not see tensor storage.
Where clear_refs is unavailable the high-water mark includes the warm-up, marked ``*``.

Correctness (on the side). With ``noise_multiplier=0`` and SGD lr 0, one step on the first
batch; the gradient each method leaves in ``p.grad`` (clipped sum / B) is compared with Opacus
hooks' (same flat clipping; Opacus divides by ``norm + 1e-6``, a < 1e-6 relative difference)
and with a float64 per-sample loop (the ground truth). ``rel`` = max |a - b| over every
parameter entry / max |b|; dpclip passes if ``rel vs opacus <= 1e-5``.

``OMP_WAIT_POLICY=PASSIVE`` is set before torch is imported (unless already set): with
libgomp's default spinning, an oversubscribed 2-vCPU VM quantises steps to the 4 ms scheduler
tick (see docs research perf-baseline.md). It applies to every method alike.

    python experiments/benchmarks/engine.py                      # all models, table
    python experiments/benchmarks/engine.py --quick              # cnn only, 5 steps, no memory
    python experiments/benchmarks/engine.py --models mlp,text --batch-size 64 --json out/engine.json
    python experiments/benchmarks/engine.py --profile lstm "dpclip auto"   # cProfile + torch.profiler
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp

import argparse
import contextlib
import copy
import io
import json
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

CPU = torch.device("cpu")
THREADS = 2
NOISE = 1.0
CLIP = 1.0
LR = 0.05
N_BATCHES = 4
WARMUP = 5  # the allocator's heap takes a few steps to settle (page faults per step fall, docs E17)
MEM_STEPS = 2  # steady-state steps in the peak-memory subprocess

# --------------------------------------------------------------------------- models


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(784, 512)
        self.fc2 = nn.Linear(512, 512)
        self.fc3 = nn.Linear(512, 10)

    def forward(self, x):
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class SampleConvNet(nn.Module):
    """Opacus examples/mnist.py SampleConvNet, GroupNorm after each conv (perf-baseline W2)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 8, 2, padding=3)
        self.gn1 = nn.GroupNorm(8, 16)
        self.conv2 = nn.Conv2d(16, 32, 4, 2)
        self.gn2 = nn.GroupNorm(8, 32)
        self.fc1 = nn.Linear(32 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.gn1(self.conv1(x)))  # [B, 16, 14, 14]
        x = F.max_pool2d(x, 2, 1)  # [B, 16, 13, 13]
        x = F.relu(self.gn2(self.conv2(x)))  # [B, 32, 5, 5]
        x = F.max_pool2d(x, 2, 1)  # [B, 32, 4, 4]
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class TextModel(nn.Module):
    def __init__(self, vocab=5000, dim=64, classes=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        h = F.relu(self.proj(self.norm(self.emb(x))))  # [B, T, D]
        return self.head(h.mean(1))


class LSTMModel(nn.Module):
    def __init__(self, vocab=1000, dim=32, hidden=64, classes=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, classes)

    def forward(self, x):
        out, _ = self.lstm(self.emb(x))
        return self.fc(out[:, -1])


class CifarConvNet(nn.Module):
    """Opacus examples/cifar10.py convnet (perf-baseline W3): 4 x (conv3x3 + GroupNorm(8) + ReLU + avg-pool)."""

    def __init__(self):
        super().__init__()
        chans = [3, 32, 64, 64, 128]
        self.convs = nn.ModuleList(nn.Conv2d(chans[i], chans[i + 1], 3, padding=1) for i in range(4))
        self.norms = nn.ModuleList(nn.GroupNorm(8, chans[i + 1]) for i in range(4))
        self.fc = nn.Linear(128, 10)

    def forward(self, x):
        for conv, norm in zip(self.convs, self.norms):
            x = F.avg_pool2d(F.relu(norm(conv(x))), 2)  # 32 -> 16 -> 8 -> 4 -> 2
        return self.fc(x.mean((2, 3)))


class _Block(nn.Module):
    """Pre-LN transformer block with hand-written 4-head attention (only Linear and LayerNorm)."""

    def __init__(self, dim=128, heads=4, ffn=512):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ff1, self.ff2 = nn.Linear(dim, ffn), nn.Linear(ffn, dim)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / (D // self.heads) ** 0.5, dim=-1)
        x = x + self.out((att @ v).transpose(1, 2).reshape(B, T, D))
        return x + self.ff2(F.gelu(self.ff1(self.ln2(x))))


class Transformer(nn.Module):
    """perf-baseline W4: Embedding(10k,128) + sinusoidal positions (a buffer) + 2 pre-LN blocks, T=64."""

    def __init__(self, vocab=10_000, dim=128, seq=64, classes=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        pos = torch.arange(seq)[:, None] / (10_000 ** (torch.arange(0, dim, 2) / dim))
        self.register_buffer("pos", torch.cat([pos.sin(), pos.cos()], dim=1))
        self.blocks = nn.ModuleList(_Block(dim) for _ in range(2))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        h = self.emb(x) + self.pos[: x.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(h.mean(1))


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, torch.Generator], torch.Tensor]
    classes: int
    batch_size: int
    opacus_fix: bool = False  # Opacus needs ModuleValidator.fix (nn.LSTM -> DPLSTM)


MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec(
        "mlp", "MLP 784-512-512-10", MLP, lambda n, g: torch.randn(n, 1, 28, 28, generator=g), 10, 256
    ),
    "cnn": ModelSpec(
        "cnn",
        "SampleConvNet + GroupNorm, 28x28",
        SampleConvNet,
        lambda n, g: torch.randn(n, 1, 28, 28, generator=g),
        10,
        256,
    ),
    "text": ModelSpec(
        "text",
        "Emb(5000,64)+LN+Linear, T=64",
        TextModel,
        lambda n, g: torch.randint(0, 5000, (n, 64), generator=g),
        2,
        128,
    ),
    "cifar": ModelSpec(
        "cifar",
        "CIFAR-10 convnet (W3), 32x32",
        CifarConvNet,
        lambda n, g: torch.randn(n, 3, 32, 32, generator=g),
        10,
        256,
    ),
    "transformer": ModelSpec(
        "transformer",
        "Emb(10k,128)+2 pre-LN blocks (W4), T=64",
        Transformer,
        lambda n, g: torch.randint(0, 10_000, (n, 64), generator=g),
        2,
        256,
    ),
    "lstm": ModelSpec(
        "lstm",
        "Emb(1000,32)+nn.LSTM(32,64), T=32",
        LSTMModel,
        lambda n, g: torch.randint(0, 1000, (n, 32), generator=g),
        2,
        64,
        opacus_fix=True,
    ),
    "lstm-w5": ModelSpec(
        "lstm-w5",
        "Emb(10k,128)+nn.LSTM(128,128) (W5), T=32",
        lambda: LSTMModel(vocab=10_000, dim=128, hidden=128),
        lambda n, g: torch.randint(0, 10_000, (n, 32), generator=g),
        2,
        256,
        opacus_fix=True,
    ),
}

METHODS = [
    "non-private",
    "dpclip auto",
    "dpclip auto+anchor",
    "dpclip hooks",
    "dpclip bookkeeping",
    "dpclip vmap",
    "opacus hooks",
    "opacus functorch",
    "opacus ghost",
]
DPCLIP_MODES = [m for m in METHODS if m.startswith("dpclip")]
EXTRA_LSTM = "non-private DPLSTM"  # the floor of the Opacus rows on the lstm model


def methods_for(spec: ModelSpec) -> list[str]:
    return METHODS + ([EXTRA_LSTM] if spec.opacus_fix else [])


# --------------------------------------------------------------------------- data


def make_data(spec: ModelSpec, batch_size: int):
    g = torch.Generator().manual_seed(0)
    n = batch_size * N_BATCHES
    x = spec.inputs(n, g)
    y = torch.randint(0, spec.classes, (n,), generator=g)
    batches = [(x[i * batch_size : (i + 1) * batch_size], y[i * batch_size : (i + 1) * batch_size]) for i in range(N_BATCHES)]
    return TensorDataset(x, y), batches


def initial_state(spec: ModelSpec) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return copy.deepcopy(spec.build().state_dict())


# --------------------------------------------------------------------------- methods


@dataclass
class Runner:
    name: str
    step: Callable[[torch.Tensor, torch.Tensor], None]
    module: nn.Module  # the unwrapped model whose parameters the optimizer updates
    keep: list = field(default_factory=list)  # engines etc. kept alive


def _opacus_fix(model: nn.Module) -> nn.Module:
    from opacus.validators import ModuleValidator

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ModuleValidator.fix(model)


def make_runner(
    method: str,
    spec: ModelSpec,
    state: dict,
    dataset: TensorDataset,
    batch_size: int,
    *,
    noise: float = NOISE,
    lr: float = LR,
    dtype: torch.dtype = torch.float32,
    device: torch.device = CPU,
) -> Runner:
    model = spec.build()
    model.load_state_dict(state)
    model.to(dtype)
    if method == EXTRA_LSTM or (method.startswith("opacus") and spec.opacus_fix):
        model = _opacus_fix(model)
    model.to(device)
    raw = model
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    loader = DataLoader(dataset, batch_size=batch_size)
    criterion = nn.CrossEntropyLoss()
    keep: list = []

    if method.startswith("dpclip"):
        import dpclip

        engine = dpclip.PrivacyEngine(accountant="rdp")
        model, optimizer, _ = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise,
            max_grad_norm=CLIP,
            poisson_sampling=False,
            clipping="flat",
            grad_sample_mode=method.split()[1].split("+")[0],
            generator=torch.Generator(device).manual_seed(1),
        )
        if method.endswith("+anchor"):
            # GradSampler(anchor_first_layers=True): first layers skip autograd too (make_private's
            # default since 274e1ae); reaches into the engine's attachment
            engine._attachment.sampler.anchor_first_layers = True
        keep.append(engine)
    elif method.startswith("opacus"):
        import opacus

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = opacus.PrivacyEngine(accountant="rdp")
            out = engine.make_private(
                module=model,
                optimizer=optimizer,
                criterion=criterion,
                data_loader=loader,
                noise_multiplier=noise,
                max_grad_norm=CLIP,
                poisson_sampling=False,
                clipping="flat",
                grad_sample_mode=method.split()[1],
                noise_generator=torch.Generator(device).manual_seed(1),
            )
        if method == "opacus ghost":
            model, optimizer, criterion, _ = out
        else:
            model, optimizer, _ = out
        keep.append(engine)

    def step(x, y):
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()

    return Runner(method, step, raw, keep)


# --------------------------------------------------------------------------- timing


def cpu_time() -> float:
    return time.process_time()  # user + sys of every thread of this process


def page_faults() -> int:
    """Minor page faults of this process so far (first touches of memory fresh from the OS)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def round_order(items: list, k: int) -> list:
    """The order in which round ``k`` steps ``items``: a permutation drawn from a generator
    seeded with ``k`` (reproducible). Not a rotation: with a rotating start each method always
    follows the same one, and what that one leaves behind (the allocator's free blocks, the
    caches) would favour or handicap it in every round (docs/benchmarks.md)."""
    return random.Random(k).sample(items, len(items))


@dataclass
class Timing:
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)


def time_model(
    spec: ModelSpec, batch_size: int, steps: int, methods: list[str], log, device: torch.device = CPU
) -> dict[str, Any]:
    state = initial_state(spec)
    dataset, batches = make_data(spec, batch_size)
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    runners: list[Runner] = []
    errors: dict[str, str] = {}
    for m in methods:
        try:
            r = make_runner(m, spec, state, dataset, batch_size, device=device)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for i in range(WARMUP):
                    r.step(*batches[i % N_BATCHES])
            runners.append(r)
        except Exception as e:  # skip the mode, say why
            errors[m] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
            log(f"  [{spec.name}] {m}: skipped ({errors[m]})")
    timings = {r.name: Timing() for r in runners}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k in range(steps):
            x, y = batches[k % N_BATCHES]
            for r in round_order(runners, k):
                sync()
                f0, c0, t0 = page_faults(), cpu_time(), time.perf_counter()
                r.step(x, y)
                sync()
                t1, c1, f1 = time.perf_counter(), cpu_time(), page_faults()
                timings[r.name].wall.append(t1 - t0)
                timings[r.name].cpu.append(c1 - c0)
                timings[r.name].faults.append(f1 - f0)
    return summarise(timings, methods, errors, batch_size)


def summarise(timings: dict[str, Timing], methods: list[str], errors: dict[str, str], batch_size: int) -> dict[str, Any]:
    """Per method: median and fastest wall ms per step, median CPU ms and page faults, samples
    per second, and the ratios of the medians to ``non-private``'s."""
    out: dict[str, Any] = {}
    for m in methods:
        if m in errors:
            out[m] = {"error": errors[m]}
            continue
        t = timings[m]
        med = statistics.median(t.wall)
        out[m] = {
            "ms_median": 1e3 * med,
            "ms_min": 1e3 * min(t.wall),
            "cpu_ms_median": 1e3 * statistics.median(t.cpu),
            "page_faults_median": statistics.median(t.faults),
            "samples_per_s": batch_size / med,
            "steps": len(t.wall),
        }
    base = out.get("non-private", {}).get("ms_median")
    base_cpu = out.get("non-private", {}).get("cpu_ms_median")
    for m, r in out.items():
        if "ms_median" in r and base:
            r["x_nonprivate"] = r["ms_median"] / base
            r["x_nonprivate_cpu"] = r["cpu_ms_median"] / base_cpu if base_cpu else None
    return out


def _child_setup(model: str, batch_size: int):
    """A benchmark subprocess's threads, model spec, initial state and data (as the parent's)."""
    torch.set_num_threads(THREADS)
    spec = MODELS[model]
    return spec, initial_state(spec), *make_data(spec, batch_size)


def _heap_worker(conn, model: str, method: str, batch_size: int) -> None:
    """One method in its own process (``--separate-heaps``): set up, warm up, say ``ready``,
    then run one step per index received and send back (wall s, CPU s, page faults)."""
    spec, state, dataset, batches = _child_setup(model, batch_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            r = make_runner(method, spec, state, dataset, batch_size)
            for i in range(WARMUP):
                r.step(*batches[i % N_BATCHES])
        except Exception as e:  # skip the mode, say why
            conn.send(("error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]))
            return
        conn.send(("ready", None))
        while (k := conn.recv()) is not None:
            x, y = batches[k % N_BATCHES]
            f0, c0, t0 = page_faults(), cpu_time(), time.perf_counter()
            r.step(x, y)
            t1, c1, f1 = time.perf_counter(), cpu_time(), page_faults()
            conn.send((t1 - t0, c1 - c0, f1 - f0))


def time_model_separate_heaps(model: str, batch_size: int, steps: int, methods: list[str], log) -> dict[str, Any]:
    """:func:`time_model` with every method in its own process: each has its own allocator
    heap, as in a real training run, instead of inheriting the state the other methods left
    in a shared one (docs/design.md E17). This process steps them one at a time, in
    :func:`round_order`, so that they still share the machine's conditions. Workers are
    started with ``spawn`` and set up one after another; results as :func:`time_model`."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    workers: dict[str, tuple[Any, Any]] = {}
    errors: dict[str, str] = {}
    try:
        for m in methods:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_heap_worker, args=(child, model, m, batch_size), daemon=True)
            proc.start()
            child.close()
            try:
                status, detail = parent.recv()
            except EOFError:
                status, detail = "error", f"the worker exited with code {proc.join() or proc.exitcode}"
            if status == "ready":
                workers[m] = (proc, parent)
            else:
                errors[m] = detail
                log(f"  [{model}] {m}: skipped ({detail})")
                proc.join()
        timings = {m: Timing() for m in workers}
        names = list(workers)
        for k in range(steps):
            for m in round_order(names, k):
                conn = workers[m][1]
                conn.send(k)
                wall, cpu, faults = conn.recv()
                timings[m].wall.append(wall)
                timings[m].cpu.append(cpu)
                timings[m].faults.append(faults)
    finally:
        for proc, conn in workers.values():
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    return summarise(timings, methods, errors, batch_size)


# --------------------------------------------------------------------------- memory


def _proc_status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmHWM", "VmRSS")):
                k, v = line.split(":")
                out[k] = int(v.split()[0])  # kB
    return out


def memory_child(model: str, method: str, batch_size: int) -> None:
    """Runs in a fresh subprocess (see ``_memory_env``); prints one JSON line."""
    spec, state, dataset, batches = _child_setup(model, batch_size)
    # Module imports are a one-off cost of the process (43 MB of RSS for dpclip, 74 MB for
    # Opacus), not memory of the method's step: both libraries are imported before the baseline.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import dpclip
        import dpclip.privacy_engine  # noqa: F401
        import opacus
        import opacus.validators  # noqa: F401

        dpclip.PrivacyEngine(accountant="rdp")
        opacus.PrivacyEngine(accountant="rdp")
    before = _proc_status()
    res: dict[str, Any] = {"reset": True}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = make_runner(method, spec, state, dataset, batch_size)
            for i in range(WARMUP):
                r.step(*batches[i % N_BATCHES])
            try:  # steady state: reset the high-water mark after the warm-up steps
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                res["reset"] = False
            for i in range(MEM_STEPS):
                r.step(*batches[(WARMUP + i) % N_BATCHES])
        after = _proc_status()
        res["peak_mb"] = (after["VmHWM"] - before["VmRSS"]) / 1024
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"[:200]
    print("MEMJSON " + json.dumps(res))


def _memory_env() -> dict[str, str]:
    """glibc returns every block of 64 KiB or more to the kernel when it is freed (fixed mmap
    threshold, no heap retention), so RSS follows the live tensor bytes and the high-water mark
    is the peak of live memory, not of what the allocator happened to keep."""
    env = os.environ.copy()
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env["MALLOC_TRIM_THRESHOLD_"] = "131072"
    return env


def measure_memory_cuda(model: str, method: str, batch_size: int, device: torch.device) -> dict[str, Any]:
    """On CUDA: the peak of ``torch.cuda.memory_allocated`` over 2 steps after the warm-up, less
    what was allocated before the method was set up (the same definition as the CPU column:
    what the method's step adds to the model and data)."""
    spec = MODELS[model]
    state = initial_state(spec)
    dataset, batches = make_data(spec, batch_size)
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = make_runner(method, spec, state, dataset, batch_size, device=device)
            for i in range(WARMUP):
                r.step(*batches[i % N_BATCHES])
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            for i in range(2):
                r.step(*batches[(WARMUP + i) % N_BATCHES])
            torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"[:200]}
    return {"peak_mb": peak / 2**20, "reset": True}


def measure_memory(model: str, method: str, batch_size: int, timeout: float = 300) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--_mem-child", model, method, str(batch_size)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_memory_env())
    except subprocess.TimeoutExpired:
        return {"error": "timeout"}
    for line in p.stdout.splitlines():
        if line.startswith("MEMJSON "):
            return json.loads(line[len("MEMJSON ") :])
    return {"error": f"child rc={p.returncode}: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ''}"[:200]}


# --------------------------------------------------------------------------- correctness


def f64_reference(spec: ModelSpec, state: dict, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Float64 per-sample loop: (sum_i min(1, C/||g_i||) g_i) / B, keyed by parameter name."""
    model = spec.build()
    model.load_state_dict(state)
    model.double()
    params = dict(model.named_parameters())
    names = list(params)
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    x = x.double() if x.is_floating_point() else x
    for i in range(x.shape[0]):
        loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
        gs = torch.autograd.grad(loss, [params[n] for n in names])
        norm = torch.sqrt(sum(g.pow(2).sum() for g in gs))
        s = min(1.0, CLIP / float(norm)) if float(norm) > 0 else 1.0
        for n, g in zip(names, gs):
            total[n] += s * g
    return {n: t / x.shape[0] for n, t in total.items()}


def one_step_grads(
    method: str, spec: ModelSpec, state: dict, dataset, batches, batch_size, device: torch.device = CPU
) -> dict[str, torch.Tensor]:
    r = make_runner(method, spec, state, dataset, batch_size, noise=0.0, lr=0.0, device=device)
    x, y = batches[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r.step(x.to(device), y.to(device))
    return {n: p.grad.detach().cpu().clone() for n, p in r.module.named_parameters()}


def rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    num = max(float((a[n].double() - b[n].double()).abs().max()) for n in b)
    den = max(float(b[n].double().abs().max()) for n in b)
    return num / max(den, 1e-300)


def check_model(
    spec: ModelSpec, batch_size: int, log, methods: list[str] | None = None, device: torch.device = CPU
) -> dict[str, Any]:
    state = initial_state(spec)
    dataset, batches = make_data(spec, batch_size)
    ref64 = f64_reference(spec, state, *batches[0])
    grads: dict[str, dict] = {}
    out: dict[str, Any] = {}
    checked = DPCLIP_MODES + ["opacus hooks", "opacus functorch", "opacus ghost"]
    if methods is not None:
        checked = [m for m in checked if m in methods or m == "opacus hooks"]
    for m in checked:
        try:
            grads[m] = one_step_grads(m, spec, state, dataset, batches, batch_size, device)
        except Exception as e:
            out[m] = {"error": f"{type(e).__name__}: {e}"[:200]}
    ref = grads.get("opacus hooks")
    for m, g in grads.items():
        if set(g) != set(ref64):
            out[m] = {"error": f"parameter names differ: {sorted(set(g) ^ set(ref64))}"}
            continue
        row: dict[str, Any] = {"rel_vs_f64": rel_diff(g, ref64)}
        if ref is not None and m != "opacus hooks":
            row["rel_vs_opacus"] = rel_diff(g, ref)
            if m.startswith("dpclip"):
                row["pass"] = row["rel_vs_opacus"] <= 1e-5
        out[m] = row
    return out


# --------------------------------------------------------------------------- profiling


def profile(model: str, method: str, batch_size: int | None, steps: int) -> None:
    import cProfile
    import pstats

    torch.set_num_threads(THREADS)
    spec = MODELS[model]
    bs = batch_size or spec.batch_size
    state = initial_state(spec)
    dataset, batches = make_data(spec, bs)
    r = make_runner(method, spec, state, dataset, bs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(WARMUP):
            r.step(*batches[i % N_BATCHES])
        pr = cProfile.Profile()
        t0 = time.perf_counter()
        pr.enable()
        for k in range(steps):
            r.step(*batches[k % N_BATCHES])
        pr.disable()
        wall = time.perf_counter() - t0
    print(f"== cProfile: {model} / {method} / B={bs}: {steps} steps, {1e3 * wall / steps:.1f} ms/step (profiled)")
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("cumulative").print_stats(30)
    print(s.getvalue())
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(20)
    print(s.getvalue())
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprofile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with tprofile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            for k in range(min(steps, 5)):
                r.step(*batches[k % N_BATCHES])
    print(f"== torch.profiler: {model} / {method} ({min(steps, 5)} steps), by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


# --------------------------------------------------------------------------- output


def fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(results: dict[str, Any], memory: bool) -> None:
    header = ["model", "B", "method", "ms/step", "min ms", "CPU ms", "samples/s", "x non-priv", "x CPU", "faults", "peak MB", "steps"]
    rows = []
    for model, res in results["models"].items():
        for m, r in res["timing"].items():
            mem = res.get("memory", {}).get(m, {})
            peak = mem.get("peak_mb")
            peak_s = "-" if not memory else (f"{peak:.0f}" + ("" if mem.get("reset", True) else "*") if peak is not None else "err")
            if "error" in r:
                rows.append([model, str(res["batch_size"]), m, "skipped: " + r["error"][:60], "", "", "", "", "", "", peak_s, ""])
                continue
            rows.append(
                [
                    model,
                    str(res["batch_size"]),
                    m,
                    fmt(r["ms_median"], ".1f"),
                    fmt(r["ms_min"], ".1f"),
                    fmt(r["cpu_ms_median"], ".1f"),
                    fmt(r["samples_per_s"], ".0f"),
                    fmt(r.get("x_nonprivate"), ".2f"),
                    fmt(r.get("x_nonprivate_cpu"), ".2f"),
                    fmt(r.get("page_faults_median"), ".0f"),
                    peak_s,
                    str(r["steps"]),
                ]
            )
    widths = [max(len(h), *(len(r[i]) for r in rows if not r[3].startswith("skipped") or i < 4)) for i, h in enumerate(header)]
    left = {0, 2}

    def line(cells):
        out = []
        for i, c in enumerate(cells):
            if i == 3 and c.startswith("skipped"):
                return "  ".join(out + [c])
            out.append(c.ljust(widths[i]) if i in left else c.rjust(widths[i]))
        return "  ".join(out)

    print(line(header))
    print("  ".join("-" * w for w in widths))
    prev = None
    for r in rows:
        if prev is not None and r[0] != prev:
            print()
        prev = r[0]
        print(line(r))


def print_checks(results: dict[str, Any]) -> None:
    print("\nCorrectness (noise_multiplier=0, one batch; rel = max|a-b| / max|b| over all gradient entries)")
    print(f"{'model':6}  {'method':18}  {'rel vs opacus hooks':>20}  {'rel vs float64 loop':>20}  result")
    for model, res in results["models"].items():
        for m, r in res.get("check", {}).items():
            if "error" in r:
                print(f"{model:6}  {m:18}  error: {r['error']}")
                continue
            verdict = "" if "pass" not in r else ("PASS" if r["pass"] else "FAIL")
            print(f"{model:6}  {m:18}  {fmt(r.get('rel_vs_opacus'), '20.2e') if 'rel_vs_opacus' in r else '(reference)':>20}  {r['rel_vs_f64']:20.2e}  {verdict}")


# --------------------------------------------------------------------------- main


STABLE_MALLOC = "glibc.malloc.mmap_threshold=268435456:glibc.malloc.trim_threshold=17179869184"
"""--stable-malloc: blocks up to 256 MiB come from the heap, and the heap is never trimmed.

The threshold was 32 MiB until 0618415; W4's ``[256, 64, 512]`` float32 activations are
exactly 32 MiB (a chunk of 32 MiB + 4 KiB), so they were still mapped fresh on every step by
whichever method's turn left no free heap chunk that large (16.4k faults per step for dpclip
and Opacus ghost, none for non-private, in the run at bd62ae6)."""


def environment() -> dict[str, Any]:
    try:
        import opacus
    except ImportError:  # a GPU machine without it: the Opacus rows are skipped, each saying why
        opacus = None

    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "opacus": getattr(opacus, "__version__", None),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES"),
        "platform": platform.platform(),
        "loadavg_start": load,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help=f"comma-separated subset of {','.join(MODELS)} (default: all)")
    ap.add_argument("--methods", default=None, help="comma-separated subset of the methods (default: all); non-private is always timed")
    ap.add_argument("--batch-size", type=int, default=None, help="one batch size for every model (default: per model)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per method (default 20; 5 with --quick)")
    ap.add_argument("--quick", action="store_true", help="cnn only (unless --models), 5 steps, no memory subprocesses")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-cell peak-memory subprocesses")
    ap.add_argument("--no-check", action="store_true", help="skip the correctness check")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    ap.add_argument("--profile", nargs=2, metavar=("MODEL", "METHOD"), help="profile one cell (cProfile + torch.profiler) and exit")
    ap.add_argument("--device", default="cpu", help="cpu (default; 2 threads) or cuda (see gpu_check.sh)")
    ap.add_argument(
        "--stable-malloc", action="store_true",
        help="rerun under GLIBC_TUNABLES with a fixed mmap threshold (256 MiB) and no heap trimming, so "
        "that the allocator's state, and with it the page faults per step, depends less on what ran before (see docs/benchmarks.md)",
    )
    ap.add_argument(
        "--separate-heaps", action="store_true",
        help="time each method in its own worker process (its own allocator heap, as in a real training run), "
        "stepped round-robin from this one so that all share the machine's conditions (see docs/benchmarks.md)",
    )
    ap.add_argument("--_mem-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.stable_malloc and os.environ.get("GLIBC_TUNABLES") != STABLE_MALLOC:
        if not sys.platform.startswith("linux"):
            ap.error("--stable-malloc sets glibc's tunables: Linux only")
        env = dict(os.environ, GLIBC_TUNABLES=STABLE_MALLOC)
        return subprocess.call([sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:])], env=env)

    if args._mem_child:
        model, method, bs = args._mem_child
        memory_child(model, method, int(bs))
        return 0
    torch.set_num_threads(THREADS)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False)")
    if device.type not in ("cpu", "cuda"):
        ap.error(f"--device {args.device!r}: choose cpu or cuda")
    if args.separate_heaps and device.type != "cpu":
        ap.error("--separate-heaps times the CPU allocator's heaps: use it with --device cpu")
    if args.profile:
        profile(args.profile[0], args.profile[1], args.batch_size, args.steps or 10)
        return 0

    models = args.models.split(",") if args.models else (["cnn"] if args.quick else list(MODELS))
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    steps = args.steps or (5 if args.quick else 20)
    memory = not (args.no_memory or args.quick)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t_start = time.perf_counter()
    results: dict[str, Any] = {"environment": environment(), "settings": {
        "noise_multiplier": NOISE, "max_grad_norm": CLIP, "lr": LR, "steps": steps, "warmup": WARMUP,
        "poisson_sampling": False, "device": str(device), "separate_heaps": args.separate_heaps,
        "memory": "max_memory_allocated over 2 steps after warm-up" if device.type == "cuda"
        else "VmHWM after clear_refs reset, fresh subprocess per cell",
    }, "models": {}}
    for name in models:
        spec = MODELS[name]
        bs = args.batch_size or spec.batch_size
        t0 = time.perf_counter()
        methods = methods_for(spec)
        if args.methods:
            wanted = {m.strip() for m in args.methods.split(",")} | {"non-private"}
            methods = [m for m in methods if m in wanted]
        log(f"[{name}] timing {len(methods)} methods, B={bs}, {steps} steps each ...")
        res: dict[str, Any] = {"description": spec.description, "batch_size": bs}
        if args.separate_heaps:
            res["timing"] = time_model_separate_heaps(name, bs, steps, methods, log)
        else:
            res["timing"] = time_model(spec, bs, steps, methods, log, device)
        if memory and device.type == "cuda":
            log(f"[{name}] peak CUDA memory ...")
            res["memory"] = {m: measure_memory_cuda(name, m, bs, device) for m in methods}
        elif memory:
            log(f"[{name}] peak memory (one subprocess per method) ...")
            res["memory"] = {m: measure_memory(name, m, bs) for m in methods}
        if not args.no_check:
            log(f"[{name}] correctness check ...")
            try:
                res["check"] = check_model(spec, bs, log, methods, device)
            except Exception:
                res["check"] = {"all": {"error": traceback.format_exc().splitlines()[-1]}}
        res["seconds"] = time.perf_counter() - t0
        results["models"][name] = res
        log(f"[{name}] done in {res['seconds']:.0f} s")
    try:
        results["environment"]["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    results["seconds"] = time.perf_counter() - t_start

    env = results["environment"]
    print(
        f"torch {env['torch']}, opacus {env['opacus']}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f", {env['threads']} threads, OMP_WAIT_POLICY={env['OMP_WAIT_POLICY']}, "
        f"sigma={NOISE}, C={CLIP}, flat clipping, poisson_sampling=False, {steps} timed steps (median), {WARMUP} warm-up"
        + (", each method in its own process (--separate-heaps)" if args.separate_heaps else "")
    )
    print()
    print_table(results, memory)
    if memory:
        print(
            "\npeak MB: steady-state VmHWM (reset after 2 warm-up steps, then 2 steps) - VmRSS before set-up, fresh "
            "subprocess per cell, freed blocks >= 64 KiB returned to the kernel; * = no clear_refs reset"
        )
    if any(m.startswith("lstm") for m in models):
        print("lstm: Opacus rows run opacus.layers.DPLSTM (ModuleValidator.fix); 'non-private DPLSTM' is their floor")
    if not args.no_check:
        print_checks(results)
    print(f"\ntotal {results['seconds']:.0f} s; load average at start {env['loadavg_start']}, at end {env.get('loadavg_end')}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
