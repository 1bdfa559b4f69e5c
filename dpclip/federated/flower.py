"""A Flower (Message API, flwr 1.42) strategy that runs DP-FedAvg with dpclip's pieces.

:class:`DPFedAvg` is a ``flwr.serverapp.strategy.Strategy``; the rest of a Flower app
(``ServerApp``, ``ClientApp``, ``run_simulation`` or ``flwr run``) is unchanged::

    from dpclip.controllers import Quantile
    from dpclip.federated.flower import DPFedAvg

    @server_app.main()
    def main(grid, context):
        strategy = DPFedAvg(num_clients=100, clients_per_round=10, noise_multiplier=1.0,
                            clip_norm=0.5, controller=Quantile(count_noise_multiplier=5.0), seed=0)
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=50)
        strategy.epsilon()            # user-level epsilon at strategy.delta

Per round it does what :func:`dpclip.federated.simulate` does, with the same functions:

* ``configure_train``: every connected node joins independently with probability
  ``q = clients_per_round / num_clients`` (Poisson sampling, drawn from the strategy's
  ``torch.Generator``; the number of nodes must equal ``num_clients``, the population the
  accounting assumes). The global arrays and the current clip norm (``config["clip-norm"]``,
  the L2 bound ``sqrt(sum_g C_g^2)`` of a whole update, and per group
  ``config["clip-norms"]``) go to the sampled nodes, so clients may clip themselves too.
* ``aggregate_train``: each reply's update ``reply - global`` is clipped (flat or per layer) on
  the server, the clipped updates are summed, Gaussian noise is added once, the sum is
  divided by the expected count ``q * num_clients`` (:func:`dpclip.federated.aggregate.dp_aggregate`,
  unweighted: Flower's ``num-examples`` weighting would raise the sensitivity); the server
  optimizer applies the mean update; the clip controller reads privatised statistics; the
  accountant records one Poisson-subsampled Gaussian step ``(sigma, q)``. Replies with
  errors are dropped (a missing client never raises the sensitivity). The noise is added
  even when no node was sampled.
* ``configure_evaluate`` sends nothing unless ``fraction_evaluate > 0``: client-side
  evaluation metrics are computed on private data and released without noise, outside the
  accounting. Evaluate on server-side data with ``start(..., evaluate_fn=...)`` instead.

This differs from Flower's own DP wrappers (see ``docs/federated.md``): the sampling is
Poisson and accounted, the noise is calibrated to the unweighted sum, the adaptive clip
norm follows Andrew et al. with the correct sign and its count release is charged to the
budget, a zero update is fine, and epsilon is composed across rounds.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from logging import INFO, WARNING
from typing import Any

import torch

try:
    from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import Strategy
    from flwr.supercore import log
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "dpclip.federated.flower needs Flower: pip install 'dpclip[flower]' (flwr>=1.42,<1.43)"
    ) from e

from accountants import make_accountant

from .aggregate import check_controller, clipper_for, dp_aggregate
from .fedavg import _float, _int, initial_clip

__all__ = ["DPFedAvg", "parameter_groups"]


def parameter_groups(keys: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """Array names grouped by module (``"fc1.weight"`` and ``"fc1.bias"`` form one layer), in order."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(k.rpartition(".")[0], []).append(k)
    return tuple(tuple(v) for v in groups.values())


class DPFedAvg(Strategy):
    """DP-FedAvg (user-level DP) as a Flower strategy; see the module docstring.

    Args:
        num_clients: ``K``, the number of nodes (the population sampled from).
        clients_per_round: the expected number of clients per round; ``q = clients_per_round / K``.
        noise_multiplier: ``sigma`` per round (the clip statistics' release included).
        clip_norm: the initial threshold: a float (per-layer: ``clip_norm / sqrt(layers)`` each) or
            one value per layer.
        clipping: ``"flat"`` or ``"per_layer"`` (layers: array-name prefixes before the last dot).
        controller: a clip controller from :mod:`dpclip.controllers` (``None``: fixed).
        server_optimizer, server_lr, server_momentum: ``"sgd"`` (momentum) or ``"adam"`` (beta1).
        accountant: ``"prv"`` or ``"rdp"``; delta: for :meth:`epsilon` and the round metrics.
        seed: seeds the sampling generator and (through it) the noise generator; ``None`` draws
            a seed from the operating system.
        secure_mode: :class:`dpclip.noise.SecureGaussianNoise` for the server's noise.
        fraction_evaluate: fraction of nodes asked for (non-private) evaluation metrics; 0 by default.
        arrayrecord_key, configrecord_key: the record keys, as in Flower's ``FedAvg``.
    """

    def __init__(
        self,
        *,
        num_clients: int,
        clients_per_round: float,
        noise_multiplier: float,
        clip_norm: float | Sequence[float] = 1.0,
        clipping: str = "flat",
        controller: Any = None,
        server_optimizer: str = "sgd",
        server_lr: float = 1.0,
        server_momentum: float = 0.0,
        accountant: str = "prv",
        delta: float = 1e-5,
        seed: int | None = None,
        secure_mode: bool = False,
        fraction_evaluate: float = 0.0,
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
    ) -> None:
        self.num_clients = _int("num_clients", num_clients, 1)
        self.clients_per_round = _float("clients_per_round", clients_per_round)
        if self.clients_per_round > self.num_clients:
            raise ValueError(f"clients_per_round={clients_per_round:g} exceeds num_clients={num_clients}; "
                             f"use at most {num_clients}")
        self.sample_rate = self.clients_per_round / self.num_clients
        self.noise_multiplier = _float("noise_multiplier", noise_multiplier, strict=False)
        if clipping not in ("flat", "per_layer"):
            raise ValueError(f"clipping must be 'flat' or 'per_layer'; got {clipping!r}")
        self.clipping = clipping
        self._clip_arg = clip_norm
        self.controller = None if controller is None else copy.deepcopy(check_controller(controller))
        if server_optimizer not in ("sgd", "adam"):
            raise ValueError(f"server_optimizer must be 'sgd' or 'adam'; got {server_optimizer!r}")
        self.server_optimizer = server_optimizer
        self.server_lr = _float("server_lr", server_lr)
        self.server_momentum = _float("server_momentum", server_momentum, strict=False, high=1.0)
        self.accountant = make_accountant(accountant)
        self.delta = _float("delta", delta, high=1.0)
        self.secure_mode = bool(secure_mode)
        self.fraction_evaluate = _float("fraction_evaluate", fraction_evaluate, strict=False, high=1.0 + 1e-12)
        self.arrayrecord_key = arrayrecord_key
        self.configrecord_key = configrecord_key
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(_int("seed", seed, 0))
        self.noise_generator = torch.Generator().manual_seed(
            int(torch.randint(0, 2**62, (1,), generator=self.generator)))
        self.clip: tuple[float, ...] | None = None
        self.clip_history: list[tuple[float, ...]] = []
        self.participants: list[int] = []
        self._groups: tuple[tuple[str, ...], ...] | None = None
        self._global: dict[str, torch.Tensor] | None = None
        self._params: dict[str, torch.Tensor] | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._fixed_std: float | None = None
        self._round_nodes: int = 0

    # -- helpers -------------------------------------------------------------------------------------
    def epsilon(self, delta: float | None = None) -> float:
        """The user-level epsilon spent so far at ``delta`` (default: the strategy's)."""
        if not len(self.accountant):
            return 0.0
        return float(self.accountant.get_epsilon(self.delta if delta is None else delta))

    def _setup(self, arrays: ArrayRecord) -> None:
        state = arrays.to_torch_state_dict()
        bad = [k for k, v in state.items() if not v.is_floating_point()]
        if bad:
            raise ValueError(f"arrays {bad} are not floating point; DP-FedAvg averages model parameters only. "
                             "Fix: send only the trainable parameters (e.g. dict(model.named_parameters()))")
        keys = list(state)
        layers = parameter_groups(keys)
        self._groups = layers if self.clipping == "per_layer" else (tuple(keys),)
        self.clip = initial_clip(self._clip_arg, self.clipping, len(layers))
        self._params = {k: v.detach().clone().requires_grad_(True) for k, v in state.items()}
        params = list(self._params.values())
        if self.server_optimizer == "sgd":
            self._optimizer = torch.optim.SGD(params, lr=self.server_lr, momentum=self.server_momentum)
        else:
            self._optimizer = torch.optim.Adam(params, lr=self.server_lr, betas=(self.server_momentum, 0.999))
        if getattr(self.controller, "keeps_noise_std", False):
            self._fixed_std = self.noise_multiplier * clipper_for(self.clip).sensitivity

    # -- the Strategy interface -----------------------------------------------------------------------
    def summary(self) -> None:
        log(INFO, "\t├──> DP-FedAvg (dpclip): user-level DP, Poisson sampling q = %.4g (%g of %d clients)",
            self.sample_rate, self.clients_per_round, self.num_clients)
        log(INFO, "\t├──> noise multiplier %g, %s clipping at %s, controller %r", self.noise_multiplier,
            self.clipping, self._clip_arg, self.controller)
        log(INFO, "\t└──> server %s (lr %g, momentum %g), %s accountant, delta %g", self.server_optimizer,
            self.server_lr, self.server_momentum, self.accountant.name, self.delta)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self._params is None:
            self._setup(arrays)
        assert self.clip is not None
        nodes = sorted(grid.get_node_ids())
        if len(nodes) != self.num_clients:
            raise ValueError(
                f"{len(nodes)} nodes are connected but num_clients={self.num_clients}: the sample rate "
                f"q = clients_per_round / num_clients and so epsilon assume {self.num_clients}. Fix: pass "
                f"num_clients={len(nodes)} (or start {self.num_clients} nodes)"
            )
        self._global = {k: v.detach() for k, v in arrays.to_torch_state_dict().items()}
        chosen = (torch.rand(len(nodes), generator=self.generator, dtype=torch.float64) < self.sample_rate)
        node_ids = [n for n, c in zip(nodes, chosen.tolist()) if c]
        self._round_nodes = len(node_ids)
        log(INFO, "configure_train: Poisson sampling chose %d of %d nodes (expected %g)",
            len(node_ids), len(nodes), self.clients_per_round)
        config["server-round"] = server_round
        config["clip-norm"] = float(clipper_for(self.clip).sensitivity)
        config["clip-norms"] = [float(c) for c in self.clip]
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return [Message(content=record, message_type=MessageType.TRAIN, dst_node_id=n) for n in node_ids]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        if self._params is None or self._global is None or self.clip is None:
            raise RuntimeError("aggregate_train before configure_train: the strategy has no global model")
        replies = list(replies)
        ok = [r for r in replies if not r.has_error()]
        for r in replies:
            if r.has_error():
                log(WARNING, "aggregate_train: dropping the reply of node %d (error: %s)",
                    r.metadata.src_node_id, r.error.reason)
        rows = []
        for r in ok:
            state = r.content[self.arrayrecord_key].to_torch_state_dict()
            if set(state) != set(self._global):
                raise ValueError(f"node {r.metadata.src_node_id} replied with arrays {sorted(state)}; "
                                 f"expected {sorted(self._global)}")
            rows.append({k: state[k].to(self._global[k].dtype) - self._global[k] for k in self._global})
        deltas = {k: torch.stack([row[k] for row in rows]) if rows else v.new_zeros((0, *v.shape))
                  for k, v in self._global.items()}
        release = dp_aggregate(
            deltas, self.clip, noise_multiplier=self.noise_multiplier,
            expected_clients=self.sample_rate * self.num_clients, generator=self.noise_generator,
            controller=self.controller, groups=self._groups, secure_mode=self.secure_mode,
            fixed_noise_std=self._fixed_std,
        )
        assert self._optimizer is not None
        self._optimizer.zero_grad(set_to_none=True)
        for k, p in self._params.items():
            p.grad = -release.update[k].to(p.dtype)
        self._optimizer.step()
        self.accountant.step(noise_multiplier=release.noise_multiplier, sample_rate=self.sample_rate)
        self.clip_history.append(release.clip)
        self.participants.append(len(ok))
        self.clip = release.next_clip
        new = {k: p.detach().clone().to(self._global[k].dtype) for k, p in self._params.items()}
        values = {
            "noise-multiplier": float(release.noise_multiplier),
            "clip-norm": float(release.sensitivity),
            "next-clip-norm": float(clipper_for(self.clip).sensitivity),
        }
        epsilon = self.epsilon()
        if math.isfinite(epsilon):  # no noise: no epsilon to report
            values["epsilon"] = epsilon
        metrics = MetricRecord(values)
        log(INFO, "aggregate_train: %d updates clipped at %s, noise std %.4g on the sum, epsilon %.4g",
            len(ok), ", ".join(f"{c:.4g}" for c in release.clip), release.noise_std, self.epsilon())
        return ArrayRecord(new), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        nodes = sorted(grid.get_node_ids())
        k = max(1, int(len(nodes) * self.fraction_evaluate))
        pick = torch.randperm(len(nodes), generator=self.generator)[:k].tolist()
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return [Message(content=record, message_type=MessageType.EVALUATE, dst_node_id=nodes[i]) for i in pick]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Unweighted mean of each numeric metric over the replies (not private: see the module docstring)."""
        sums: dict[str, float] = {}
        n = 0
        for r in replies:
            if r.has_error():
                continue
            n += 1
            for record in r.content.metric_records.values():
                for key, value in record.items():
                    if isinstance(value, (int, float)):
                        sums[key] = sums.get(key, 0.0) + float(value)
        return MetricRecord({k: v / n for k, v in sums.items()}) if n else None
