"""Capture activations and output gradients during the user's ordinary ``loss.backward()``.

:class:`GradSampler` hooks every *unit* of a model (see :func:`find_units`): a module with a
per-layer rule (:mod:`dpclip.grad_sample.rules`) or, for anything else that owns trainable
parameters, a fallback unit whose per-sample gradients come from ``torch.func``
(:func:`dpclip.grad_sample.vmap.module_vjp_per_sample`). After the backward pass it gives

* ``per_sample_grads()``: materialised ``[B, *shape]`` per-sample gradients,
* ``per_sample_sq_norms()``: ``[B]`` squared norms (ghost norms where a rule allows),
* ``clipped_sums(scales)``: ``sum_i scale_i g_i`` (book-keeping: one contraction per layer),
* ``bookkeep(scales_for)``: the two in one pass, the scales computed from the norms in between
  (what :func:`dpclip.grad_sample.bookkeeping.clip_and_sum` uses),

all keyed by the :class:`~torch.nn.Parameter` object, with no second backward pass.

Capture mechanism
-----------------
A forward hook (``register_forward_hook(..., with_kwargs=True)``) stores the detached inputs
(and keyword arguments) of each call and registers a tensor hook on each output tensor that
requires grad; that tensor hook receives ``dL/d(output)`` of *this* call. Pairing the
gradient with its call through the closure (rather than through a module full backward hook,
whose firing order one would have to match with the forward calls) makes it exact for a
module called several times in one forward, for calls whose output does not reach the loss
(they contribute nothing), for outputs nested in tuples (``nn.LSTM``'s ``(out, (h_n, c_n))``:
a full backward hook only sees top-level tensors, so gradients through ``h_n`` would be lost),
and for outputs modified in place afterwards (``nn.ReLU(inplace=True)`` after a ``Linear``:
the tensor hook, registered before the in-place op, sees the gradient of the original output;
a full backward hook raises there). A second backward through the same graph
(``retain_graph=True``) adds to the stored gradients, as ``p.grad`` accumulates.

Nothing is set on modules or parameters: the only state on a module is the forward-hook
handle, removed by :meth:`GradSampler.remove`; tensor hooks live on the autograd graph of one
forward pass and die with it. The one exception is opt-in: with ``skip_param_grads`` (see
:meth:`GradSampler.set_skip_param_grads`) a rule unit's own parameters are set to
``requires_grad=False`` for the duration of each of its calls (restored by an
``always_call`` forward hook, so also when the forward raises), which keeps autograd from
computing their ordinary gradients, unused by book-keeping.

Capture happens only in a grad-enabled forward whose output requires grad, so evaluation
under ``torch.no_grad()`` / ``torch.inference_mode()`` stores nothing, and not inside
``torch.func`` transforms. Activation checkpointing works with ``use_reentrant`` True and
False. After a backward, the next forward starts a new round; gradients from two rounds are
refused (call :meth:`GradSampler.clear` after each step).

Cross terms
-----------
A parameter used more than once (one module called twice, or one Parameter shared by two
units, e.g. tied embedding / output weights) has per-sample gradient ``g_i = sum_k g_i^(k)``.
Its squared norm has cross terms, so :meth:`GradSampler.per_sample_sq_norms` materialises
such parameters (correctness first). The clipped sum is linear in ``g_i``, so
``sum_i s_i g_i = sum_k sum_i s_i g_i^(k)`` is the sum of per-use book-keeping contractions:
no materialisation needed.

Limitations
-----------
* Per-sample gradients assume that samples do not interact (no BatchNorm in train mode);
  ``validate.py`` refuses such modules.
* A parameter used *outside* the forward of the unit that owns it (e.g. a parent module with
  no parameters of its own calling ``F.linear(h, self.emb.weight)``) is not seen by any hook
  and its gradient from that use is missed. Put such code in a module that holds the
  parameter (e.g. ``self.weight = emb.weight``): that module becomes a fallback unit.
* Fallback units get their keyword arguments unbatched (passed to every sample unchanged):
  batched tensors must be positional arguments (``nn.MultiheadAttention``'s
  ``key_padding_mask`` passed as a keyword is therefore refused at compute time).
* The fallback recomputes the module's forward for each sample, so it cannot reproduce
  random operations (dropout) inside a fallback unit (``RandomnessError``).
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from . import mha as _mha
from . import rules as _rules
from .rules import LayerRule, rule_for

__all__ = ["Unit", "find_units", "uncovered_parameters", "GradSampler"]

_LOSS_REDUCTIONS = ("mean", "sum")
_GHOST_MODES = ("auto", "always", "never")


# --------------------------------------------------------------------------------------------
# units
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """One hooked module and the trainable parameters it computes per-sample gradients for."""

    name: str  # module path in the model ('' for the root)
    module: nn.Module
    rule: LayerRule | None  # None -> torch.func fallback (module_vjp_per_sample)
    params: tuple[tuple[str, nn.Parameter], ...]  # (name relative to module, parameter)


def _is_parametrized(module: nn.Module) -> bool:
    try:
        from torch.nn.utils import parametrize
    except ImportError:  # pragma: no cover
        return False
    return parametrize.is_parametrized(module)


def find_units(model: nn.Module, *, use_rules: bool = True) -> list[Unit]:
    """The modules to hook, top-down (see the module docstring).

    ``use_rules=False`` makes every unit a torch.func fallback unit (``grad_sample_mode="vmap"``).

    * A module whose exact type has a rule is a unit with its own trainable parameters; its
      children are not visited. ``rule_for`` may raise ``ValueError`` for a refused setting.
    * Otherwise a module with trainable parameters of its own (or a parametrized module) is a
      fallback unit covering all its trainable parameters, children's included; children are
      not visited (its forward may use them directly, as ``nn.MultiheadAttention`` uses
      ``out_proj.weight``).
    * Otherwise its children are visited.

    Modules without trainable parameters are skipped, frozen parameters never included. A
    module instance reachable under several names is one unit (called several times).
    """
    units: list[Unit] = []
    seen: set[int] = set()

    def visit(name: str, module: nn.Module) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        rule = rule_for(module)
        if rule is not None and use_rules:
            params = tuple(
                (n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad
            )
            if params:
                units.append(Unit(name, module, rule, params))
            return
        own = [p for _, p in module.named_parameters(recurse=False) if p.requires_grad]
        if own or _is_parametrized(module):
            params = tuple((n, p) for n, p in module.named_parameters() if p.requires_grad)
            if params:
                units.append(Unit(name, module, None, params))
                return
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)

    visit("", model)
    return units


def uncovered_parameters(model: nn.Module, units: list[Unit]) -> list[str]:
    """Names of the model's trainable parameters that no unit covers (empty by construction)."""
    covered = {id(p) for u in units for _, p in u.params}
    return [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]


# --------------------------------------------------------------------------------------------
# small pytree helpers
# --------------------------------------------------------------------------------------------


_STABLE_MIN_BYTES = 32 << 20  # captured activations from this size on go to kept buffers (see _stable_inputs)


def _detach(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return tree.detach()
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # namedtuple
        return type(tree)(*(_detach(t) for t in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_detach(t) for t in tree)
    if isinstance(tree, dict):
        return {k: _detach(v) for k, v in tree.items()}
    return tree


def _leaves(tree: Any, out: list[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        out.append(tree)
    elif isinstance(tree, (tuple, list)):
        for t in tree:
            _leaves(t, out)
    elif isinstance(tree, dict):
        for v in tree.values():
            _leaves(v, out)
    return out


class _Leaf:
    """Stands for an output tensor in a call's output skeleton (the tensor is not kept)."""

    __slots__ = ()

    def __repr__(self) -> str:  # pragma: no cover
        return "<tensor>"


_LEAF = _Leaf()


def _skeleton(tree: Any) -> Any:
    """``tree`` with every tensor replaced by ``_LEAF`` (keeps no output memory alive)."""
    if isinstance(tree, torch.Tensor):
        return _LEAF
    if isinstance(tree, (tuple, list)):
        return tuple(_skeleton(t) for t in tree)
    if isinstance(tree, dict):
        return {k: _skeleton(v) for k, v in tree.items()}
    return None


def _grad_structure(tree: Any, grads: list, counter: list[int]) -> Any:
    """The skeleton with its k-th leaf replaced by ``grads[k]`` (None: zero gradient)."""
    if tree is _LEAF:
        k = counter[0]
        counter[0] += 1
        return grads[k]
    if isinstance(tree, tuple):
        return tuple(_grad_structure(t, grads, counter) for t in tree)
    if isinstance(tree, dict):
        return {k: _grad_structure(v, grads, counter) for k, v in tree.items()}
    return None


def _is_functorch_wrapped(t: torch.Tensor) -> bool:
    try:
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))
    except (AttributeError, RuntimeError):  # pragma: no cover
        return False


def _in_backward() -> bool:
    """True while autograd runs a backward pass (activation checkpointing recomputes there)."""
    try:
        return torch._C._current_graph_task_id() != -1
    except AttributeError:  # pragma: no cover
        return False


# --------------------------------------------------------------------------------------------
# ghost-norm switch
# --------------------------------------------------------------------------------------------

_GHOST_LOCK = threading.RLock()


@contextmanager
def _ghost_forced_on() -> Iterator[None]:
    """Make the rules take their ghost-norm branch (``rules.use_ghost`` -> True).

    The rules read the module-level ``use_ghost`` at call time and take no argument for it, so
    ``ghost="always"`` swaps that function for the duration of the call (under a lock). Both
    branches are exact, so another thread calling a rule meanwhile gets the same values.
    ``ghost="never"`` needs no switch: the norms are taken from the materialised gradients.
    """
    with _GHOST_LOCK:
        old = _rules.use_ghost
        _rules.use_ghost = lambda T, d, p: True
        try:
            yield
        finally:
            _rules.use_ghost = old


# --------------------------------------------------------------------------------------------
# the sampler
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Call:
    """One call of a unit in a grad-enabled forward."""

    inputs: tuple  # detached positional arguments
    kwargs: dict  # detached keyword arguments
    output: Any  # skeleton of the output (tensors -> _LEAF), to rebuild grad_output
    round: int  # forward/backward round (a new one starts at the first forward after a backward)
    grads: list = field(default_factory=list)  # dL/d(output leaf k), None until its hook fires
    batch: int = -1  # rule units: the batch size of the activation (kept after a release)
    # rule units the plan materialises: per-sample grads formed when the output gradient arrived
    psg: dict | None = None
    released: bool = False  # inputs and output gradients dropped once psg was formed
    pieces: Any = None  # nn.MultiheadAttention: its Linear maps (mha.expand), cached per gradient

    @property
    def active(self) -> bool:
        return self.psg is not None or any(g is not None for g in self.grads)

    def grad_output(self) -> Any:
        return _grad_structure(self.output, self.grads, [0])


class GradSampler:
    """Removable handle: hooks every unit of ``model``; also a context manager (exit -> remove).

    ``loss_reduction``: ``"mean"`` if the loss is the batch mean of per-sample losses (output
    gradients are multiplied by the batch size), ``"sum"`` if it is their sum.

    ``skip_param_grads``: see :meth:`set_skip_param_grads` (default off: ``p.grad`` is computed
    by ``loss.backward()`` as usual).

    ``anchor_first_layers``: with ``skip_param_grads`` on, also skip the parameters of a rule
    unit none of whose inputs requires grad (a first layer), by re-attaching its output to the
    graph through a no-op node: autograd then computes neither its weight gradient nor an input
    gradient. Default: the class attribute ``GradSampler.anchor_first_layers`` (False).

    ``ghost``: ``"auto"`` lets each rule choose ghost norm or materialisation per layer
    (fastDP's rule); ``"always"`` forces the ghost norm for the layers that have one (Linear,
    Conv, Embedding weights); ``"never"`` materialises every per-sample gradient to take its
    norm. All three give the same values; only cost differs. Fallback units always materialise.

    Usage::

        with GradSampler(model) as gs:
            loss_fn(model(x), y).backward()
            norms = gs.per_sample_sq_norms()
            sums = gs.clipped_sums(scales)
            gs.clear()
    """

    anchor_first_layers: bool = False  # see the class docstring

    def __init__(
        self,
        model: nn.Module,
        *,
        loss_reduction: str = "mean",
        ghost: str = "auto",
        use_rules: bool = True,
        skip_param_grads: bool = False,
        anchor_first_layers: bool | None = None,
    ):
        if loss_reduction not in _LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {_LOSS_REDUCTIONS}, got {loss_reduction!r}")
        if ghost not in _GHOST_MODES:
            raise ValueError(f"ghost must be one of {_GHOST_MODES}, got {ghost!r}")
        self.model = model
        self.loss_reduction = loss_reduction
        self.ghost = ghost
        if anchor_first_layers is not None:
            self.anchor_first_layers = bool(anchor_first_layers)
        self.units: list[Unit] = find_units(model, use_rules=use_rules)
        self._use_rules = use_rules
        covered: dict[int, nn.Parameter] = {}
        for u in self.units:
            for _, p in u.params:
                covered.setdefault(id(p), p)
        self._parameters: tuple[nn.Parameter, ...] = tuple(covered.values())
        for unit in self.units:
            _check_unit(unit)
        self._calls: list[list[_Call]] = [[] for _ in self.units]
        self._round = 0
        self._backward_seen = False
        self._suspended = 0
        self._grad_cache: dict[int, dict[str, torch.Tensor]] = {}
        self._scratch: dict[int, dict] = {}  # per call: what a rule's norm pass leaves its sum pass
        # (unit, call position) -> a large captured activation's buffer, kept across clear()
        self._stable: dict[tuple[int, int], torch.Tensor] = {}
        self._handles: list[Any] = []
        for i, unit in enumerate(self.units):
            self._handles.append(
                unit.module.register_forward_hook(self._make_forward_hook(i), with_kwargs=True)
            )
        # skip_param_grads: per rule unit, the parameters whose autograd gradient may be skipped
        # (used by this unit only: a parameter shared with another unit keeps normal autograd)
        owners: dict[int, int] = {}
        for unit in self.units:
            for _, p in unit.params:
                owners[id(p)] = owners.get(id(p), 0) + 1
        self._skippable: list[tuple[tuple[str, nn.Parameter], ...]] = [
            tuple((n, p) for n, p in unit.params if owners[id(p)] == 1) if unit.rule is not None else ()
            for unit in self.units
        ]
        self._skip_handles: list[Any] = []
        self._frozen: list[list[list[nn.Parameter]]] = [[] for _ in self.units]  # per unit, per open call
        self._anchor_next: list[bool] = [False] * len(self.units)  # set by the skip pre-hook
        self._anchors: dict[tuple, torch.Tensor] = {}
        self._release = False  # drop captures once a call's per-sample grads are formed
        self.set_skip_param_grads(skip_param_grads)

    # ---------------------------------------------------------------- handle

    def remove(self) -> None:
        """Remove every hook and drop the captured tensors."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.set_skip_param_grads(False)
        self.clear()
        self._stable = {}

    @property
    def skip_param_grads(self) -> bool:
        return bool(self._skip_handles)

    def set_skip_param_grads(self, enabled: bool) -> None:
        """Let autograd skip the ordinary gradients of rule units' parameters (or stop doing so).

        When enabled, each call of a rule unit whose inputs require grad runs with the unit's
        own trainable parameters temporarily set to ``requires_grad=False`` (restored right
        after the call, also when it raises), so ``loss.backward()`` computes no weight
        gradient for them and leaves their ``.grad`` untouched; the output still requires grad
        (through the input), so the output gradient is captured and the per-sample norms and
        clipped sums are unchanged. Not applied to fallback units, to parameters shared by
        several units, or to calls none of whose inputs requires grad (the first layer: its
        weight gradient would be replaced by an input gradient of the same cost).
        Only for callers that do not read ``p.grad`` after backward (``PrivacyEngine`` after
        its first-step audit).
        """
        if enabled and not self._skip_handles and self._handles:
            for i, unit in enumerate(self.units):
                if not self._skippable[i]:
                    continue
                self._skip_handles.append(
                    unit.module.register_forward_pre_hook(self._make_skip_pre_hook(i), with_kwargs=True)
                )
                self._skip_handles.append(
                    unit.module.register_forward_hook(
                        self._make_skip_post_hook(i), with_kwargs=True, always_call=True, prepend=True
                    )
                )
        elif not enabled:
            for h in self._skip_handles:
                h.remove()
            self._skip_handles = []
            self._restore_frozen()
            self._anchor_next = [False] * len(self.units)
        self._release = bool(enabled)

    def _restore_frozen(self) -> None:
        """Safety net: give back requires_grad to parameters still frozen by an unfinished call."""
        for stack in self._frozen:
            while stack:
                for p in stack.pop():
                    p.requires_grad_(True)

    def clear(self) -> None:
        """Drop the captured tensors (call after each optimizer step)."""
        self._grad_cache = {}
        self._scratch = {}
        self._calls = [[] for _ in self.units]
        self._round = 0
        self._backward_seen = False

    def __enter__(self) -> "GradSampler":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    @property
    def parameters(self) -> list[nn.Parameter]:
        """Every parameter covered by a unit, once each, in unit order (fixed at construction)."""
        return list(self._parameters)

    # ---------------------------------------------------------------- skip_param_grads

    def _make_skip_pre_hook(self, index: int):
        skippable = self._skippable[index]

        def pre_hook(module, args, kwargs):
            frozen: list[nn.Parameter] = []
            self._frozen[index].append(frozen)  # popped by the post hook (always called)
            self._anchor_next[index] = False
            if self._suspended or not torch.is_grad_enabled():
                return None
            inputs = _leaves((args, kwargs), [])
            if any(_is_functorch_wrapped(t) for t in inputs):
                return None
            first = not any(t.requires_grad for t in inputs)
            if first and not self.anchor_first_layers:
                return None
            params = module._parameters
            for name, p in skippable:
                # only the unit's own leaf parameter (not one swapped in by functional_call)
                if params.get(name) is p and p.requires_grad and p.is_leaf:
                    p.requires_grad_(False)
                    frozen.append(p)
            # no input requires grad (a first layer): the capture hook re-attaches the output
            self._anchor_next[index] = bool(frozen) and first
            return None

        return pre_hook

    def _make_skip_post_hook(self, index: int):
        def post_hook(module, args, kwargs, output):
            stack = self._frozen[index]
            if stack:
                for p in stack.pop():
                    p.requires_grad_(True)
            return None

        return post_hook

    # ---------------------------------------------------------------- capture

    def _make_forward_hook(self, index: int):
        unit = self.units[index]

        def hook(module, args, kwargs, output):
            if self._suspended or not torch.is_grad_enabled():
                return None
            replaced = None
            if self._anchor_next[index]:
                # skip_param_grads froze this call's parameters although no input requires
                # grad (a first layer): the output is cut from the graph. Re-attach it through
                # a no-op node, so its gradient still arrives and autograd computes neither
                # the weight gradient nor an input gradient.
                self._anchor_next[index] = False
                if isinstance(output, torch.Tensor) and not output.requires_grad:
                    output = replaced = _Anchor.apply(output, self._anchor_for(output))
            leaves = _leaves(output, [])
            if not any(t.requires_grad for t in leaves):
                return None
            if any(_is_functorch_wrapped(t) for t in leaves):  # inside a torch.func transform
                return None
            if self._backward_seen and not _in_backward():
                # first forward after a backward: a new round. A forward *during* backward
                # (activation checkpointing recomputing a segment) belongs to the current one:
                # with use_reentrant=True the recomputed calls are the ones backwarded (the
                # first pass ran without grad); with use_reentrant=False the recomputed graph
                # is never backwarded, so those calls stay inactive and are ignored.
                self._round += 1
                self._backward_seen = False
            inputs = _detach(tuple(args))
            if self._skip_handles and unit.rule is not None and not unit.rule.materialised:
                inputs = self._stable_inputs(index, inputs, output)
            call = _Call(
                inputs=inputs,
                kwargs=_detach(dict(kwargs)),
                output=_skeleton(output),
                round=self._round,
                grads=[None] * len(leaves),
            )
            if unit.rule is not None:
                call.batch = int(_rule_activation(call).shape[0])
            seen: set[int] = set()
            for k, t in enumerate(leaves):
                # one tensor returned twice gets its gradient once (the vjp would count it twice)
                if t.requires_grad and id(t) not in seen:
                    seen.add(id(t))
                    t.register_hook(self._make_grad_hook(index, call, k))
            self._calls[index].append(call)
            return replaced

        return hook

    def _stable_inputs(self, index: int, inputs: tuple, output: Any) -> tuple:
        """``inputs`` with a large activation (``_STABLE_MIN_BYTES`` or more, on the CPU) copied
        into a buffer this sampler keeps from step to step, one per (unit, call) position.

        With ``skip_param_grads`` autograd does not keep a rule unit's input for a weight
        gradient, but book-keeping keeps it until the clipped sums, after the backward. Holding
        the caller's tensor would keep its block out of the allocator's reach for the whole
        backward, where plain training frees it and reuses it; glibc serves a block above its
        mmap ceiling (32 MiB) that no free block fits as fresh pages, each a page fault (W4's
        feed-forward activations: 33.6 MB, 8,193 faults each, about 2 us apiece on the
        benchmark machine). A copy into a kept buffer (touched once, in the first step) lets the
        original go as it would without DP. Same values, bit for bit (docs/design.md E25). Not
        for calls the plan materialises as soon as their output gradient arrives (the capture
        is released then); ``output`` has the output gradient's shape for that decision."""
        t = inputs[0] if inputs else None
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.nbytes < _STABLE_MIN_BYTES:
            return inputs
        unit = self.units[index]
        if self.ghost == "never" or (
            self.ghost == "auto" and isinstance(output, torch.Tensor) and unit.rule.materialise(unit.module, t, output)
        ):
            return inputs  # materialised when the output gradient arrives, then released: no copy
        key = (index, len(self._calls[index]))
        buf = self._stable.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = self._stable[key] = torch.empty(t.shape, dtype=t.dtype)
        buf.copy_(t)
        return (buf,) + tuple(inputs[1:])

    def _make_grad_hook(self, index: int, call: _Call, k: int):
        unit = self.units[index]

        def hook(grad):
            if call.released:
                raise RuntimeError(
                    f"{unit.name or type(unit.module).__name__}: a second backward pass through "
                    "the same graph (retain_graph=True) after GradSampler released this call's "
                    "captures (it does so with skip_param_grads on, as in make_private). Call "
                    "set_skip_param_grads(False) to keep them for several backward passes."
                )
            g = grad.detach()
            self._backward_seen = True
            self._grad_cache.pop(id(call), None)  # a new output gradient: this call's cache is stale
            self._scratch.pop(id(call), None)
            call.pieces = None
            if unit.rule is not None and len(call.grads) == 1 and self._eager(unit, call, g):
                # the plan materialises this call: form its per-sample gradients now (linear in
                # the output gradient, so a second backward adds to them) and, when allowed,
                # drop the activation and output gradient, as plain backward would
                with torch.no_grad():
                    psg = unit.rule.per_sample_grads(unit.module, _rule_activation(call), g)
                if call.psg is None:
                    call.psg = dict(psg)
                else:
                    for n, v in psg.items():
                        call.psg[n] = call.psg[n] + v
                if self._release:
                    call.inputs, call.kwargs, call.grads = (), {}, [None]
                    call.released = True
                return None
            call.grads[k] = g if call.grads[k] is None else call.grads[k] + g
            return None

        return hook

    def _eager(self, unit: Unit, call: _Call, g: torch.Tensor) -> bool:
        """Whether this rule call's per-sample gradients are formed when its gradient arrives."""
        rule = unit.rule
        if call.psg is not None:
            return True  # already materialised by an earlier backward: keep adding
        if any(t is not None for t in call.grads):
            return False  # captured un-materialised by an earlier backward: keep capturing
        if rule.materialised or self.ghost == "never":
            return True
        if self.ghost == "always":
            return False
        return rule.materialise(unit.module, _rule_activation(call), g)

    def _anchor_for(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.device, like.dtype)
        anchor = self._anchors.get(key)
        if anchor is None:
            anchor = self._anchors[key] = torch.zeros((), device=like.device, dtype=like.dtype, requires_grad=True)
        return anchor

    # ---------------------------------------------------------------- captured data

    def _active_calls(self) -> list[list[_Call]]:
        """Per unit, the calls whose output received a gradient (all from one round)."""
        active = [[c for c in calls if c.active] for calls in self._calls]
        rounds = {c.round for calls in active for c in calls}
        if len(rounds) > 1:
            raise RuntimeError(
                "GradSampler holds gradients from more than one forward/backward pass: the "
                "per-sample gradients of different batches cannot be combined sample by "
                "sample. Call clear() after each optimizer step (and after each micro-batch "
                "when accumulating)."
            )
        return active

    def _call_batch_size(self, unit: Unit, call: _Call) -> int:
        module = unit.module
        if unit.rule is not None:
            return call.batch
        if isinstance(module, nn.RNNBase):
            x = call.inputs[0] if call.inputs else next(iter(call.kwargs.values()))
            if isinstance(x, nn.utils.rnn.PackedSequence):
                raise TypeError(
                    f"{unit.name or type(module).__name__}: PackedSequence inputs are not "
                    "supported for per-sample gradients; pass padded tensors and mask the loss"
                )
            return int(x.shape[0 if module.batch_first else 1])
        leaves = _leaves(call.inputs, [])
        if not leaves:
            raise ValueError(
                f"unit {unit.name or type(module).__name__!r} ({type(module).__name__}) was "
                "called without positional tensor arguments: the fallback needs the batched "
                "inputs as positional arguments"
            )
        return int(leaves[0].shape[0])

    def _batch_size(self, active: list[list[_Call]]) -> int:
        sizes: dict[int, list[str]] = {}
        for unit, calls in zip(self.units, active):
            for c in calls:
                sizes.setdefault(self._call_batch_size(unit, c), []).append(
                    unit.name or type(unit.module).__name__
                )
        if len(sizes) > 1:
            detail = "; ".join(f"B={b}: {sorted(set(n))}" for b, n in sorted(sizes.items()))
            raise ValueError(
                "units disagree on the batch size (is the batch on dim 0 everywhere? "
                f"nn.MultiheadAttention needs batch_first=True): {detail}"
            )
        return next(iter(sizes)) if sizes else 0

    @property
    def batch_size(self) -> int:
        """B, from the captured activations (0 if nothing was captured or the batch is empty)."""
        return self._batch_size(self._active_calls())

    def _factor(self, batch: int) -> float:
        return float(batch) if self.loss_reduction == "mean" else 1.0

    # ---------------------------------------------------------------- per-call computations

    def _call_grads(self, unit: Unit, call: _Call) -> dict[str, torch.Tensor]:
        """Unscaled per-sample grads ``{name: [B, *shape]}`` of one call of one unit.

        Cached until the next output gradient or ``clear()``: the norm pass and the
        clipped-sum pass of one step share them (fallback units and materialising rules).
        """
        if call.psg is not None:
            return call.psg
        cached = self._grad_cache.get(id(call))
        if cached is None:
            cached = self._grad_cache[id(call)] = self._compute_call_grads(unit, call)
        return cached

    def _compute_call_grads(self, unit: Unit, call: _Call) -> dict[str, torch.Tensor]:
        if call.psg is not None:
            return call.psg
        if unit.rule is not None:
            a, g = _rule_activation(call), _rule_backprop(unit, call)
            return unit.rule.per_sample_grads(unit.module, a, g)
        pieces = self._mha_pieces(unit, call)
        if pieces is not None:
            return _mha.per_sample_grads(unit.module, pieces, {n for n, _ in unit.params})
        from .vmap import module_vjp_per_sample

        _check_fallback_kwargs(unit, call)
        self._suspended += 1  # the fallback re-runs the module's forward: do not capture it
        try:
            return module_vjp_per_sample(
                unit.module,
                call.inputs,
                call.grad_output(),
                params=dict(unit.params),
                kwargs=call.kwargs,
            )
        finally:
            self._suspended -= 1

    def _linear_uses_sq(self, used: list) -> torch.Tensor | None:
        """Squared norm of a parameter used several times, all as the weight (or all as the bias)
        of Linear calls that kept their captures: ``sum_k g_k^T a_k = G^T A`` with the uses'
        positions concatenated, so the ghost norm of ``(A, G)`` includes every cross term.
        None where that does not apply or materialising is cheaper (fastDP's rule on the
        concatenated length)."""
        if self.ghost == "never":
            return None
        names = {n for _, _, n in used}
        if len(names) != 1 or not names <= {"weight", "bias"}:
            return None
        if any(unit.rule is not _rules.LINEAR_RULE or call.psg is not None for unit, call, _ in used):
            return None
        pairs = [_rules._linear_flat(_rule_activation(call), _rule_backprop(unit, call)) for unit, call, _ in used]
        if len({a.dtype for a, _ in pairs}) != 1:
            return None
        if names == {"bias"}:
            return _sq(sum(g.sum(1) for _, g in pairs))
        T = sum(a.shape[1] for a, _ in pairs)
        d, p = pairs[0][0].shape[2], pairs[0][1].shape[2]
        if self.ghost == "auto" and not _rules.use_ghost(T, d, p):
            return None
        a = torch.cat([a for a, _ in pairs], dim=1)
        g = torch.cat([g for _, g in pairs], dim=1)
        return _rules._ghost_sq(a, g)

    def _mha_pieces(self, unit: Unit, call: _Call):
        """``nn.MultiheadAttention`` calls the batched recomputation supports: its Linear maps."""
        if unit.rule is not None or not self._use_rules or not isinstance(unit.module, nn.MultiheadAttention):
            return None
        if call.pieces is None:
            if not _mha.supported(unit.module, call.inputs, call.kwargs, call.grads):
                return None
            call.pieces = _mha.expand(unit.module, call.inputs, call.kwargs, call.grads[0])
        return call.pieces

    def _pieces(self, unit: Unit, call: _Call):
        """A fallback unit's affine maps as Linear pieces, where known: ``nn.MultiheadAttention``
        (:func:`mha.expand`) and ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` (:func:`rnn.expand`). They
        get ghost norms and the book-keeping contraction like Linear layers, so no ``[B, *shape]``
        gradient of the unit is formed. None: materialise (the call is not supported by the
        batched paths, or ``ghost="never"``)."""
        if self.ghost == "never":
            return None
        if isinstance(unit.module, nn.MultiheadAttention):
            return self._mha_pieces(unit, call)
        if unit.rule is not None or not self._use_rules or type(unit.module) not in _rnn_types():
            return None
        if call.pieces is None:
            from .rnn import expand

            self._suspended += 1  # the check re-runs the module's forward: do not capture it
            try:
                pieces = expand(unit.module, call.inputs, call.grad_output(), params=dict(unit.params),
                                kwargs=call.kwargs)
            finally:
                self._suspended -= 1
            call.pieces = pieces if pieces is not None else False  # False: tried, not supported
        return call.pieces or None

    # ---------------------------------------------------------------- public API

    def per_sample_grads(self) -> dict[nn.Parameter, torch.Tensor]:
        """``{parameter: [B, *shape]}``; a parameter used several times gets the sum of its uses."""
        active = self._active_calls()
        batch = self._batch_size(active)
        factor = self._factor(batch)
        out: dict[nn.Parameter, torch.Tensor] = {}
        with torch.no_grad():
            for unit, calls in zip(self.units, active):
                for call in calls:
                    grads = self._call_grads(unit, call)
                    for name, p in unit.params:
                        if name in grads:  # a parameter frozen since find_units: no gradient
                            _accumulate(out, p, grads[name])
            return {
                p: (out[p] * factor if p in out else p.new_zeros((batch, *p.shape)))
                for p in self.parameters
            }

    def _uses(self, active: list[list[_Call]]) -> dict[int, int]:
        uses: dict[int, int] = {}
        for unit, calls in zip(self.units, active):
            for _, p in unit.params:
                uses[id(p)] = uses.get(id(p), 0) + len(calls)
        return uses

    def per_sample_sq_norms(self) -> dict[nn.Parameter, torch.Tensor]:
        """``{parameter: [B]}`` squared per-sample gradient norms.

        Ghost norms (per the ``ghost`` setting and the rule's choice) for a parameter with a
        single use in a rule unit; materialised otherwise (fallback units, and parameters used
        more than once, whose norm has cross terms).
        """
        active = self._active_calls()
        batch = self._batch_size(active)
        factor2 = self._factor(batch) ** 2
        out = self._sq_norms(active, batch)
        return {
            p: (out[p] * factor2 if p in out else p.new_zeros((batch,)))
            for p in self.parameters
        }

    def clipped_sums(self, scales: dict[nn.Parameter, torch.Tensor]) -> dict[nn.Parameter, torch.Tensor]:
        """``{parameter: sum_i scales[parameter][i] * g_i}`` for each parameter in ``scales``.

        Book-keeping (one contraction of the scaled output gradients with the activations) for
        rule units; the weighted sum of materialised per-sample gradients for fallback units.
        Linear in ``g_i``, so a parameter used several times is the sum over its uses.
        """
        known = {id(p) for p in self.parameters}
        unknown = [p for p in scales if id(p) not in known]
        if unknown:
            raise KeyError(
                f"clipped_sums: {len(unknown)} parameter(s) in scales are not covered by any "
                f"unit (shapes {[tuple(p.shape) for p in unknown]})"
            )
        active = self._active_calls()
        batch = self._batch_size(active)
        for p, s in scales.items():
            if tuple(s.shape) != (batch,):
                raise ValueError(
                    f"clipped_sums: scales must have shape [B] = [{batch}], got {tuple(s.shape)} "
                    f"for a parameter of shape {tuple(p.shape)}"
                )
        factor = self._factor(batch)
        if factor != 1.0:
            # the loss-reduction factor goes into the [B] scales, not over every summed entry
            scales = {p: s * factor for p, s in scales.items()}
        return self._clipped_sums(active, batch, scales)

    def bookkeep(self, scales_for: Callable[[dict, int, float], tuple[dict, Any]]) -> tuple[dict, Any]:
        """One book-keeping pass (Bu et al. 2023): the squared norms, the scales, the clipped sums.

        ``scales_for(sq, batch, factor)`` gets ``sq = {parameter: [B]}``, the squared norms
        of the per-sample gradients *of the summed loss* divided by ``factor ** 2`` (``factor``
        is ``B`` for ``loss_reduction="mean"``, else 1: the gradients are those of the loss as
        given, so the norms the clipping reads are ``factor * sqrt(sq)``); a parameter
        without a gradient this round is absent. It returns ``(scales, extra)`` with
        ``scales = {parameter: [B]}`` that *already include* ``factor``. Returns
        ``({parameter: sum_i scales[parameter][i] * g_i}, extra)``, ``g_i`` the per-sample
        gradients as given (loss as given). The same as :meth:`per_sample_sq_norms` then
        :meth:`clipped_sums`, with the captures looked up once and no pass over the ``[B]``
        norms for the factor."""
        active = self._active_calls()
        batch = self._batch_size(active)
        scales, extra = scales_for(self._sq_norms(active, batch), batch, self._factor(batch))
        return self._clipped_sums(active, batch, scales), extra

    def _sq_norms(self, active: list[list[_Call]], batch: int) -> dict[nn.Parameter, torch.Tensor]:
        """``{parameter: [B]}`` squared per-sample norms of the parameters with a gradient, for
        the per-sample losses as the loss gives them (not multiplied by the factor)."""
        uses = self._uses(active)
        out: dict[nn.Parameter, torch.Tensor] = {}
        shared: dict[nn.Parameter, torch.Tensor] = {}  # summed per-sample grads, multi-use
        uses_of: dict[nn.Parameter, list] = {}  # multi-use parameter -> [(unit, call, name)]
        with torch.no_grad():
            for unit, calls in zip(self.units, active):
                if not calls:
                    continue
                single = [(n, p) for n, p in unit.params if uses[id(p)] == 1]
                multi = [(n, p) for n, p in unit.params if uses[id(p)] > 1]
                for call in calls:
                    grads = None
                    pieces = self._pieces(unit, call) if single else None
                    if pieces is not None:
                        if self.ghost == "always":
                            with _ghost_forced_on():
                                sq = _mha.sq_norms(unit.module, pieces, {n for n, _ in single})
                        else:
                            sq = _mha.sq_norms(unit.module, pieces, {n for n, _ in single})
                        for n, p in single:
                            if n in sq:
                                out[p] = sq[n]
                    elif single and unit.rule is not None and call.psg is None and not unit.rule.materialised and self.ghost != "never":
                        a, g = _rule_activation(call), _rule_backprop(unit, call)
                        kw = {"scratch": self._scratch.setdefault(id(call), {})} if unit.rule.scratch else {}
                        if self.ghost == "always":
                            with _ghost_forced_on():
                                sq = unit.rule.sq_norms(unit.module, a, g, **kw)
                        else:
                            sq = unit.rule.sq_norms(unit.module, a, g, **kw)
                        for n, p in single:
                            if n in sq:
                                out[p] = sq[n]
                    elif single:
                        grads = self._call_grads(unit, call)
                        for n, p in single:
                            if n in grads:
                                out[p] = _sq(grads[n])
                    for n, p in multi:
                        uses_of.setdefault(p, []).append((unit, call, n))
            for p, used in uses_of.items():
                sq = self._linear_uses_sq(used)  # ghost norm with the cross terms
                if sq is not None:
                    out[p] = sq
                    continue
                for unit, call, n in used:  # materialise the sum of the uses
                    grads = self._call_grads(unit, call)
                    if n in grads:
                        _accumulate(shared, p, grads[n])
            for p, g in shared.items():
                out[p] = _sq(g)
        return out

    def _clipped_sums(
        self, active: list[list[_Call]], batch: int, scales: dict[nn.Parameter, torch.Tensor]
    ) -> dict[nn.Parameter, torch.Tensor]:
        """:meth:`clipped_sums` with ``scales`` checked and already multiplied by the factor."""
        out: dict[nn.Parameter, torch.Tensor] = {}
        with torch.no_grad():
            for unit, calls in zip(self.units, active):
                if not calls:
                    continue
                wanted = [(n, p) for n, p in unit.params if p in scales]
                if not wanted:
                    continue
                for call in calls:
                    if unit.rule is not None and call.psg is None and not unit.rule.materialised:
                        a, g = _rule_activation(call), _rule_backprop(unit, call)
                        s = {
                            n: (scales[p] if p in scales else torch.zeros(batch, device=p.device, dtype=p.dtype))
                            for n, p in unit.params
                        }
                        kw = {"scratch": self._scratch.get(id(call))} if unit.rule.scratch else {}
                        res = unit.rule.clipped_sum(unit.module, a, g, s, **kw)
                    elif self._pieces(unit, call) is not None:
                        res = _mha.clipped_sums(unit.module, call.pieces, {n: scales[p] for n, p in wanted})
                    else:
                        grads = self._call_grads(unit, call)
                        res = {
                            n: torch.tensordot(scales[p].to(grads[n]), grads[n], dims=1)
                            for n, p in wanted
                            if n in grads
                        }
                    for n, p in wanted:
                        if n in res:
                            _accumulate(out, p, res[n])
            return {p: (out[p] if p in out else torch.zeros_like(p)) for p in scales}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _rnn_types() -> tuple[type, ...]:
    return (nn.RNN, nn.LSTM, nn.GRU)


class _Anchor(torch.autograd.Function):
    """Identity on ``x`` that makes it require grad through ``anchor`` (a 0-d leaf) and returns
    no gradient to either: the graph above a first layer whose weights skip autograd."""

    @staticmethod
    def forward(ctx, x, anchor):  # noqa: D102
        return x.detach()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return None, None


def _check_unit(unit: Unit) -> None:
    m = unit.module
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        raise ValueError(
            f"{unit.name or 'model'}: BatchNorm mixes the samples of a batch, so per-sample "
            "gradients are not defined. Fix: replace it with nn.GroupNorm."
        )
    if isinstance(m, nn.MultiheadAttention) and not m.batch_first:
        raise ValueError(
            f"{unit.name or 'model'}: nn.MultiheadAttention(batch_first=False) puts the batch "
            "on dim 1; per-sample gradients need it on dim 0. Fix: construct it with "
            "batch_first=True (and pass [B, L, E] tensors)."
        )


def _check_fallback_kwargs(unit: Unit, call: _Call) -> None:
    if isinstance(unit.module, nn.MultiheadAttention):
        for key in ("key_padding_mask",):
            if isinstance(call.kwargs.get(key), torch.Tensor):
                raise ValueError(
                    f"{unit.name or 'model'}: nn.MultiheadAttention got {key} as a keyword "
                    "argument; the per-sample fallback passes keyword arguments unbatched. "
                    "Fix: pass it positionally: attn(q, k, v, key_padding_mask)."
                )


def _rule_activation(call: _Call) -> torch.Tensor:
    if call.inputs:
        return call.inputs[0]
    return next(v for v in call.kwargs.values() if isinstance(v, torch.Tensor))


def _rule_backprop(unit: Unit, call: _Call) -> torch.Tensor:
    g = call.grads[0] if len(call.grads) == 1 else None
    if call.output is not _LEAF or g is None:
        raise RuntimeError(  # pragma: no cover - rule modules return one tensor
            f"{unit.name}: expected one output tensor with a gradient from a "
            f"{type(unit.module).__name__}"
        )
    return g


def _sq(x: torch.Tensor) -> torch.Tensor:
    # one pass, no [B, ...] temporary (x.pow(2) would allocate one)
    return torch.linalg.vector_norm(x.flatten(1), dim=1).square() if x.dim() > 1 else x.square()


def _accumulate(out: dict, p: nn.Parameter, value: torch.Tensor) -> None:
    if p in out:
        out[p] = out[p] + value
    else:
        out[p] = value
