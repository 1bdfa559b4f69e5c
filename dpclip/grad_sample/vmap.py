"""Per-sample gradients through ``torch.func``: whole models and the per-module fallback.

Two entry points:

* :func:`per_sample_grads_vmap` (``grad_sample_mode="vmap"``): the whole model is made
  functional with :func:`torch.func.functional_call` and ``vmap(grad(per-sample loss))`` runs
  over the batch. It works for any architecture whose forward can be vmapped.
* :func:`module_vjp_per_sample`: the fallback used inside backward hooks for a module that has
  no hand-written rule. Given the module's captured (batched) inputs and the gradient w.r.t. its
  output, it recomputes the module's forward for each sample and pulls the output gradient back
  to the module's parameters with ``vmap(vjp)``.

Recurrent modules (``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``) cannot be vmapped in torch 2.13; see
:func:`rnn_per_sample_grads` for the exact per-sample loop used for them instead.

Everything here is exact (no approximation): the only difference from a naive per-sample loop is
floating-point summation order.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vjp, vmap

__all__ = [
    "RandomnessError",
    "per_sample_grads_vmap",
    "module_vjp_per_sample",
    "rnn_per_sample_grads",
]

_RANDOMNESS_MODES = ("error", "different", "same")


class RandomnessError(RuntimeError):
    """A random operation (dropout, ...) ran where per-sample gradients cannot reproduce it."""


# --------------------------------------------------------------------------------------------
# small pytree helpers (tuples, lists and dicts of tensors; anything else is a constant leaf)
# --------------------------------------------------------------------------------------------


def _tree_map(fn: Callable[[Any], Any], tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # namedtuple
        return type(tree)(*(_tree_map(fn, t) for t in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_tree_map(fn, t) for t in tree)
    if isinstance(tree, Mapping):
        return {k: _tree_map(fn, v) for k, v in tree.items()}
    return tree


def _tensor_leaves(tree: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    _tree_map(lambda t: out.append(t) or t, tree)
    return out


def _in_dims(tree: Any, dim: int = 0) -> Any:
    """``vmap`` in_dims for ``tree``: ``dim`` for tensors, ``None`` for every other leaf."""
    if isinstance(tree, torch.Tensor):
        return dim
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_in_dims(t, dim) for t in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_in_dims(t, dim) for t in tree)
    if isinstance(tree, Mapping):
        return {k: _in_dims(v, dim) for k, v in tree.items()}
    return None


def _batch_size(tree: Any, dim: int = 0) -> int:
    leaves = _tensor_leaves(tree)
    if not leaves:
        raise ValueError("no batched tensor among the inputs: cannot tell the batch size")
    sizes = {t.shape[dim] for t in leaves}
    if len(sizes) != 1:
        raise ValueError(f"inputs disagree on the batch size (dim {dim}): {sorted(sizes)}")
    return sizes.pop()


def _trainable(module: nn.Module) -> dict[str, torch.Tensor]:
    # named_parameters() removes duplicates: a tied tensor appears once, under its first name.
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def _constants(module: nn.Module, diff_names) -> dict[str, torch.Tensor]:
    """Everything ``functional_call`` needs besides the differentiated parameters (detached)."""
    consts = {n: p.detach() for n, p in module.named_parameters() if n not in diff_names}
    consts.update({n: b for n, b in module.named_buffers()})
    return consts


def _random_modules(module: nn.Module) -> list[str]:
    """Names of sub-modules that draw random numbers in their current (train) mode."""
    found = []
    for name, m in module.named_modules():
        if not m.training:
            continue
        label = name or type(m).__name__
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            found.append(f"{label} ({m!r})")
        elif isinstance(m, nn.MultiheadAttention) and m.dropout > 0:
            found.append(f"{label} (MultiheadAttention with dropout={m.dropout})")
        elif isinstance(m, nn.RNNBase) and m.dropout > 0 and m.num_layers > 1:
            found.append(f"{label} ({type(m).__name__} with dropout={m.dropout})")
    return found


def _is_randomness_error(err: BaseException) -> bool:
    return "randomness" in str(err) and "vmap" in str(err)


_CALL_HOOK_ATTRS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
)


@contextlib.contextmanager
def _hooks_disabled(module: nn.Module):
    """Run ``module`` (and its sub-modules) without their forward / backward hooks.

    The per-module fallback recomputes a module's forward from inside that module's own backward
    hook: its hooks (and those of its children, e.g. the engine's activation capture) must not
    fire again, or they would overwrite captured state, recurse, and wrap tensors in an
    ``autograd.Function`` that functorch transforms cannot trace.
    """
    saved = []
    for m in module.modules():
        saved.append((m, {a: getattr(m, a) for a in _CALL_HOOK_ATTRS}, m._is_full_backward_hook))
        for a in _CALL_HOOK_ATTRS:
            setattr(m, a, OrderedDict())
        m._is_full_backward_hook = None
    try:
        yield
    finally:
        for m, attrs, full in saved:
            for a, v in attrs.items():
                setattr(m, a, v)
            m._is_full_backward_hook = full


# --------------------------------------------------------------------------------------------
# whole-model mode
# --------------------------------------------------------------------------------------------


def per_sample_grads_vmap(
    model: nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    inputs: Any,
    targets: Any,
    *,
    chunk_size: int | None = None,
    randomness: str = "error",
) -> dict[str, torch.Tensor]:
    """Per-sample gradients of the whole model with ``vmap(grad)`` (``grad_sample_mode="vmap"``).

    For each sample ``i`` the loss is ``loss_fn(model(x_i[None]), y_i[None])``, a batch of one;
    ``inputs`` and ``targets`` are tensors (or tuples / lists / dicts of tensors) whose first
    dimension is the batch. Returns ``{name: [B, *param.shape]}`` for every trainable parameter
    (``requires_grad``), keyed by ``model.named_parameters()`` names. Frozen parameters and
    buffers are passed through as constants. A tied parameter (one tensor registered under two
    names) appears once, under its first name, with the gradient of all its uses.

    ``chunk_size`` bounds memory (``vmap`` processes that many samples at a time).
    ``randomness`` is ``vmap``'s: with the default ``"error"`` a model that uses dropout in train
    mode is refused with :class:`RandomnessError`; ``"different"`` draws an independent mask per
    sample (what a per-sample loop does), ``"same"`` one mask shared by the batch.

    Models containing ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` cannot be vmapped in torch 2.13 (see
    :func:`rnn_per_sample_grads`); for them this function runs the exact per-sample loop instead.
    """
    if randomness not in _RANDOMNESS_MODES:
        raise ValueError(f"randomness must be one of {_RANDOMNESS_MODES}, got {randomness!r}")
    params = _trainable(model)
    batch = _batch_size(inputs)
    if batch == 0 or not params:
        return {n: p.new_zeros((batch, *p.shape)) for n, p in params.items()}
    if randomness == "error":
        random = _random_modules(model)
        if random:
            raise RandomnessError(
                "per_sample_grads_vmap: the model draws random numbers in train mode ("
                + ", ".join(random)
                + "), which vmap refuses with randomness='error'. Pass randomness='different' "
                "(an independent dropout mask per sample, like a per-sample loop) or 'same', "
                "or call model.eval()."
            )
    if any(isinstance(m, nn.RNNBase) for m in model.modules()):
        return _per_sample_grads_loop(model, loss_fn, inputs, targets, params)

    diff = {n: p.detach() for n, p in params.items()}
    consts = _constants(model, diff)

    def sample_loss(p, x, y):
        x1 = _tree_map(lambda t: t.unsqueeze(0), x)
        y1 = _tree_map(lambda t: t.unsqueeze(0), y)
        out = functional_call(model, (p, consts), (x1,) if not isinstance(x1, tuple) else x1)
        return loss_fn(out, y1)

    fn = vmap(
        grad(sample_loss),
        in_dims=(None, _in_dims(inputs), _in_dims(targets)),
        chunk_size=chunk_size,
        randomness=randomness,
    )
    try:
        grads = fn(diff, inputs, targets)
    except RuntimeError as err:
        if _is_randomness_error(err):
            raise RandomnessError(
                "per_sample_grads_vmap: the model ran a random operation under vmap with "
                f"randomness={randomness!r} ({err}). Pass randomness='different' or 'same', "
                "or call model.eval()."
            ) from err
        raise
    return {n: g.detach() for n, g in grads.items()}


def _per_sample_grads_loop(model, loss_fn, inputs, targets, params) -> dict[str, torch.Tensor]:
    """Exact per-sample loop over the whole model (used where vmap cannot run)."""
    batch = _batch_size(inputs)
    names = list(params)
    leaves = [params[n] for n in names]
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    with torch.enable_grad():
        for i in range(batch):
            x = _tree_map(lambda t: t[i : i + 1], inputs)
            y = _tree_map(lambda t: t[i : i + 1], targets)
            o = model(*x) if isinstance(x, tuple) else model(x)
            gs = torch.autograd.grad(loss_fn(o, y), leaves, allow_unused=True)
            for n, p, g in zip(names, leaves, gs):
                out[n].append(torch.zeros_like(p) if g is None else g.detach())
    return {n: torch.stack(gs) for n, gs in out.items()}


# --------------------------------------------------------------------------------------------
# per-module fallback
# --------------------------------------------------------------------------------------------


class _Slot:
    """Placeholder for the k-th tensor of a flattened ``grad_output``."""

    __slots__ = ("k",)

    def __init__(self, k: int):
        self.k = k


def _split(tree: Any, tensors: list[torch.Tensor]) -> Any:
    """Replace each tensor in ``tree`` by a :class:`_Slot` (``None`` stays ``None``)."""
    if isinstance(tree, torch.Tensor):
        tensors.append(tree)
        return _Slot(len(tensors) - 1)
    if isinstance(tree, (tuple, list)):
        return tuple(_split(t, tensors) for t in tree)
    if isinstance(tree, Mapping):
        return {k: _split(v, tensors) for k, v in tree.items()}
    if tree is None:
        return None
    raise TypeError(
        f"grad_output may hold tensors, None, tuples, lists and dicts; got {type(tree)}"
    )


def _pair(out: Any, cot: Any, tensors: list[torch.Tensor], acc: list) -> None:
    """Pair each floating output tensor with its cotangent (``None`` = zeros).

    ``cot`` mirrors ``out`` (tuple for tuple, dict for dict); ``None`` anywhere stands for a zero
    gradient of that whole sub-tree. A full backward hook gives ``grad_output`` as a tuple even
    for a single-tensor output, so a 1-tuple matched against a tensor is unwrapped; a single
    tensor matched against a tuple output is the gradient of its first element.
    """
    if isinstance(out, torch.Tensor):
        while isinstance(cot, tuple) and len(cot) == 1:
            cot = cot[0]
        if isinstance(cot, tuple):
            raise ValueError("grad_output has more entries than the module has outputs")
        if out.is_floating_point() or out.is_complex():
            acc.append((out, None if cot is None else tensors[cot.k]))
        return
    if isinstance(out, (tuple, list)):
        if isinstance(cot, _Slot):
            cot = (cot,)
        if cot is None:
            cot = (None,) * len(out)
        if len(cot) > len(out):
            raise ValueError(
                f"grad_output has {len(cot)} entries but the module returned {len(out)} outputs"
            )
        cot = tuple(cot) + (None,) * (len(out) - len(cot))
        for o, c in zip(out, cot):
            _pair(o, c, tensors, acc)
        return
    if isinstance(out, Mapping):
        cot = cot or {}
        for k, o in out.items():
            _pair(o, cot.get(k), tensors, acc)
    # other leaves (None, ints, ...) carry no gradient


def _resolve_params(module, params):
    if params is None:
        params = _trainable(module)
    else:
        known = dict(module.named_parameters())
        unknown = [n for n in params if n not in known]
        if unknown:
            raise KeyError(f"not parameters of {type(module).__name__}: {unknown}")
    return {n: p.detach() for n, p in params.items()}


def module_vjp_per_sample(
    module: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    grad_output: Any,
    *,
    params: dict[str, torch.Tensor] | None = None,
    kwargs: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-sample gradients of ``module``'s own parameters from its captured inputs and output grad.

    ``inputs`` are the positional arguments of the module's forward as captured by a forward hook
    (every tensor batched on dim 0; non-tensor entries such as ``None`` are passed unchanged);
    ``kwargs`` (e.g. from ``register_forward_hook(..., with_kwargs=True)``) are passed unchanged
    to every sample. ``grad_output`` is the gradient w.r.t. the module's output as a full backward
    hook gives it: a tensor, or a tuple mirroring a tuple output in which ``None`` means zeros
    (e.g. ``(grad_out, None)`` for ``nn.LSTM``).

    ``params`` (names relative to the module) selects the parameters to differentiate and the
    values to use; by default every trainable parameter of the module, sub-modules included (a
    composite custom module owns its children's parameters here). Other parameters and buffers
    are constants. Returns ``{name: [B, *shape]}``.

    Implementation: ``vmap`` over samples of ``vjp(functional_call(module, params, x_i[None]))``
    with cotangent ``grad_output_i[None]``. Recurrent modules go to
    :func:`dpclip.grad_sample.rnn.rnn_per_sample_grads_batched` (which falls back to the loop
    :func:`rnn_per_sample_grads` for what it does not support).

    The forward is *recomputed*, so a module that draws random numbers (dropout inside it, in
    train mode) cannot be handled: its mask would differ from the one of the real forward pass.
    That raises :class:`RandomnessError`.
    """
    if isinstance(module, nn.RNNBase):
        # batched recomputation (exact); it hands what it does not support to the loop below
        from .rnn import rnn_per_sample_grads_batched

        return rnn_per_sample_grads_batched(
            module, inputs, grad_output, params=params, kwargs=kwargs
        )
    if not isinstance(inputs, tuple):
        inputs = (inputs,)
    # detached: the captured tensors belong to the outer graph (and, under a full backward hook,
    # come out of an autograd.Function that functorch transforms cannot trace through)
    inputs = _tree_map(torch.Tensor.detach, inputs)
    grad_output = _tree_map(torch.Tensor.detach, grad_output)
    kwargs = dict(kwargs or {})
    diff = _resolve_params(module, params)
    batch = _batch_size(inputs)
    if batch == 0 or not diff:
        return {n: p.new_zeros((batch, *p.shape)) for n, p in diff.items()}
    consts = _constants(module, diff)
    tensors: list[torch.Tensor] = []
    template = _split(grad_output, tensors)
    if tensors and {t.shape[0] for t in tensors} != {batch}:
        raise ValueError("grad_output and inputs disagree on the batch size (dim 0)")

    def one_sample(x, gos):
        x1 = _tree_map(lambda t: t.unsqueeze(0), x)
        gos1 = [g.unsqueeze(0) for g in gos]
        cots: list = []

        def f(p):
            out = functional_call(module, (p, consts), x1, kwargs)
            pairs: list = []
            _pair(out, template, gos1, pairs)
            cots[:] = [c for _, c in pairs]
            return tuple(o for o, _ in pairs)

        outs, pull = vjp(f, diff)
        return pull(tuple(torch.zeros_like(o) if c is None else c for o, c in zip(outs, cots)))[0]

    try:
        with _hooks_disabled(module):
            grads = vmap(one_sample, in_dims=(_in_dims(inputs), 0), randomness="error")(
                inputs, tensors
            )
    except RuntimeError as err:
        if _is_randomness_error(err):
            raise RandomnessError(
                f"module_vjp_per_sample: {type(module).__name__} draws random numbers in its "
                "forward (dropout in train mode?). The fallback recomputes the forward, which "
                "would draw a different mask than the real pass: move the dropout outside this "
                "module, give it a per-sample rule, or use model.eval()."
            ) from err
        raise
    return {n: g.detach() for n, g in grads.items()}


# --------------------------------------------------------------------------------------------
# recurrent modules
# --------------------------------------------------------------------------------------------


def rnn_per_sample_grads(
    module: nn.RNNBase,
    inputs: tuple[Any, ...],
    grad_output: Any,
    *,
    params: dict[str, torch.Tensor] | None = None,
    kwargs: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Exact per-sample gradients of an ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` by a per-sample loop.

    Why a loop: in torch 2.13 (CPU) these modules cannot run under ``vmap``. The plain forward
    fails with ``RuntimeError: Batching rule not implemented for aten::gru.input. We could not
    generate a fallback.`` (likewise ``aten::lstm.input`` / ``aten::rnn_tanh.input``), and under
    ``vmap(grad(...))`` or ``vmap(vjp(...))`` -- the decomposed path -- it fails with
    ``RuntimeError: output with shape [1, 16] doesn't match the broadcast shape [5, 1, 16]``
    (LSTM, hidden 4, batch 5; ``[1, 4]`` vs ``[5, 1, 4]`` for GRU / RNN), for ``batch_first`` True
    and False alike. So each sample's forward is recomputed and ``torch.autograd.grad`` pulls its
    output gradient back: B small forward/backward passes, exact, slower than a vectorised rule.

    Same contract as :func:`module_vjp_per_sample`; batch dimensions follow the module: inputs
    and outputs on dim 0 if ``batch_first`` else dim 1, the hidden states ``h_0`` / ``(h_0, c_0)``
    / ``h_n`` / ``(h_n, c_n)`` always on dim 1. ``PackedSequence`` inputs are not supported.
    Dropout between layers (train mode, ``num_layers > 1``) cannot be recomputed exactly and
    raises :class:`RandomnessError`.
    """
    if not isinstance(inputs, tuple):
        inputs = (inputs,)
    inputs = _tree_map(torch.Tensor.detach, inputs)
    grad_output = _tree_map(torch.Tensor.detach, grad_output)
    if isinstance(inputs[0], nn.utils.rnn.PackedSequence):
        raise TypeError(
            "rnn_per_sample_grads: PackedSequence inputs are not supported; pass padded "
            "tensors (and mask the loss) instead"
        )
    if module.training and module.dropout > 0 and module.num_layers > 1:
        raise RandomnessError(
            f"rnn_per_sample_grads: {type(module).__name__} uses dropout={module.dropout} "
            "between layers in train mode; recomputing its forward would draw other masks. "
            "Set dropout=0 (use nn.Dropout between separate RNN modules) or call eval()."
        )
    x = inputs[0]
    if x.dim() != 3:
        raise ValueError("rnn_per_sample_grads needs batched 3-D input (unbatched 2-D given)")
    xdim = 0 if module.batch_first else 1
    batch = x.shape[xdim]
    diff = _resolve_params(module, params)
    if batch == 0 or not diff:
        return {n: p.new_zeros((batch, *p.shape)) for n, p in diff.items()}
    consts = _constants(module, diff)
    kwargs = dict(kwargs or {})
    names = list(diff)
    tensors: list[torch.Tensor] = []
    template = _split(grad_output, tensors)

    # dims: inputs[0] / output on xdim, hidden states on dim 1
    in_dims = (xdim,) + tuple(_in_dims(a, 1) for a in inputs[1:])
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}

    def narrow(tree, dims, i):
        if isinstance(dims, int):
            return tree.narrow(dims, i, 1)
        if dims is None:
            return tree
        return type(tree)(narrow(t, d, i) for t, d in zip(tree, dims))

    # cuDNN's RNN backward refuses eval mode ("can only be called in training mode"): the
    # native kernels give the same function there.
    no_cudnn = x.is_cuda and not module.training
    with torch.enable_grad(), _hooks_disabled(module), _cudnn_disabled(no_cudnn):
        for i in range(batch):
            leaves = {n: p.clone().requires_grad_(True) for n, p in diff.items()}
            xi = narrow(inputs, in_dims, i)
            o = functional_call(module, (leaves, consts), xi, kwargs)
            # output: (output [xdim], h_n [dim 1]) or (output, (h_n, c_n))
            slices = [
                _narrow_rnn_cot(t, k, template, xdim, i) for k, t in enumerate(tensors)
            ]
            pairs: list = []
            _pair(o, template, slices, pairs)
            outs = [t for t, c in pairs if c is not None]
            cots = [c for _, c in pairs if c is not None]
            if outs:
                gs = torch.autograd.grad(outs, [leaves[n] for n in names], cots,
                                         allow_unused=True)
            else:
                gs = [None] * len(names)
            for n, g in zip(names, gs):
                out[n].append(torch.zeros_like(diff[n]) if g is None else g.detach())
    return {n: torch.stack(gs) for n, gs in out.items()}


def _narrow_rnn_cot(t: torch.Tensor, k: int, template: Any, xdim: int, i: int) -> torch.Tensor:
    """Sample ``i`` of the k-th grad_output tensor: the first output is on ``xdim``, states on 1."""
    first = _first_slot(template)
    dim = xdim if (first is not None and first.k == k) else 1
    return t.narrow(dim, i, 1)


def _first_slot(template: Any) -> _Slot | None:
    if isinstance(template, _Slot):
        return template
    if isinstance(template, tuple) and template:
        return template[0] if isinstance(template[0], _Slot) else None
    return None


@contextlib.contextmanager
def _cudnn_disabled(disable: bool):
    """Turn cuDNN off (only ``enabled``; other cuDNN settings untouched) when ``disable``."""
    if not disable:
        yield
        return
    prev = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = False
    try:
        yield
    finally:
        torch.backends.cudnn.enabled = prev
