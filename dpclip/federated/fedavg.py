"""DP-FedAvg simulation in one process (McMahan, Ramage, Talwar, Zhang 2018).

Per round ``t``:

1. every client joins independently with probability ``q = clients_per_round / K``
   (Poisson sampling: the number of clients varies);
2. each joining client starts from the global model and runs ``local_epochs`` epochs of
   minibatch SGD on its own data (shuffled, batches of ``local_batch_size``, the last one
   smaller), or, with :class:`LocalDP`, DP-SGD through :func:`dpclip.make_private`;
3. its model delta is clipped (flat or per layer), the deltas are summed, Gaussian noise is
   added once and the sum is divided by the expected number of clients ``q K``
   (:func:`dpclip.federated.aggregate.dp_aggregate`);
4. the server optimizer (SGD with momentum, or Adam) takes the negated mean delta as its
   gradient;
5. the clip controller moves the thresholds from privatised statistics, and the accountant
   records one Poisson-subsampled Gaussian step ``(sigma, q)``.

Clients are trained together with ``torch.func`` where the model allows (``vmap`` over the
round's clients of a functional local-SGD loop: stacked client parameters, one batched
forward/backward per local step), else one after another with the same functional loop.
Both paths use the same batch plan, so they give the same deltas up to float rounding.

The result reports the user-level epsilon (one client = one unit) and, with local DP-SGD,
the sample-level epsilon of the clients' DP-SGD composed over all rounds (a client may join
every round; the user-level guarantee covers every sample as well, so the sample-level
epsilon is the smaller of the two).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from .aggregate import RoundRelease, check_controller, dp_aggregate

__all__ = ["LocalDP", "FedAvgConfig", "FederatedResult", "simulate", "layer_groups", "initial_clip",
           "vmap_problem", "local_batch_plan", "sample_clients"]

CLIENT_PATHS = ("auto", "vmap", "loop")
SERVER_OPTIMIZERS = ("sgd", "adam")
CLIPPINGS = ("flat", "per_layer")


def _int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be a whole number >= {low}; got {value!r}")
    return value


def _float(name: str, value: object, *, low: float = 0.0, strict: bool = True, high: float = math.inf,
           allow_inf: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number; got {value!r}")
    x = float(value)
    ok = (x > low if strict else x >= low) and (x < high or (allow_inf and x == math.inf)) and not math.isnan(x)
    if not ok:
        rel = ">" if strict else ">="
        raise ValueError(f"{name} must be {rel} {low:g}" + (f" and < {high:g}" if high < math.inf else "")
                         + f"; got {value!r}")
    return x


@dataclass(frozen=True)
class LocalDP:
    """Sample-level DP-SGD inside each client (via :func:`dpclip.make_private`).

    Attributes:
        noise_multiplier: the clients' DP-SGD noise multiplier.
        max_grad_norm: the per-sample clipping bound.
        batch_size: expected Poisson batch size on a client (its sample rate is
            ``min(batch_size, n_k) / n_k``); ``None`` uses the config's ``local_batch_size``.
    """

    noise_multiplier: float
    max_grad_norm: float
    batch_size: int | None = None

    def __post_init__(self) -> None:
        _float("local noise_multiplier", self.noise_multiplier, strict=False)
        _float("local max_grad_norm", self.max_grad_norm)
        if self.batch_size is not None:
            _int("local batch_size", self.batch_size, 1)


@dataclass(frozen=True)
class FedAvgConfig:
    """Settings of a DP-FedAvg run (see the module docstring for the algorithm).

    Attributes:
        rounds: number of rounds.
        clients_per_round: the EXPECTED number of clients per round; ``q = clients_per_round / K``.
        local_epochs, local_batch_size, local_lr: the clients' SGD.
        noise_multiplier: ``sigma`` per round (for the aggregate and the clip statistics together).
        clip: the initial threshold(s): a float (per-layer: ``clip / sqrt(layers)`` per layer, so
            the sensitivity is ``clip``) or one value per layer.
        clipping: ``"flat"`` or ``"per_layer"`` (layers: modules with their own parameters).
        controller: a clip controller from :mod:`dpclip.controllers`; ``None`` is ``Fixed()``.
        server_optimizer: ``"sgd"`` (with ``server_momentum``) or ``"adam"`` (``server_momentum``
            is beta1).
        server_lr: the server learning rate (1.0 with SGD and no momentum applies the mean delta).
        local_dp: sample-level DP-SGD inside clients, or ``None``.
        client_path: ``"auto"`` (vmap when :func:`vmap_problem` finds none), ``"vmap"`` or ``"loop"``.
        accountant: ``"prv"`` or ``"rdp"``.
        delta: the delta at which epsilon is reported.
        secure_mode: draw the server's (and local DP-SGD's) noise with
            :class:`dpclip.noise.SecureGaussianNoise`.
        eval_every: evaluate the global model every this many rounds (0: only at the end).
    """

    rounds: int
    clients_per_round: float
    local_epochs: int = 1
    local_batch_size: int = 32
    local_lr: float = 0.1
    noise_multiplier: float = 0.0
    clip: float | tuple[float, ...] = 1.0
    clipping: str = "flat"
    controller: Any = None
    server_optimizer: str = "sgd"
    server_lr: float = 1.0
    server_momentum: float = 0.0
    local_dp: LocalDP | None = None
    client_path: str = "auto"
    accountant: str = "prv"
    delta: float = 1e-5
    secure_mode: bool = False
    eval_every: int = 0

    def __post_init__(self) -> None:
        _int("rounds", self.rounds, 0)
        _float("clients_per_round", self.clients_per_round)
        _int("local_epochs", self.local_epochs, 1)
        _int("local_batch_size", self.local_batch_size, 1)
        _float("local_lr", self.local_lr, strict=False)
        _float("noise_multiplier", self.noise_multiplier, strict=False)
        if self.clipping not in CLIPPINGS:
            raise ValueError(f"clipping must be one of {CLIPPINGS}; got {self.clipping!r}")
        if self.server_optimizer not in SERVER_OPTIMIZERS:
            raise ValueError(f"server_optimizer must be one of {SERVER_OPTIMIZERS}; got {self.server_optimizer!r}")
        _float("server_lr", self.server_lr)
        _float("server_momentum", self.server_momentum, strict=False, high=1.0)
        if self.client_path not in CLIENT_PATHS:
            raise ValueError(f"client_path must be one of {CLIENT_PATHS}; got {self.client_path!r}")
        if self.accountant not in ("prv", "rdp"):
            raise ValueError(f"accountant must be 'prv' or 'rdp'; got {self.accountant!r}")
        _float("delta", self.delta, high=1.0)
        _int("eval_every", self.eval_every, 0)
        if self.local_dp is not None and not isinstance(self.local_dp, LocalDP):
            raise TypeError(f"local_dp must be a LocalDP or None; got {type(self.local_dp).__name__}")
        if self.controller is not None:
            check_controller(self.controller)


@dataclass(frozen=True)
class FederatedResult:
    """The outcome of :func:`simulate` (every field is JSON-friendly except ``state_dict``)."""

    epsilon: float
    delta: float
    sample_epsilon: float | None
    rounds: int
    clients: int
    sample_rate: float
    expected_clients_per_round: float
    noise_multiplier: float
    gradient_noise_multiplier: float
    test_accuracy: float | None
    test_loss: float | None
    clip_history: tuple[tuple[float, ...], ...]
    accuracy_history: tuple[tuple[int, float], ...]
    participants: tuple[int, ...]
    accountant: str
    accountant_history: tuple[tuple[float, float, int], ...]
    sample_accountant_history: tuple[tuple[float, float, int], ...] | None
    client_path: str
    client_path_reason: str
    rounds_per_second: float
    train_seconds: float
    state_dict: dict[str, torch.Tensor] = field(repr=False, compare=False)


# -- model structure ---------------------------------------------------------------------------
def layer_groups(model: nn.Module) -> tuple[tuple[str, ...], ...]:
    """The trainable parameters' names grouped by their module (one group per layer), in order."""
    groups: dict[str, list[str]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(name.rpartition(".")[0], []).append(name)
    return tuple(tuple(v) for v in groups.values())


def initial_clip(clip: float | Sequence[float], clipping: str, layers: int) -> tuple[float, ...]:
    """The starting thresholds: flat ``(C,)``; per-layer ``C / sqrt(L)`` each, or the ``L`` values given."""
    if isinstance(clip, (int, float)) and not isinstance(clip, bool):
        c = _float("clip", clip, allow_inf=True)
        return (c,) if clipping == "flat" else (c / math.sqrt(layers),) * layers
    values = tuple(_float(f"clip[{i}]", v, allow_inf=True) for i, v in enumerate(clip))
    want = 1 if clipping == "flat" else layers
    if len(values) != want:
        raise ValueError(f"{len(values)} clip values for {clipping} clipping of a model with {layers} layers; "
                         f"give {want} (or one float)")
    return values


def vmap_problem(model: nn.Module) -> str | None:
    """Why the clients cannot be vmapped (random or stateful layers), or ``None`` if they can."""
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return f"{name or 'model'} is {type(m).__name__} (running statistics are updated in place)"
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return f"{name or 'model'} is {type(m).__name__} (random masks need a per-client generator)"
    return None


def _model_problems(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f"{name or 'model'} is {type(m).__name__}: its running statistics are computed from client data and "
                "would be released with the model without clipping or noise. Fix: use GroupNorm (or LayerNorm)"
            )
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no trainable parameters")


# -- randomness: which clients, which batches ---------------------------------------------------
def sample_clients(num_clients: int, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Poisson sampling: the indices of the clients drawn this round (each independently with ``sample_rate``)."""
    return (torch.rand(num_clients, generator=generator, dtype=torch.float64) < sample_rate).nonzero().squeeze(1)


def local_batch_plan(
    size: int, epochs: int, batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(positions [S, B] int64, mask [S, B] float)``: ``epochs`` shuffled passes in batches of ``batch_size``.

    ``S = epochs * ceil(size / batch_size)``; padding positions are 0 with mask 0.
    """
    steps = -(-size // batch_size)
    pos = torch.zeros(epochs * steps, batch_size, dtype=torch.int64)
    mask = torch.zeros(epochs * steps, batch_size)
    for e in range(epochs):
        perm = torch.randperm(size, generator=generator)
        flat_pos = pos[e * steps : (e + 1) * steps].view(-1)
        flat_mask = mask[e * steps : (e + 1) * steps].view(-1)
        flat_pos[:size] = perm
        flat_mask[:size] = 1.0
    return pos, mask


# -- local training -----------------------------------------------------------------------------
class _LocalSGD:
    """Masked minibatch SGD on the mean cross-entropy, one client at a time or vmapped over clients.

    ``step(params, xb, yb, m) -> params - lr * grad`` where the loss is
    ``sum_i m_i CE_i / max(1, sum_i m_i)`` (a mask of 0 drops padding positions).
    """

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, buffers: dict, lr: float) -> None:
        self.x, self.y, self.lr = x, y, lr

        def loss(params: dict, xb: torch.Tensor, yb: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            logits = functional_call(model, (params, buffers), (xb,))
            per = F.cross_entropy(logits, yb, reduction="none")
            return (per * m).sum() / m.sum().clamp_min(1.0)

        def step(params: dict, xb: torch.Tensor, yb: torch.Tensor, m: torch.Tensor) -> dict:
            g = grad(loss)(params, xb, yb, m)
            return {k: params[k] - lr * g[k] for k in params}

        self.step = step
        self.batched_step = vmap(step)  # params, batches and masks all stacked over clients

    def one(self, params: dict, index: torch.Tensor, mask: torch.Tensor) -> dict:
        """One client's delta after the steps ``index [S, B]`` (positions into x) with ``mask [S, B]``."""
        start = params
        for s in range(index.shape[0]):
            params = self.step(params, self.x[index[s]], self.y[index[s]], mask[s])
        return {k: params[k] - start[k] for k in params}

    def many(self, params: dict, plans: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict:
        """``{name: [U, ...]}`` deltas of U clients trained together: at local step ``s`` the clients
        that still have a step ``s`` take it in one vmapped call on their stacked parameters."""
        u = len(plans)
        steps = torch.tensor([index.shape[0] for index, _ in plans])
        stacked = {k: v.unsqueeze(0).expand(u, *v.shape).clone() for k, v in params.items()}
        for s in range(int(steps.max())):
            active = (steps > s).nonzero().squeeze(1)
            index = torch.stack([plans[i][0][s] for i in active.tolist()])
            mask = torch.stack([plans[i][1][s] for i in active.tolist()])
            if active.numel() == u:
                stacked = self.batched_step(stacked, self.x[index], self.y[index], mask)
            else:
                new = self.batched_step({k: v[active] for k, v in stacked.items()}, self.x[index], self.y[index],
                                        mask)
                for k in stacked:
                    stacked[k][active] = new[k]
        return {k: stacked[k] - params[k] for k in params}


def _local_dp_delta(
    model: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
    config: FedAvgConfig, generator: torch.Generator | None,
) -> tuple[dict[str, torch.Tensor], list[tuple[float, float, int]]]:
    """DP-SGD on one client through :func:`dpclip.make_private`; ``(delta, the engine's accountant history)``."""
    from torch.utils.data import DataLoader, TensorDataset

    from ..privacy_engine import PrivacyEngine

    local = config.local_dp
    assert local is not None
    module = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(params[name])
    module.train()
    optimizer = torch.optim.SGD(module.parameters(), lr=config.local_lr)
    batch = min(local.batch_size or config.local_batch_size, len(y))
    loader = DataLoader(TensorDataset(x, y), batch_size=batch)
    engine = PrivacyEngine(accountant=config.accountant, secure_mode=config.secure_mode)
    module, optimizer, loader = engine.make_private(
        module=module, optimizer=optimizer, data_loader=loader, noise_multiplier=local.noise_multiplier,
        max_grad_norm=local.max_grad_norm, generator=None if config.secure_mode else generator,
    )
    for _ in range(config.local_epochs):
        for xb, yb in loader:
            if len(yb) > 0:
                F.cross_entropy(module(xb), yb).backward()
            optimizer.step()  # an empty Poisson batch still adds noise and an accounting step
            optimizer.zero_grad(set_to_none=True)
    delta = {name: p.detach() - params[name] for name, p in module.named_parameters() if name in params}
    return delta, [tuple(h) for h in engine.accountant.history]


def _local_dp_plan(size: int, config: FedAvgConfig) -> tuple[float, float, int]:
    """What one client's DP-SGD records per round: ``(sigma, sample rate, steps)``."""
    local = config.local_dp
    assert local is not None
    batch = min(local.batch_size or config.local_batch_size, size)
    return (float(local.noise_multiplier), batch / size, config.local_epochs * (-(-size // batch)))


# -- evaluation ---------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
             batch_size: int = 2048) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy)`` of the model with ``params`` on ``(x, y)``."""
    if len(y) == 0:
        return math.nan, math.nan
    buffers = dict(model.named_buffers())
    was = model.training
    model.eval()
    loss, correct = 0.0, 0
    try:
        for i in range(0, len(y), batch_size):
            logits = functional_call(model, (dict(params), buffers), (x[i : i + batch_size],))
            loss += float(F.cross_entropy(logits, y[i : i + batch_size], reduction="sum"))
            correct += int((logits.argmax(1) == y[i : i + batch_size]).sum())
    finally:
        model.train(was)
    return loss / len(y), correct / len(y)


def _epsilon(name: str, history: Sequence[tuple[float, float, int]], delta: float) -> float:
    from accountants import make_accountant

    acc = make_accountant(name)
    for h in history:
        acc.step(*h)
    return float(acc.get_epsilon(delta))


# -- the simulation -----------------------------------------------------------------------------
def simulate(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    parts: Sequence[torch.Tensor],
    config: FedAvgConfig,
    generator: torch.Generator,
    *,
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
    on_round: Callable[[int, dict[str, Any]], None] | None = None,
) -> FederatedResult:
    """Run DP-FedAvg on ``model`` (its parameters are the initial global model; not modified).

    Args:
        model: a module without BatchNorm; its trainable parameters are federated.
        train: ``(x [N, ...], y [N])`` the training examples of all clients.
        parts: one index tensor into ``train`` per client (:mod:`dpclip.federated.partitions`).
        config: :class:`FedAvgConfig`.
        generator: drives the client sampling, the local batches and (through a generator
            seeded from it) the noise.
        test: ``(x, y)`` to evaluate the global model on.
        on_round: called after each round with ``(round, info)``; ``info`` has ``clip``,
            ``participants`` and, on evaluation rounds, ``test_accuracy``.
    """
    from accountants import make_accountant

    if not isinstance(config, FedAvgConfig):
        raise TypeError(f"config must be a FedAvgConfig; got {type(config).__name__}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator; got {type(generator).__name__}. "
                        "Fix: pass torch.Generator().manual_seed(seed)")
    _model_problems(model)
    x, y = train
    num_clients = len(parts)
    if num_clients == 0:
        raise ValueError("parts is empty: give one index tensor per client")
    if config.clients_per_round > num_clients:
        raise ValueError(f"clients_per_round={config.clients_per_round:g} exceeds the {num_clients} clients; "
                         f"use at most {num_clients}")
    sizes = [int(p.numel()) for p in parts]
    q = config.clients_per_round / num_clients
    expected = q * num_clients
    groups = layer_groups(model)
    names = [k for g in groups for k in g]
    clip = initial_clip(config.clip, config.clipping, len(groups))
    agg_groups = groups if config.clipping == "per_layer" else (tuple(names),)
    # a copy: some controllers keep state (PrivateAutoClip's histogram, PrivateZClip's averages),
    # and a config reused for a second run must start from the same controller
    controller = copy.deepcopy(config.controller)
    if controller is None:
        from ..controllers import Fixed

        controller = Fixed()

    problem = vmap_problem(model)
    if config.local_dp is not None:
        path, reason = "loop", "local DP-SGD runs each client through make_private"
    elif config.client_path == "loop":
        path, reason = "loop", "asked for"
    elif problem is None:
        path, reason = "vmap", "torch.func vmap over the round's clients"
    elif config.client_path == "vmap":
        raise ValueError(f"client_path='vmap' is not possible: {problem}. Fix: use client_path='loop' or 'auto'")
    else:
        path, reason = "loop", problem

    noise_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    noise_generator = torch.Generator().manual_seed(noise_seed)
    params = {k: v.detach().clone() for k, v in model.named_parameters() if k in names}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    server_params = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    if config.server_optimizer == "sgd":
        opt = torch.optim.SGD(list(server_params.values()), lr=config.server_lr, momentum=config.server_momentum)
    else:
        opt = torch.optim.Adam(list(server_params.values()), lr=config.server_lr,
                               betas=(config.server_momentum, 0.999))
    local_sgd = _LocalSGD(model, x, y, buffers, config.local_lr)
    accountant = make_accountant(config.accountant)
    local_plan = {}
    if config.local_dp is not None:
        local_plan = {k: _local_dp_plan(n, config) for k, n in enumerate(sizes) if n > 0}

    clip_history: list[tuple[float, ...]] = []
    accuracy_history: list[tuple[int, float]] = []
    participants: list[int] = []
    sigma_grad = config.noise_multiplier
    # a controller in the noise-std regime (MultiObjective(regime="noise_std")) fixes the noise
    # std at its initial value; each round's noise multiplier is then std / S_t
    fixed_std = None
    if getattr(controller, "keeps_noise_std", False):
        from .aggregate import clipper_for

        fixed_std = config.noise_multiplier * clipper_for(clip).sensitivity
    train_seconds = 0.0
    was_training = model.training
    model.train()
    try:
        for rnd in range(1, config.rounds + 1):
            t0 = time.perf_counter()
            chosen = [k for k in sample_clients(num_clients, q, generator).tolist() if sizes[k] > 0]
            current = {k: v.detach() for k, v in server_params.items()}
            deltas = _client_deltas(
                path, chosen, parts, sizes, current, config, generator, local_sgd, model, x, y,
                local_plan,
            )
            release: RoundRelease = dp_aggregate(
                deltas, clip, noise_multiplier=config.noise_multiplier, expected_clients=expected,
                generator=noise_generator, controller=controller, groups=agg_groups, secure_mode=config.secure_mode,
                fixed_noise_std=fixed_std,
            )
            opt.zero_grad(set_to_none=True)
            for k, p in server_params.items():
                p.grad = -release.update[k].to(p.dtype)
            opt.step()
            accountant.step(noise_multiplier=release.noise_multiplier, sample_rate=q)
            sigma_grad = release.gradient_noise_multiplier
            clip_history.append(release.clip)
            participants.append(len(chosen))
            clip = release.next_clip
            train_seconds += time.perf_counter() - t0
            info: dict[str, Any] = {"clip": release.clip, "participants": len(chosen)}
            if test is not None and config.eval_every and rnd % config.eval_every == 0 and rnd < config.rounds:
                acc = evaluate(model, server_params, *test)[1]
                accuracy_history.append((rnd, acc))
                info["test_accuracy"] = acc
            if on_round is not None:
                on_round(rnd, info)
    finally:
        model.train(was_training)

    test_loss = test_accuracy = None
    if test is not None:
        test_loss, test_accuracy = evaluate(model, server_params, *test)
        accuracy_history.append((config.rounds, test_accuracy))
    epsilon = float(accountant.get_epsilon(config.delta)) if config.rounds else 0.0
    sample_epsilon = None
    sample_history = None
    if config.local_dp is not None:
        # every client may join every round: its DP-SGD history repeated `rounds` times; the
        # guarantee for all samples is the worst client's (distinct histories computed once)
        per_client = {(s, qk, n * config.rounds) for s, qk, n in local_plan.values() if config.rounds}
        eps = {h: _epsilon(config.accountant, [h], config.delta) for h in per_client}
        worst = max(eps, key=eps.__getitem__) if eps else None
        sample_history = (worst,) if worst is not None else ()
        sample_epsilon = eps[worst] if worst is not None else 0.0
    return FederatedResult(
        epsilon=epsilon,
        delta=config.delta,
        sample_epsilon=sample_epsilon,
        rounds=config.rounds,
        clients=num_clients,
        sample_rate=q,
        expected_clients_per_round=expected,
        noise_multiplier=config.noise_multiplier,
        gradient_noise_multiplier=float(sigma_grad),
        test_accuracy=test_accuracy,
        test_loss=test_loss,
        clip_history=tuple(clip_history),
        accuracy_history=tuple(accuracy_history),
        participants=tuple(participants),
        accountant=config.accountant,
        accountant_history=tuple(tuple(h) for h in accountant.history),
        sample_accountant_history=sample_history,
        client_path=path,
        client_path_reason=reason,
        rounds_per_second=config.rounds / train_seconds if train_seconds > 0 else math.inf,
        train_seconds=train_seconds,
        state_dict={k: v.detach().clone() for k, v in server_params.items()},
    )


def _client_deltas(
    path: str, chosen: list[int], parts: Sequence[torch.Tensor], sizes: list[int],
    params: dict[str, torch.Tensor], config: FedAvgConfig, generator: torch.Generator,
    local_sgd: _LocalSGD, model: nn.Module, x: torch.Tensor, y: torch.Tensor,
    local_plan: Mapping[int, tuple[float, float, int]],
) -> dict[str, torch.Tensor]:
    """``{name: [U, ...]}``: the round's client deltas, in the order of ``chosen``."""
    empty = {k: v.new_zeros((0, *v.shape)) for k, v in params.items()}
    if not chosen:
        return empty
    if config.local_dp is not None:
        rows = []
        for k in chosen:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            delta, history = _local_dp_delta(
                model, params, x[parts[k]], y[parts[k]], config, torch.Generator().manual_seed(seed))
            if len(history) != 1 or tuple(history[0]) != local_plan[k]:
                raise RuntimeError(f"client {k}: make_private recorded {history}, expected [{local_plan[k]}]; "
                                   "the sample-level epsilon would be wrong")
            rows.append(delta)
        return {name: torch.stack([r[name] for r in rows]) for name in params}
    plans = []
    for k in chosen:
        pos, mask = local_batch_plan(sizes[k], config.local_epochs, config.local_batch_size, generator)
        plans.append((parts[k][pos], mask))
    if path == "loop":
        rows = [local_sgd.one(params, index, mask) for index, mask in plans]
        return {name: torch.stack([r[name] for r in rows]) for name in params}
    return local_sgd.many(params, plans)
