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

import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, IterableDataset, RandomSampler, SequentialSampler

from accountants import make_accountant

from . import noise as noise_module
from .clipping import AutomaticClipping, FlatClipping, PerLayerClipping
from .controllers import gradient_noise_multiplier, release_statistics
from .grad_sample.bookkeeping import clip_and_sum
from .grad_sample.hooks import GradSampler
from . import distributed
from .noise import GaussianNoise
from .sampling import LogicalBatchSampler, PoissonBatchSampler, StepPlan, empty_batch_collate, loader_like
from .validate import problems as model_problems

__all__ = [
    "PrivacyEngine",
    "make_private",
    "Private",
    "NotPoissonSampledError",
    "PrivacyBudgetExhausted",
]

# grad_sample_mode -> (ghost norms, per-layer rules): "hooks" materialises every per-sample
# gradient (Opacus's hooks mode), "vmap" computes every layer with torch.func.
_MODES = {"auto": ("auto", True), "bookkeeping": ("auto", True), "hooks": ("never", True), "vmap": ("never", False)}
# Opacus's names for the same engines, so that an Opacus script runs unchanged
_OPACUS_MODES = {"ghost": "bookkeeping", "functorch": "vmap", "ew": "hooks"}
_CLIPPING = ("flat", "per_layer", "adaptive_layerwise", "automatic", "batch")
_PER_LAYER = ("per_layer", "adaptive_layerwise")


class NotPoissonSampledError(RuntimeError):
    """Epsilon was asked for a run whose batches the accountant does not model."""


class PrivacyBudgetExhausted(RuntimeError):
    """The next step would take epsilon past ``max_epsilon``; the step was not taken."""


@dataclass
class _Attachment:
    """Everything ``make_private`` attached; the engine's mutable training state lives here."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    clipping: str
    sampler: GradSampler | None          # None in batch clipping (ordinary backprop)
    params: list[nn.Parameter]           # every trainable parameter, in model.parameters() order
    groups: list[list[nn.Parameter]]     # clipping groups (one for flat/automatic)
    group_names: list[str]
    clip: tuple[float, ...]              # current thresholds, one per group (() for automatic)
    controller: Any
    noise_multiplier: float              # what the accountant records per step
    secure: bool
    generator: torch.Generator           # noise (and count noise)
    sample_generator: torch.Generator    # Poisson sampling
    sample_rate: float
    expected_units: float                # the divisor: expected batch size, or expected micro-batches
    unit_factor: float                   # 1, or 2 in batch clipping (a unit's clipped value can flip)
    poisson: bool
    plan: StepPlan
    unit_of: torch.Tensor | None
    max_epsilon: float | None
    target_delta: float | None
    handles: list[Any] = field(default_factory=list)
    audited: bool = False
    sums: dict[nn.Parameter, torch.Tensor] | None = None   # the open logical batch's clipped sums
    norms: list[torch.Tensor] | None = None                # its units' norms [U, G], for a controller
    steps: int = 0
    clip_history: list[tuple[float, ...]] = field(default_factory=list)
    budget_steps_left: int | None = None
    budget_sigma: float | None = None
    fixed_noise_std: float | None = None  # a controller in the noise-std regime: sigma_t = std / S_t
    rank: int = 0                         # torch.distributed: this process, of world_size (DPDDP)
    world_size: int = 1
    # the noise drawn ahead (P14): the key of the next release's gradient noise, drawn at the end
    # of the previous one, and the background draw of its numbers (None where unavailable)
    noise_key: int | None = None
    ahead: noise_module.NoiseAhead | None = None

    @property
    def divided(self) -> bool:
        """Clipped sums come already divided by ``expected_units`` (the factor rides on the
        per-sample scales), and so does the noise std: per-sample clipping outside secure mode."""
        return self.sampler is not None and not self.secure

    @property
    def clipper(self):
        if self.clipping == "automatic":
            return AutomaticClipping()
        if len(self.clip) == 1 and self.clipping in ("flat", "batch") and len(self.groups) == 1:
            return FlatClipping(self.clip[0])
        return PerLayerClipping(self.clip)

    @property
    def sensitivity(self) -> float:
        return self.unit_factor * self.clipper.sensitivity


NOISE_AHEAD = True
"""Draw each release's gradient noise during the step before it, on a background thread at
idle priority (:class:`dpclip.noise.NoiseAhead`, docs/design.md P14), where the platform allows."""


def _add_gaussian_(att: _Attachment, noise: GaussianNoise, values: dict, sensitivity: float) -> dict:
    """Add this release's Gaussian noise into ``values`` (the step's own sums) in place.

    With the noise kernel the key of each release's noise is drawn from ``att.generator`` at
    the end of the release before (the first release draws its own), so that its numbers can be
    drawn in the background meanwhile (:class:`dpclip.noise.NoiseAhead`); the values depend on
    the generator alone, not on how far that draw got. The pending key is part of
    :meth:`PrivacyEngine.state_dict`. Otherwise :meth:`GaussianNoise.add_` (its key drawn now).
    """
    tensors = list(values.values())
    std = noise.std(sensitivity)
    if std == 0.0 or not noise_module.kernel_takes(tensors, att.generator):
        att.noise_key = None  # a key drawn for the kernel is never used for anything else
        return noise.add_(values, sensitivity, att.generator)
    key = att.noise_key if att.noise_key is not None else noise_module.draw_key(att.generator)
    att.noise_key = None
    noise_module.add_keyed_(tensors, std, key, att.ahead)
    if att.ahead is not None:
        att.noise_key = noise_module.draw_key(att.generator)
        att.ahead.start(sum(t.numel() for t in tensors), tensors[0].dtype, std, att.noise_key)
    return values


class PrivacyEngine:
    """Opacus-compatible entry point: ``PrivacyEngine(accountant="prv").make_private(...)``.

    Args:
        accountant: ``"prv"`` (tight, the default) or ``"rdp"``; see :mod:`accountants`.
        secure_mode: draw the noise with :class:`dpclip.noise.SecureGaussianNoise`: an exact
            discrete Gaussian on a fine grid, with random bits from ``os.urandom``, so the
            released floats' low bits carry nothing about the clipped sum (Mironov 2012;
            Canonne, Kamath, Steinke 2020; docs/secure_mode.md). Poisson sampling then draws
            from a torch generator seeded from ``secrets`` (not a cryptographic PRNG; see the
            doc). A ``generator`` cannot be passed, and ``state_dict()`` leaves the generators out.
    """

    def __init__(self, accountant: str = "prv", secure_mode: bool = False) -> None:
        if not isinstance(secure_mode, bool):
            raise TypeError(f"secure_mode must be True or False; got {secure_mode!r}")
        if secure_mode and not hasattr(noise_module, "SecureGaussianNoise"):  # pragma: no cover
            raise ValueError("secure_mode=True needs dpclip.noise.SecureGaussianNoise, missing from this build")
        self.accountant = make_accountant(accountant)
        self.secure_mode = secure_mode
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
        max_grad_norm: float | Sequence[float] | Mapping[str, float],
        poisson_sampling: bool = True,
        clipping: str = "flat",
        grad_sample_mode: str = "auto",
        loss_reduction: str = "mean",
        clip_controller: Any = None,
        generator: torch.Generator | None = None,
        batch_clip_size: int | None = None,
        max_epsilon: float | None = None,
        target_delta: float | None = None,
        criterion: Any = None,
        noise_generator: torch.Generator | None = None,
        batch_first: bool = True,
        **unused: Any,
    ):
        """Make ``module``/``optimizer`` private; returns ``(module, optimizer, data_loader)``.

        The model and optimizer come back as the same objects, with hooks attached. The data
        loader is a new loader over the same dataset that samples each example into each
        batch independently with probability ``sample_rate = batch_size / len(dataset)``
        (``poisson_sampling=True``; as many batches per epoch as the user's loader).

        Args beyond Opacus's:
            clipping: ``flat`` | ``per_layer`` | ``adaptive_layerwise`` | ``automatic`` |
                ``batch`` (DESIGN.md §5; docs in ``docs/clipping.md``).
            max_grad_norm: a float; for ``per_layer`` / ``adaptive_layerwise`` / ``batch`` also
                a list (one bound per trainable parameter tensor, in ``model.parameters()``
                order) or a dict ``{module name: bound}``. A float with ``per_layer`` or
                ``adaptive_layerwise`` gives every layer (module with its own trainable
                parameters) ``max_grad_norm / sqrt(layers)``, so the sensitivity is
                ``max_grad_norm``.
            clip_controller: an object with the controller interface of
                :mod:`dpclip.controllers` (``Fixed()``, ``Quantile()``); ``adaptive_layerwise``
                defaults to ``Quantile()``. Its statistics are privatised and share the
                step's budget.
            batch_clip_size: ``batch`` clipping only: the expected size of a micro-batch unit;
                ``None`` makes each logical batch one unit.
            max_epsilon, target_delta: stop before the step that would take epsilon at
                ``target_delta`` past ``max_epsilon`` (:class:`PrivacyBudgetExhausted`).
            generator: a seeded ``torch.Generator`` for the sampling and the noise (Opacus's
                ``noise_generator`` is accepted too).

        With ``grad_sample_mode="ghost"`` (Opacus's name) the return value is Opacus's
        ``(module, optimizer, criterion, data_loader)``: the criterion comes back unchanged,
        as dpclip needs no second backward pass.
        """
        opacus_ghost = grad_sample_mode == "ghost"
        grad_sample_mode = _OPACUS_MODES.get(grad_sample_mode, grad_sample_mode)
        if generator is None:
            generator = noise_generator
        problems = [f"unknown argument {name}={value!r}" for name, value in unused.items()]
        returned = module  # what the caller gets back (a DPDDP wrapper stays wrapped)
        rank, world_size = 0, 1
        if isinstance(module, distributed.DPDDP):
            rank, world_size = distributed.world()
            module = module.module
            if clipping == "batch":
                problems.append(
                    "clipping='batch' is not available with DPDDP: a micro-batch unit would span processes, "
                    "and its clipped gradient would then depend on every process's examples. Fix: use "
                    "clipping='flat' or 'per_layer' (or train batch clipping in one process)"
                )
            if not poisson_sampling:
                problems.append(
                    "poisson_sampling=False with DPDDP would give every process the same batches; use "
                    "poisson_sampling=True (each process then samples its own shard)"
                )
        elif isinstance(module, nn.parallel.DistributedDataParallel):
            problems.append(
                "the module is wrapped in torch.nn.parallel.DistributedDataParallel, whose reducer averages the "
                "unclipped gradients during backward. Fix: wrap the plain module in dpclip.distributed.DPDDP "
                "instead; dpclip then adds up the clipped gradients across processes itself"
            )
        if self._attachment is not None:
            problems.append("this PrivacyEngine is already attached; create one engine per model")
        if not isinstance(module, nn.Module):
            problems.append(f"module must be a torch.nn.Module; got {type(module).__name__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            problems.append(f"optimizer must be a torch.optim.Optimizer; got {type(optimizer).__name__}")
        if not isinstance(data_loader, DataLoader):
            problems.append(f"data_loader must be a torch.utils.data.DataLoader; got {type(data_loader).__name__}")
        else:
            problems.extend(_loader_problems(data_loader))
        try:
            GaussianNoise(noise_multiplier)
        except (TypeError, ValueError) as e:
            problems.append(str(e))
        if clipping not in _CLIPPING:
            problems.append(f"clipping={clipping!r} is not available; choose one of {_CLIPPING}")
        if grad_sample_mode not in _MODES:
            problems.append(f"grad_sample_mode={grad_sample_mode!r} is not one of {tuple(_MODES)}")
        if loss_reduction not in ("mean", "sum"):
            problems.append(f"loss_reduction must be 'mean' or 'sum'; got {loss_reduction!r}")
        if batch_clip_size is not None and clipping != "batch":
            problems.append(f"batch_clip_size={batch_clip_size!r} is for clipping='batch'; got clipping={clipping!r}")
        if batch_clip_size is not None and (
            isinstance(batch_clip_size, bool) or not isinstance(batch_clip_size, int) or batch_clip_size <= 0
        ):
            problems.append(f"batch_clip_size must be a positive integer (samples per micro-batch); got {batch_clip_size!r}")
        if clip_controller is not None and not (
            callable(getattr(clip_controller, "update", None))
            and callable(getattr(clip_controller, "statistics_noise_multiplier", None))
        ):
            problems.append(
                f"clip_controller {clip_controller!r} lacks the controller interface (update(clip, stats) and "
                "statistics_noise_multiplier(expected_units)); use dpclip.controllers.Fixed() or Quantile()"
            )
        if clip_controller is not None and clipping == "automatic":
            problems.append("clipping='automatic' has no threshold to control; pass clip_controller=None")
        if max_epsilon is not None:
            if not (isinstance(max_epsilon, (int, float)) and max_epsilon > 0):
                problems.append(f"max_epsilon must be a number > 0; got {max_epsilon!r}")
            if target_delta is None:
                problems.append("max_epsilon needs target_delta (the delta at which epsilon is measured, e.g. 1e-5)")
        if max_epsilon is not None and not poisson_sampling:
            problems.append("max_epsilon needs poisson_sampling=True: epsilon is not defined for shuffled batches")
        if self.secure_mode and generator is not None:
            problems.append(
                "secure_mode=True draws its own cryptographically seeded generator; do not pass generator"
            )
        if isinstance(module, nn.Module):
            problems.extend(model_problems(module, clipping=clipping if clipping in _CLIPPING else "flat"))
            if clipping in _CLIPPING:
                try:
                    groups, names, bounds = _clip_groups(clipping, max_grad_norm, module, _trainable(module))
                except (TypeError, ValueError) as e:
                    problems.append(str(e))
        if problems:
            raise ValueError("make_private cannot proceed:\n  - " + "\n  - ".join(problems))

        sample_rate, n = _sample_rate(data_loader)
        trainable = _trainable(module)
        if clipping == "adaptive_layerwise" and clip_controller is None:
            from .controllers import Quantile

            clip_controller = Quantile()
        sigma = float(noise_multiplier)
        att_probe = _sensitivity_of(clipping, bounds)
        if sigma > 0 and not math.isfinite(att_probe):
            raise ValueError(
                f"max_grad_norm={max_grad_norm!r} leaves the sensitivity unbounded, so no noise can hide one "
                "sample; give a finite max_grad_norm (e.g. 1.0)"
            )
        if clip_controller is not None and not all(math.isfinite(b) for b in bounds):
            raise ValueError("a clip controller needs a finite starting max_grad_norm (e.g. 1.0)")
        if clip_controller is not None:
            units = sample_rate * n if clipping != "batch" else _units(sample_rate * n, batch_clip_size)
            gradient_noise_multiplier(sigma, clip_controller.statistics_noise_multiplier(units))  # raises if too small

        sampler = None
        if clipping != "batch":
            ghost, use_rules = _MODES[grad_sample_mode]
            # after the audited first step, autograd skips the weight gradients book-keeping replaces,
            # first layers included (docs/design.md E8, E11)
            sampler = GradSampler(
                module, loss_reduction=loss_reduction, ghost=ghost, use_rules=use_rules, anchor_first_layers=True
            )
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
        else:
            owned = {id(p) for p in trainable}
            missing = [
                f"param_groups[{g}][{i}] (shape {tuple(p.shape)})"
                for g, group in enumerate(optimizer.param_groups)
                for i, p in enumerate(group["params"])
                if p.requires_grad and id(p) not in owned
            ]
            if missing:
                raise ValueError(
                    "these optimizer parameters are not parameters of the module, so they would escape "
                    f"clipping: {', '.join(missing)}; pass the module that owns them"
                )

        if self.secure_mode:
            generator = noise_module.secure_generator()
            sample_generator = noise_module.secure_generator()
        else:
            if generator is None:
                generator = torch.Generator().manual_seed(_os_seed())
            # sampling gets its own stream, seeded from the user's generator: the run then does
            # not depend on when a prefetching loader draws its batches relative to the noise
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
            if world_size > 1:  # one stream per process, also when every process got the same seed
                seed = (seed + rank * 0x9E3779B97F4A7C15) % 2**63
            sample_generator = torch.Generator().manual_seed(seed)

        plan = StepPlan()
        unit_of = None
        expected_units = sample_rate * n
        if clipping == "batch":
            units = _units(sample_rate * n, batch_clip_size)
            unit_of = torch.randint(0, units, (n,), generator=sample_generator) if units > 1 else None
            expected_units = float(units)
        if poisson_sampling:
            batches = PoissonBatchSampler(
                n, sample_rate, max(1, len(data_loader)), sample_generator, rank=rank, world_size=world_size
            )
        else:
            batches = data_loader.batch_sampler
        loader = _rebuild_loader(data_loader, LogicalBatchSampler(batches, plan, None, unit_of), poisson_sampling)

        att = _Attachment(
            model=module, optimizer=optimizer, clipping=clipping, sampler=sampler, params=trainable,
            groups=groups, group_names=names, clip=bounds, controller=clip_controller, noise_multiplier=sigma,
            secure=self.secure_mode, generator=generator, sample_generator=sample_generator,
            sample_rate=sample_rate, expected_units=expected_units,
            unit_factor=2.0 if clipping == "batch" else 1.0, poisson=poisson_sampling, plan=plan, unit_of=unit_of,
            max_epsilon=None if max_epsilon is None else float(max_epsilon), target_delta=target_delta,
            rank=rank, world_size=world_size,
        )
        if getattr(clip_controller, "keeps_noise_std", False):
            att.fixed_noise_std = sigma * att.sensitivity
        if NOISE_AHEAD and not self.secure_mode and rank == 0 and noise_module.NoiseAhead.available():
            att.ahead = noise_module.NoiseAhead()
        att.handles.append(optimizer.register_step_pre_hook(self._before_step))

        self._attachment = att
        if opacus_ghost:
            return returned, optimizer, criterion if criterion is not None else nn.CrossEntropyLoss(), loader
        return returned, optimizer, loader

    def make_private_with_epsilon(
        self,
        *,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        data_loader: DataLoader,
        target_epsilon: float,
        target_delta: float,
        epochs: int,
        max_grad_norm: float | Sequence[float] | Mapping[str, float],
        epsilon_tolerance: float = 0.01,
        **kwargs: Any,
    ):
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
        if self._attachment.sampler is not None:
            self._attachment.sampler.remove()
        if self._attachment.ahead is not None:
            self._attachment.ahead.cancel()
        self._attachment = None

    # ------------------------------------------------------------------ introspection
    @property
    def noise_multiplier(self) -> float:
        return self._require().noise_multiplier

    @property
    def max_grad_norm(self) -> tuple[float, ...]:
        """The current clipping thresholds, one per group (they move under a controller)."""
        return self._require().clip

    @property
    def clip_history(self) -> list[tuple[float, ...]]:
        """The thresholds used at each released step, in order."""
        return list(self._require().clip_history)

    @property
    def steps(self) -> int:
        """Logical steps released so far (with noise) by this engine."""
        return self._require().steps

    def _require(self) -> _Attachment:
        if self._attachment is None:
            raise RuntimeError("this PrivacyEngine is not attached; call make_private first")
        return self._attachment

    # ------------------------------------------------------------------ one step
    def _before_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        att = self._attachment
        if att is None:
            return
        if att.plan.restarted:  # a new pass over the loader: an unfinished logical batch is dropped
            att.plan.restarted = False
            att.sums, att.norms = None, None
        entry = att.plan.pop()
        is_last, size = entry if entry is not None else (True, None)
        try:
            self._accumulate(att, size, is_last)
        finally:
            if att.sampler is not None:
                att.sampler.clear()
        if not is_last:
            for p in att.params:  # torch's optimizers skip parameters without a gradient
                p.grad = None
            return
        sums, norms = att.sums, att.norms
        att.sums, att.norms = None, None
        self._release(att, sums or {}, norms)

    def _noise_parameters(self, att: _Attachment) -> tuple[float, float, float]:
        """``(sigma, sigma_grad, sensitivity)`` of this step: the multiplier the accountant
        records, the gradient noise's (after a controller's share, P3) and the sensitivity
        the noise std is scaled by (divided by the expected batch size where the average is)."""
        sigma = att.noise_multiplier
        if att.fixed_noise_std is not None:  # the noise std is fixed; the multiplier follows the thresholds
            sigma = att.fixed_noise_std / att.sensitivity
        sigma_c = None
        if att.controller is not None:
            sigma_c = att.controller.statistics_noise_multiplier(att.expected_units)
        sensitivity = att.sensitivity / att.expected_units if att.divided else att.sensitivity
        return sigma, gradient_noise_multiplier(sigma, sigma_c), sensitivity

    def _accumulate(self, att: _Attachment, size: int | None, is_last: bool) -> None:
        """Add this physical batch's clipped sum (and its units' norms) to the open logical batch."""
        if att.sampler is not None:
            if att.sampler.batch_size == 0:
                return
            if not att.audited:
                _audit(att)
                att.audited = True
                # the audit passed: from now on autograd no longer computes the ordinary gradients
                # of rule units' parameters (this hook replaces p.grad; nothing below reads it)
                att.sampler.set_skip_param_grads(True)
            groups = None if len(att.groups) == 1 else att.groups
            # the average's 1 / expected size rides on the per-sample scales (no pass over the sums)
            scale = 1.0 / att.expected_units if att.divided else 1.0
            sums, norms = clip_and_sum(att.sampler, att.clipper, groups, scale=scale)
        else:
            grads = {p: p.grad for p in att.params if p.grad is not None}
            if size == 0 or not grads:
                return
            sums, norms = _clip_unit(att, grads)
        if att.sums is None:
            # a one-piece logical batch (the common case) is released right away: no copy. A piece
            # that is not the last is copied, as the sampler may reuse its buffers next step
            att.sums = sums if is_last else {p: t.detach().clone() for p, t in sums.items()}
        else:
            for p, t in sums.items():
                if p in att.sums:
                    att.sums[p].add_(t)
                else:
                    att.sums[p] = t.detach().clone()
        if att.controller is not None and att.clipping != "automatic":  # only a controller reads norms
            att.norms = (att.norms or []) + [norms.detach()]

    def _release(self, att: _Attachment, sums: dict, norms: list[torch.Tensor] | None) -> None:
        """Noise, scaling, the optimizer's gradient, the controller and the accountant: one logical step."""
        sigma, sigma_grad, sensitivity = self._noise_parameters(att)
        if att.max_epsilon is not None:
            self._check_budget(att, sigma)
        noise_cls = noise_module.SecureGaussianNoise if att.secure else GaussianNoise
        full = {p: sums[p] if p in sums else torch.zeros_like(p) for p in att.params}
        divided = att.divided  # the noise std is divided alike, and nothing afterwards
        noise = noise_cls(sigma_grad)

        def add_noise(values: dict) -> dict:
            # the sums are this step's own tensors: plain noise goes into them in place
            if isinstance(noise, GaussianNoise):
                return _add_gaussian_(att, noise, values, sensitivity)
            return noise.add(values, sensitivity, att.generator)

        if att.world_size > 1:  # DPDDP: add the processes' clipped sums; process 0 adds the noise, once
            distributed.all_reduce_sum_(list(full.values()))
            if att.rank == 0:
                noisy = add_noise(full)
            else:
                noisy = {p: torch.empty_like(t) for p, t in full.items()}
            distributed.broadcast_([noisy[p] for p in att.params])
        else:
            noisy = add_noise(full)
        for p in att.params:
            grad = noisy[p] if divided else noisy[p].div_(att.expected_units)
            p.grad = grad.to(p.dtype)
        att.clip_history.append(att.clip)
        if att.controller is not None:
            groups = len(att.clip)
            unit_norms = torch.cat(norms) if norms else torch.zeros(0, groups, dtype=torch.float64)
            stats = None
            if att.world_size > 1:  # every process's norms; process 0 privatises, all update alike
                unit_norms = distributed.all_gather_rows(unit_norms.to(torch.float64))
            if att.rank == 0:
                stats = release_statistics(
                    att.controller, unit_norms, att.clip, att.expected_units, sigma,
                    lambda s, values, sens: noise_cls(s).add(values, sens, att.generator),
                    histogram_sensitivity=math.sqrt(2.0) if att.clipping == "batch" else 1.0,
                    dimension=sum(p.numel() for p in att.params),
                    noise_std=att.fixed_noise_std or 0.0,
                )
            if att.world_size > 1:
                box = [stats]
                torch.distributed.broadcast_object_list(box, src=0)
                stats = box[0]
            att.clip = tuple(float(c) for c in att.controller.update(att.clip, stats))
        if att.poisson:
            self.accountant.step(noise_multiplier=sigma, sample_rate=att.sample_rate)
            if att.budget_steps_left is not None:
                att.budget_steps_left -= 1
        else:
            self._unaccounted_steps += 1
        att.steps += 1

    def _check_budget(self, att: _Attachment, sigma: float) -> None:
        if att.budget_steps_left is None or att.budget_sigma != sigma:
            att.budget_steps_left = _steps_within_budget(
                self.accountant, sigma, att.sample_rate, att.max_epsilon, att.target_delta
            )
            att.budget_sigma = sigma
        if att.budget_steps_left <= 0:
            for p in att.params:
                p.grad = None
            raise PrivacyBudgetExhausted(
                f"the next step would take epsilon past max_epsilon={att.max_epsilon:g} at delta="
                f"{att.target_delta:g} (now {self.accountant.get_epsilon(att.target_delta):.4g} after "
                f"{att.steps} steps); the step was not taken. Stop training, or start with a larger budget"
            )

    # ------------------------------------------------------------------ privacy
    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent so far at ``delta`` (PRV: the certified upper bound)."""
        if self._unaccounted_steps:
            raise NotPoissonSampledError(
                f"{self._unaccounted_steps} steps ran on fixed-size shuffled batches (poisson_sampling=False), "
                "which the accountant does not model; epsilon would be a guess. Use poisson_sampling=True"
            )
        return float(self.accountant.get_epsilon(delta))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly: accountant, generators, thresholds.

        Holds the noise generator's state (unless ``secure_mode``): whoever has it can
        recompute the noise of every later step, so keep checkpoints as private as the data.
        """
        state: dict[str, Any] = {
            "version": 1,
            "accountant": self.accountant.state_dict(),
            "unaccounted_steps": self._unaccounted_steps,
        }
        att = self._attachment
        if att is not None:
            if att.sums is not None:
                raise RuntimeError(
                    "state_dict() in the middle of a logical batch (virtual batches): save after the "
                    "optimizer step that closes it"
                )
            state.update(
                clipping=att.clipping,
                clip=list(att.clip),
                clip_history=[list(c) for c in att.clip_history],
                steps=att.steps,
                audited=att.audited,
                unit_of=None if att.unit_of is None else att.unit_of.clone(),
                controller=att.controller.state_dict() if hasattr(att.controller, "state_dict") else None,
                generator=None if att.secure else att.generator.get_state(),
                sample_generator=None if att.secure else att.sample_generator.get_state(),
                noise_key=None if att.secure else att.noise_key,
            )
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (call after ``make_private`` with the same settings)."""
        if not isinstance(state, Mapping) or "accountant" not in state:
            raise ValueError("load_state_dict expects what PrivacyEngine.state_dict() returned")
        self.accountant.load_state_dict(state["accountant"])
        self._unaccounted_steps = int(state.get("unaccounted_steps", 0))
        att = self._attachment
        if att is None or "clip" not in state:
            return
        if state["clipping"] != att.clipping or len(state["clip"]) != len(att.clip):
            raise ValueError(
                f"the saved engine used clipping={state['clipping']!r} with {len(state['clip'])} group(s); this one "
                f"uses clipping={att.clipping!r} with {len(att.clip)}: call make_private with the saved settings"
            )
        att.clip = tuple(float(c) for c in state["clip"])
        att.clip_history = [tuple(c) for c in state.get("clip_history", [])]
        att.steps = int(state.get("steps", 0))
        if state.get("unit_of") is not None:
            if att.unit_of is None or att.unit_of.shape != state["unit_of"].shape:
                raise ValueError("the saved micro-batch units do not fit this data set / batch_clip_size")
            att.unit_of.copy_(state["unit_of"])
        if state.get("controller") is not None and hasattr(att.controller, "load_state_dict"):
            att.controller.load_state_dict(state["controller"])
        if not att.secure:
            if state.get("generator") is not None:
                att.generator.set_state(state["generator"])
            if state.get("sample_generator") is not None:
                att.sample_generator.set_state(state["sample_generator"])
            # the next release's noise key, drawn before the save (P14); None in older checkpoints
            att.noise_key = None if state.get("noise_key") is None else int(state["noise_key"])
            if att.ahead is not None:
                att.ahead.cancel()
        att.sums, att.norms = None, None
        att.budget_steps_left = None

    def save_checkpoint(
        self,
        *,
        path: str | os.PathLike | io.BufferedIOBase,
        module: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        checkpoint_dict: dict[str, Any] | None = None,
        **unused: Any,
    ) -> None:
        """Opacus's ``save_checkpoint``: module, optimizer and privacy state in one ``torch.save``."""
        checkpoint = dict(checkpoint_dict or {})
        checkpoint["module_state_dict"] = module.state_dict()
        checkpoint["privacy_accountant_state_dict"] = self.accountant.state_dict()
        checkpoint["privacy_engine_state_dict"] = self.state_dict()
        if optimizer is not None:
            checkpoint["optimizer_state_dict"] = optimizer.state_dict()
        torch.save(checkpoint, path)

    def load_checkpoint(
        self,
        *,
        path: str | os.PathLike | io.BufferedIOBase,
        module: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        **unused: Any,
    ) -> dict[str, Any]:
        """Opacus's ``load_checkpoint``; returns the whole checkpoint dict."""
        checkpoint = torch.load(path, weights_only=False)
        module.load_state_dict(checkpoint["module_state_dict"])
        if optimizer is not None and "optimizer_state_dict" in checkpoint:
            optimizer.load_state_dict(checkpoint["optimizer_state_dict"])
        if "privacy_engine_state_dict" in checkpoint:
            self.load_state_dict(checkpoint["privacy_engine_state_dict"])
        else:
            self.accountant.load_state_dict(checkpoint["privacy_accountant_state_dict"])
        return checkpoint


# ---------------------------------------------------------------------- helpers
def _os_seed() -> int:
    return int.from_bytes(os.urandom(8), "little") >> 1


def _units(expected_batch_size: float, batch_clip_size: int | None) -> int:
    """Micro-batch units per step in batch clipping: ``round(expected batch size / batch_clip_size)``."""
    return 1 if batch_clip_size is None else max(1, round(expected_batch_size / batch_clip_size))


def _trainable(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def _sample_rate(data_loader: DataLoader) -> tuple[float, int]:
    """``(batch_size / len(dataset), len(dataset))`` of the user's loader: the Poisson sample rate."""
    batch_size = data_loader.batch_size or getattr(data_loader.batch_sampler, "batch_size", None)
    if batch_size is None and isinstance(data_loader.batch_sampler, LogicalBatchSampler):
        inner = data_loader.batch_sampler.poisson
        return inner.sample_rate, inner.num_samples
    n = len(data_loader.dataset)
    if not batch_size or n == 0:
        raise ValueError(
            "cannot infer the sample rate: the data loader needs a batch_size and a non-empty dataset "
            f"(got batch_size={batch_size!r}, len(dataset)={n})"
        )
    return min(1.0, batch_size / n), n


def _loader_problems(loader: DataLoader) -> list[str]:
    """Samplers whose batches the accountant cannot model, each with the fix."""
    if isinstance(loader.dataset, IterableDataset):
        return [
            "the data loader reads an IterableDataset: Poisson sampling needs random access to a dataset of known "
            "size; use a map-style Dataset (e.g. TensorDataset)"
        ]
    if isinstance(loader.batch_sampler, LogicalBatchSampler):
        return []
    if loader.batch_sampler is None:
        return ["the data loader has batch_size=None (no batches); give it a batch_size"]
    out = []
    batch_sampler = loader.batch_sampler
    if type(batch_sampler) is not BatchSampler:
        out.append(
            f"the data loader's batch_sampler is a {type(batch_sampler).__name__}, whose batches the accountant "
            "cannot model; give the loader a batch_size (and shuffle=True or not) and let dpclip sample"
        )
        return out
    sampler = batch_sampler.sampler
    if isinstance(sampler, SequentialSampler):
        return out
    if type(sampler) is RandomSampler and not sampler.replacement and sampler.num_samples == len(loader.dataset):
        return out
    what = type(sampler).__name__
    if isinstance(sampler, RandomSampler):
        what = "RandomSampler with replacement or num_samples"
    out.append(
        f"the data loader samples with a {what}: dpclip replaces the sampler by Poisson sampling (what the "
        "accountant models), which would silently change your weighting or subset. Use a plain loader over the "
        "data you mean (torch.utils.data.Subset for a subset); weighted sampling has no privacy analysis here"
    )
    return out


def _rebuild_loader(user: DataLoader, batch_sampler: LogicalBatchSampler, poisson: bool) -> DataLoader:
    """The engine's loader: ``user``'s dataset and settings, dpclip's batches (empty ones collate too)."""
    empty_ok = poisson or batch_sampler.unit_of is not None
    collate = empty_batch_collate(user.collate_fn, user.dataset) if empty_ok else user.collate_fn
    return loader_like(user, batch_sampler, collate)


def _clip_groups(kind: str, max_grad_norm: Any, model: nn.Module, trainable: list[nn.Parameter]):
    """``(groups, names, bounds)``: the clipping groups of parameters and their thresholds."""
    names_of = {id(p): n for n, p in model.named_parameters()}
    if kind == "automatic":
        return [trainable], ["<all>"], ()
    if isinstance(max_grad_norm, Mapping):
        if kind not in _PER_LAYER + ("batch",):
            raise ValueError(f"clipping={kind!r} takes one max_grad_norm; a dict is for clipping='per_layer'")
        return _groups_from_dict(max_grad_norm, model, trainable)
    if isinstance(max_grad_norm, (list, tuple)):
        if kind == "flat":
            raise ValueError("clipping='flat' takes one max_grad_norm; a list is for clipping='per_layer'")
        bounds = [_bound(f"max_grad_norm[{i}]", b) for i, b in enumerate(max_grad_norm)]
        if len(bounds) != len(trainable):
            raise ValueError(
                f"clipping={kind!r} with a list needs one max_grad_norm per trainable parameter tensor, in "
                f"model.parameters() order ({len(trainable)} here); got {len(bounds)}"
            )
        return [[p] for p in trainable], [names_of.get(id(p), "?") for p in trainable], tuple(bounds)
    bound = _bound("max_grad_norm", max_grad_norm)
    if kind in _PER_LAYER:
        layers = [
            (name, [p for p in m.parameters(recurse=False) if p.requires_grad])
            for name, m in model.named_modules()
        ]
        seen: set[int] = set()
        groups, names = [], []
        for name, params in layers:
            params = [p for p in params if id(p) not in seen]
            if params:
                seen.update(id(p) for p in params)
                groups.append(params)
                names.append(name or "<root>")
        return groups, names, tuple(bound / math.sqrt(len(groups)) for _ in groups)
    return [trainable], ["<all>"], (bound,)


def _groups_from_dict(bounds: Mapping[str, float], model: nn.Module, trainable: list[nn.Parameter]):
    modules = dict(model.named_modules())
    unknown = [k for k in bounds if k not in modules]
    if unknown:
        raise ValueError(
            f"max_grad_norm names modules {unknown} that the model does not have; the names are those of "
            "model.named_modules() (e.g. '0', 'encoder.layer1')"
        )
    owner: dict[int, str] = {}
    for name in sorted(bounds, key=len):  # longest name wins: a sub-module's bound overrides its parent's
        for p in modules[name].parameters():
            owner[id(p)] = name
    left = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in owner]
    if left:
        raise ValueError(
            f"max_grad_norm gives no bound for the trainable parameters {left}; every trainable parameter must be "
            "clipped: add their modules (or a parent, e.g. '' for the whole model) to the dict"
        )
    order = [name for name in bounds if any(owner.get(id(p)) == name for p in trainable)]
    groups = [[p for p in trainable if owner[id(p)] == name] for name in order]
    return groups, order, tuple(_bound(f"max_grad_norm[{name!r}]", bounds[name]) for name in order)


def _bound(name: str, value: Any) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a number; got {value!r}") from None
    if not x > 0:
        raise ValueError(f"{name} must be > 0 (an L2 norm bound, e.g. 1.0); got {value!r}")
    return x


def _sensitivity_of(kind: str, bounds: tuple[float, ...]) -> float:
    if kind == "automatic":
        return 1.0
    return math.sqrt(sum(b * b for b in bounds))


def _clip_unit(att: _Attachment, grads: dict[nn.Parameter, torch.Tensor]):
    """Batch clipping: clip one micro-batch's gradient (``p.grad`` from ordinary backprop) per group."""
    ref = next(iter(grads.values()))
    dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
    sq = []
    for group in att.groups:
        total = torch.zeros((), dtype=dtype, device=ref.device)
        for p in group:
            if p in grads:
                total = total + grads[p].detach().to(dtype).pow(2).sum()
        sq.append(total)
    norms = torch.stack(sq).clamp_min(0).sqrt().unsqueeze(0)  # [1, G]
    scales = att.clipper(norms)[0]
    out = {}
    for k, group in enumerate(att.groups):
        for p in group:
            if p in grads:
                out[p] = grads[p].detach() * scales[k].to(grads[p].dtype)
    return out, norms


def _steps_within_budget(accountant: Any, sigma: float, q: float, max_epsilon: float, delta: float) -> int:
    """How many more steps of ``(sigma, q)`` keep epsilon at ``delta`` within ``max_epsilon``."""
    base = accountant.state_dict()

    def epsilon_after(k: int) -> float:
        probe = make_accountant(accountant.name)
        probe.load_state_dict(base)
        if k:
            probe.step(noise_multiplier=sigma, sample_rate=q, steps=k)
        return probe.get_epsilon(delta) if len(probe) else 0.0

    if sigma == 0.0 or epsilon_after(1) > max_epsilon:
        return 0
    lo, hi = 1, 2
    while epsilon_after(hi) <= max_epsilon:
        lo, hi = hi, hi * 2
        if hi > 10**9:
            return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if epsilon_after(mid) <= max_epsilon:
            lo = mid
        else:
            hi = mid
    return lo


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
            "outside the module that owns it (e.g. F.linear(x, self.embedding.weight) in a parent module, or "
            "PEFT/LoRA factors applied by a hook or a function rather than by calling the module that holds them: "
            "call that module in the forward pass, or freeze the parameter with requires_grad=False), a loss term "
            "that does not depend on the batch (e.g. an L2 penalty: use the optimizer's weight_decay), "
            "or p.grad not zeroed since the last step"
        )


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
    secure_mode: bool = False,
    **kwargs: Any,
) -> Private:
    """The function form of :meth:`PrivacyEngine.make_private` (same keyword arguments)."""
    engine = PrivacyEngine(accountant=accountant, secure_mode=secure_mode)
    model, optimizer, data_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=data_loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        **kwargs,
    )
    return Private(model, optimizer, data_loader, engine)
