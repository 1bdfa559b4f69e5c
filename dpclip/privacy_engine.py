"""``PrivacyEngine`` and ``make_private``: DP-SGD on the user's own model, optimizer and loop.

The user's loop stays ``loss.backward(); optimizer.step(); optimizer.zero_grad()``.
``make_private`` attaches, through torch's own hook APIs and inside removable handles:

* a :class:`~dpclip.grad_sample.hooks.GradSampler` on the model (forward hooks and
  output-gradient hooks capture what the per-sample rules need during the ordinary
  backward pass);
* an ``Optimizer.register_step_pre_hook`` that, before every ``optimizer.step()``,
  replaces each ``p.grad`` by the private gradient (DESIGN.md §3)::

      (sum_i clip(g_i) + N(0, (noise_multiplier * S)^2 I)) / (sample_rate * N)

  with ``S`` the clipping rule's sensitivity and ``sample_rate * N`` the *expected*
  batch size, and records one accounting step ``(noise_multiplier, sample_rate)``;
* a Poisson data loader (every example joins each batch independently with
  probability ``sample_rate``), the sampling the accountant models.

Once the first non-empty step has passed its audit (the per-sample gradients add up to
autograd's ``p.grad``), ``loss.backward()`` no longer computes the ordinary gradients of
most parameters of per-layer-rule units (``GradSampler.set_skip_param_grads``; book-keeping
does not use them): their ``p.grad`` stays as ``zero_grad()`` left it (``None``) until the
pre-step hook sets the private gradient, as before.

The optimizer and the model are returned unchanged (same objects): dpclip never
subclasses or proxies them and sets no attributes on them or their parameters.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from accountants import make_accountant

from .clipping import AutomaticClipping, FlatClipping, PerLayerClipping
from .grad_sample.bookkeeping import clip_and_sum
from .grad_sample.hooks import GradSampler
from .noise import GaussianNoise
from .sampling import PoissonBatchSampler, empty_batch_collate
from .validate import problems as model_problems

__all__ = ["PrivacyEngine", "make_private", "Private", "NotPoissonSampledError"]

# grad_sample_mode -> (ghost norms, per-layer rules): "hooks" materialises every per-sample
# gradient (Opacus's hooks mode), "vmap" computes every layer with torch.func.
_MODES = {"auto": ("auto", True), "bookkeeping": ("auto", True), "hooks": ("never", True), "vmap": ("never", False)}
_CLIPPING = ("flat", "per_layer", "automatic")


class NotPoissonSampledError(RuntimeError):
    """Epsilon was asked for a run whose batches the accountant does not model."""


@dataclass
class _Attachment:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    sampler: GradSampler
    clipper: Any
    groups: list[list[nn.Parameter]] | None
    noise: GaussianNoise
    generator: torch.Generator
    sample_rate: float
    expected_batch_size: float
    poisson: bool
    handles: list[Any] = field(default_factory=list)
    audited: bool = False


class PrivacyEngine:
    """Opacus-compatible entry point: ``PrivacyEngine(accountant="prv").make_private(...)``.

    Args:
        accountant: ``"prv"`` (tight, the default) or ``"rdp"``; see :mod:`accountants`.
        secure_mode: not available in this version (refused, never silently ignored).
    """

    def __init__(self, accountant: str = "prv", secure_mode: bool = False) -> None:
        if secure_mode:
            raise ValueError(
                "secure_mode=True is not available in this version of dpclip; use secure_mode=False "
                "(noise from an explicit torch.Generator) or wait for the release that adds it"
            )
        self.accountant = make_accountant(accountant)
        self.secure_mode = False
        self._attachment: _Attachment | None = None
        self._unaccounted_steps = 0

    # ------------------------------------------------------------------ set-up
    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        noise_multiplier: float,
        max_grad_norm: float | Sequence[float],
        poisson_sampling: bool = True,
        clipping: str = "flat",
        grad_sample_mode: str = "auto",
        loss_reduction: str = "mean",
        clip_controller: Any = None,
        generator: torch.Generator | None = None,
    ) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
        """Make ``module``/``optimizer`` private; returns ``(module, optimizer, data_loader)``.

        The model and optimizer come back as the same objects; the data loader is a new
        Poisson-sampling loader over the same dataset (``poisson_sampling=True``), with
        ``sample_rate = batch_size / len(dataset)`` and as many batches per epoch.
        """
        problems = []
        if self._attachment is not None:
            problems.append("this PrivacyEngine is already attached; create one engine per model")
        if not isinstance(module, nn.Module):
            problems.append(f"module must be a torch.nn.Module; got {type(module).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            problems.append(f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}")
        if not isinstance(data_loader, DataLoader):
            problems.append(f"data_loader must be a torch.utils.data.DataLoader; got {type(data_loader).__name__}")
        try:
            noise = GaussianNoise(noise_multiplier)
        except (TypeError, ValueError) as e:
            problems.append(str(e))
        if clipping not in _CLIPPING:
            problems.append(f"clipping={clipping!r} is not available here; choose one of {_CLIPPING}")
        if grad_sample_mode not in _MODES:
            problems.append(f"grad_sample_mode={grad_sample_mode!r} is not one of {tuple(_MODES)}")
        if loss_reduction not in ("mean", "sum"):
            problems.append(f"loss_reduction must be 'mean' or 'sum'; got {loss_reduction!r}")
        if clip_controller is not None:
            problems.append("clip_controller is not available in this version; pass clip_controller=None")
        if isinstance(module, nn.Module):
            problems.extend(model_problems(module))
        if problems:
            raise ValueError("make_private cannot proceed:\n  - " + "\n  - ".join(problems))

        sample_rate, n = _sample_rate(data_loader)
        trainable = [p for p in module.parameters() if p.requires_grad]
        clipper, groups = _clipping(clipping, max_grad_norm, trainable)
        if noise.noise_multiplier > 0 and not math.isfinite(clipper.sensitivity):
            raise ValueError(
                f"max_grad_norm={max_grad_norm!r} leaves the sensitivity unbounded, so no noise can hide one "
                "sample; give a finite max_grad_norm (e.g. 1.0)"
            )
        ghost, use_rules = _MODES[grad_sample_mode]
        sampler = GradSampler(module, loss_reduction=loss_reduction, ghost=ghost, use_rules=use_rules)
        covered = {id(p) for p in sampler.parameters}
        missing = [
            f"param_groups[{g}][{i}] (shape {tuple(p.shape)})"
            for g, group in enumerate(optimizer.param_groups)
            for i, p in enumerate(group["params"])
            if p.requires_grad and id(p) not in covered
        ]
        if missing:
            sampler.remove()
            raise ValueError(
                "these optimizer parameters are not parameters of the module, so they would get no "
                f"per-sample gradient: {', '.join(missing)}; pass the module that owns them"
            )

        dataset = data_loader.dataset
        if generator is None:
            generator = torch.Generator().manual_seed(secrets.randbits(63))
        if poisson_sampling:
            loader = DataLoader(
                dataset,
                batch_sampler=PoissonBatchSampler(n, sample_rate, max(1, len(data_loader)), generator),
                collate_fn=empty_batch_collate(data_loader.collate_fn, dataset),
                num_workers=data_loader.num_workers,
                pin_memory=data_loader.pin_memory,
                worker_init_fn=data_loader.worker_init_fn,
            )
        else:
            loader = data_loader
        att = _Attachment(
            module, optimizer, sampler, clipper, groups, noise, generator, sample_rate, sample_rate * n, poisson_sampling
        )
        att.handles.append(optimizer.register_step_pre_hook(self._before_step))
        self._attachment = att
        return module, optimizer, loader

    def make_private_with_epsilon(
        self,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        target_epsilon: float,
        target_delta: float,
        epochs: int,
        max_grad_norm: float | Sequence[float],
        epsilon_tolerance: float = 0.01,
        **kwargs: Any,
    ) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
        """``make_private`` with the smallest noise multiplier that keeps ``epochs`` epochs within budget.

        The noise multiplier is calibrated with this engine's accountant for
        ``epochs * len(data_loader)`` steps at ``sample_rate = batch_size / len(dataset)``,
        so that epsilon at ``target_delta`` ends in ``[target (1 - tolerance), target]``.
        """
        from accountants import get_noise_multiplier

        if not kwargs.get("poisson_sampling", True):
            raise ValueError(
                "make_private_with_epsilon needs poisson_sampling=True: the accountant cannot bound "
                "epsilon for fixed-size shuffled batches"
            )
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs <= 0:
            raise ValueError(f"epochs must be a positive integer; got {epochs!r}")
        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            sample_rate=_sample_rate(data_loader)[0],
            steps=epochs * max(1, len(data_loader)),
            accountant=self.accountant.name,
            epsilon_tolerance=epsilon_tolerance,
        )
        return self.make_private(
            module=module,
            optimizer=optimizer,
            data_loader=data_loader,
            noise_multiplier=sigma,
            max_grad_norm=max_grad_norm,
            **kwargs,
        )

    def detach(self) -> None:
        """Remove every hook dpclip attached; the model and optimizer behave as before."""
        if self._attachment is None:
            return
        for h in self._attachment.handles:
            h.remove()
        self._attachment.sampler.remove()
        self._attachment = None

    # ------------------------------------------------------------------ one step
    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        att = self._attachment
        if att is None:
            return
        params = att.sampler.parameters
        if att.sampler.batch_size > 0:
            if not att.audited:
                _audit(att)
                att.audited = True
                # the audit passed: from the next step on, autograd no longer computes the
                # ordinary gradients of rule units' parameters (this hook replaces p.grad
                # anyway; nothing below reads it)
                att.sampler.set_skip_param_grads(True)
            sums, _ = clip_and_sum(att.sampler, att.clipper, att.groups)
        else:  # an empty Poisson batch (or no backward): the sum is zero, the noise is not
            sums = {}
        sums = {p: sums[p] if p in sums else torch.zeros_like(p) for p in params}
        noisy = att.noise.add(sums, att.clipper.sensitivity, att.generator)
        for p in params:
            p.grad = noisy[p].div_(att.expected_batch_size).to(p.dtype)
        if att.poisson:
            self.accountant.step(noise_multiplier=att.noise.noise_multiplier, sample_rate=att.sample_rate)
        else:
            self._unaccounted_steps += 1
        att.sampler.clear()

    # ------------------------------------------------------------------ privacy
    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (PRV: the certified upper bound)."""
        if self._unaccounted_steps:
            raise NotPoissonSampledError(
                f"{self._unaccounted_steps} steps ran on fixed-size shuffled batches (poisson_sampling=False), "
                "which the accountant does not model; epsilon would be a guess. Use poisson_sampling=True"
            )
        return float(self.accountant.get_epsilon(delta))


def _sample_rate(data_loader: DataLoader) -> tuple[float, int]:
    """``(batch_size / len(dataset), len(dataset))`` of the user's loader: the Poisson sample rate."""
    batch_size = data_loader.batch_size or getattr(data_loader.batch_sampler, "batch_size", None)
    n = len(data_loader.dataset)
    if not batch_size or n == 0:
        raise ValueError(
            "cannot infer the sample rate: the data loader needs a batch_size and a non-empty dataset "
            f"(got batch_size={batch_size!r}, len(dataset)={n})"
        )
    return min(1.0, batch_size / n), n


def _audit(att: _Attachment) -> None:
    """On the first non-empty step: the per-sample gradients must add up to autograd's ``p.grad``.

    A parameter used outside the module that owns it (e.g. ``F.linear(x, self.emb.weight)``
    in a parent) or a loss term that does not go through the model's outputs would otherwise
    escape clipping silently.
    """
    sampler = att.sampler
    batch = sampler.batch_size
    params = sampler.parameters
    ones = {p: torch.ones(batch, dtype=p.dtype, device=p.device) for p in params}
    unclipped = sampler.clipped_sums(ones)
    factor = float(batch) if sampler.loss_reduction == "mean" else 1.0
    names = {id(p): n for n, p in att.model.named_parameters()}
    bad = []
    for p in params:
        autograd = torch.zeros_like(p) if p.grad is None else p.grad.detach() * factor
        ours = unclipped.get(p, torch.zeros_like(p))
        scale = max(float(autograd.abs().max()), float(ours.abs().max()), 1e-30)
        tol = 1e-3 if p.dtype in (torch.float16, torch.bfloat16, torch.float32) else 1e-8
        if float((ours - autograd).abs().max()) > tol * scale:
            bad.append(names.get(id(p), f"<parameter of shape {tuple(p.shape)}>"))
    if bad:
        raise ValueError(
            "the per-sample gradients of " + ", ".join(bad) + " do not add up to the gradient autograd "
            "computed, so clipping would miss part of each sample's gradient. Usual causes: a parameter used "
            "outside the module that owns it (e.g. F.linear(x, self.embedding.weight) in a parent module: move "
            "that use into a module that holds the parameter), a loss term that does not depend on the batch "
            "(e.g. an L2 penalty: use the optimizer's weight_decay), or p.grad not zeroed since the last step"
        )


def _clipping(kind: str, max_grad_norm: Any, trainable: list[nn.Parameter]):
    if kind == "flat":
        if isinstance(max_grad_norm, (list, tuple)):
            raise ValueError("clipping='flat' takes one max_grad_norm; a list is for clipping='per_layer'")
        return FlatClipping(max_grad_norm), None
    if kind == "automatic":
        return AutomaticClipping(), None
    bounds = list(max_grad_norm) if isinstance(max_grad_norm, (list, tuple)) else None
    if bounds is None or len(bounds) != len(trainable):
        raise ValueError(
            f"clipping='per_layer' needs max_grad_norm as a list with one bound per trainable parameter "
            f"tensor, in model.parameters() order ({len(trainable)} here); got {max_grad_norm!r}"
        )
    return PerLayerClipping(tuple(bounds)), [[p] for p in trainable]


@dataclass(frozen=True)
class Private:
    """What :func:`make_private` returns."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    data_loader: DataLoader
    engine: PrivacyEngine

    def epsilon(self, delta: float) -> float:
        return self.engine.get_epsilon(delta)


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader,
    *,
    noise_multiplier: float,
    max_grad_norm: float | Sequence[float],
    accountant: str = "prv",
    **kwargs: Any,
) -> Private:
    """The function form of :meth:`PrivacyEngine.make_private`."""
    engine = PrivacyEngine(accountant=accountant)
    model, optimizer, data_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=data_loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        **kwargs,
    )
    return Private(model, optimizer, data_loader, engine)
