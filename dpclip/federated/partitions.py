"""Client partitions of a labelled dataset: IID, Dirichlet(alpha) label skew, shards of k labels.

Every function is pure: the result depends only on the labels (or the number of examples),
the arguments and the state of the explicit ``torch.Generator`` it draws from. A partition is
a tuple with one ``int64`` index tensor per client (sorted ascending, disjoint, covering every
example exactly once).

* :func:`iid_partition`: a random permutation cut into ``num_clients`` near-equal parts
  (sizes differ by at most one).
* :func:`dirichlet_partition`: per class, the class's examples are split among the clients
  in proportions ``p ~ Dirichlet(alpha * 1)`` (Hsu, Qi, Brown 2019). Small ``alpha`` gives
  each client few classes; large ``alpha`` approaches IID. Drawn again until every client
  holds at least ``min_size`` examples.
* :func:`shard_partition`: the examples sorted by label are cut into
  ``num_clients * labels_per_client`` equal shards and each client gets
  ``labels_per_client`` random shards (McMahan et al. 2017's pathological non-IID split): a
  client sees at most ``labels_per_client`` labels when the shards align with the classes,
  and at most ``2 * labels_per_client`` otherwise.

:func:`parse_partition` reads the command-line form (``iid``, ``dirichlet:0.5``, ``shards:2``)
into a frozen :class:`PartitionSpec`, and :func:`partition` applies one.
"""

from __future__ import annotations

import math

import torch

from .spec import PartitionSpec, parse_partition

__all__ = [
    "PartitionSpec",
    "parse_partition",
    "partition",
    "iid_partition",
    "dirichlet_partition",
    "shard_partition",
    "sample_gamma",
    "sample_dirichlet",
    "label_counts",
]

Partition = tuple[torch.Tensor, ...]


def _check_clients(num_clients: object, num_examples: int) -> int:
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients must be an int >= 1; got {num_clients!r}")
    if num_clients > num_examples:
        raise ValueError(
            f"num_clients={num_clients} exceeds the {num_examples} examples: some client would get no data. "
            "Fix: use fewer clients or more examples"
        )
    return num_clients


def _check_generator(generator: object) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator; got {type(generator).__name__}. "
            "Fix: pass torch.Generator().manual_seed(seed)"
        )
    return generator


def _check_labels(labels: object) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point():
        raise TypeError(
            f"labels must be a 1-D integer torch.Tensor; got {type(labels).__name__}"
            + (f" of shape {tuple(labels.shape)} and dtype {labels.dtype}" if isinstance(labels, torch.Tensor) else "")
        )
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"labels must be >= 0; got a minimum of {int(labels.min())}")
    return labels.detach().to("cpu", torch.int64)


def _sorted(parts: list[torch.Tensor]) -> Partition:
    return tuple(torch.sort(p.to(torch.int64)).values for p in parts)


def iid_partition(num_examples: int, num_clients: int, generator: torch.Generator) -> Partition:
    """A random permutation of ``range(num_examples)`` cut into ``num_clients`` near-equal parts."""
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples < 0:
        raise ValueError(f"num_examples must be an int >= 0; got {num_examples!r}")
    _check_clients(num_clients, num_examples)
    perm = torch.randperm(num_examples, generator=_check_generator(generator))
    return _sorted(list(torch.tensor_split(perm, num_clients)))


def sample_gamma(concentration: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``Gamma(concentration, 1)`` samples (same shape), drawn from ``generator`` only.

    Marsaglia and Tsang (2000) for shape >= 1; for shape < 1, ``Gamma(a) = Gamma(a + 1) * U^(1/a)``.
    torch's own gamma sampler takes no generator, hence this one.
    """
    _check_generator(generator)
    a = torch.as_tensor(concentration, dtype=torch.float64)
    if not bool((a > 0).all()) or not bool(torch.isfinite(a).all()):
        raise ValueError(f"concentration must be finite and > 0; got {a.tolist()}")
    boost = a < 1
    shape = torch.where(boost, a + 1, a)
    d = shape - 1.0 / 3.0
    c = 1.0 / torch.sqrt(9.0 * d)
    out = torch.empty_like(a)
    todo = torch.ones_like(a, dtype=torch.bool)
    while bool(todo.any()):
        n = int(todo.sum())
        x = torch.randn(n, generator=generator, dtype=torch.float64)
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        dd, cc = d[todo], c[todo]
        v = (1 + cc * x) ** 3
        ok = (v > 0) & (torch.log(u) < 0.5 * x * x + dd - dd * v + dd * torch.log(v.clamp_min(1e-300)))
        idx = todo.nonzero().squeeze(1)
        out[idx[ok]] = (dd * v)[ok]
        todo[idx[ok]] = False
    if bool(boost.any()):
        u = torch.rand(int(boost.sum()), generator=generator, dtype=torch.float64)
        out[boost] = out[boost] * u.pow(1.0 / a[boost])
    return out


def sample_dirichlet(alpha: float, size: int, generator: torch.Generator) -> torch.Tensor:
    """One draw of ``Dirichlet(alpha * 1_size)`` (float64, sums to 1)."""
    g = sample_gamma(torch.full((size,), float(alpha), dtype=torch.float64), generator)
    total = g.sum()
    if not total > 0:  # every gamma underflowed (alpha tiny): all mass on one random coordinate
        g = torch.zeros(size, dtype=torch.float64)
        g[int(torch.randint(size, (1,), generator=generator))] = 1.0
        total = g.sum()
    return g / total


def dirichlet_partition(
    labels: torch.Tensor,
    num_clients: int,
    alpha: float,
    generator: torch.Generator,
    *,
    min_size: int = 1,
    max_tries: int = 1000,
) -> Partition:
    """Label skew: each class split among the clients in ``Dirichlet(alpha)`` proportions.

    For each class (in increasing label order) the class's examples are permuted and cut at
    ``round(cumsum(p) * n_class)``, ``p ~ Dirichlet(alpha * 1_num_clients)``. The whole draw
    is repeated until every client has at least ``min_size`` examples.

    Raises:
        ValueError: ``alpha <= 0``, or no draw in ``max_tries`` gave every client ``min_size``
            examples (the message says to raise ``alpha`` or lower ``num_clients``/``min_size``).
    """
    labels = _check_labels(labels)
    _check_clients(num_clients, labels.numel())
    _check_generator(generator)
    alpha_f = float(alpha)
    if not (alpha_f > 0 and math.isfinite(alpha_f)):
        raise ValueError(f"alpha must be a finite number > 0 (e.g. 0.5; smaller is more skewed); got {alpha!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 0:
        raise ValueError(f"min_size must be an int >= 0; got {min_size!r}")
    if min_size * num_clients > labels.numel():
        raise ValueError(
            f"min_size={min_size} for {num_clients} clients needs {min_size * num_clients} examples; "
            f"there are {labels.numel()}. Fix: lower min_size or num_clients"
        )
    classes = torch.unique(labels)
    for _ in range(max_tries):
        parts: list[list[torch.Tensor]] = [[] for _ in range(num_clients)]
        for c in classes.tolist():
            members = (labels == c).nonzero().squeeze(1)
            members = members[torch.randperm(members.numel(), generator=generator)]
            p = sample_dirichlet(alpha_f, num_clients, generator)
            cuts = torch.round(torch.cumsum(p, 0) * members.numel()).to(torch.int64)
            cuts[-1] = members.numel()
            start = 0
            for k, end in enumerate(cuts.tolist()):
                if end > start:
                    parts[k].append(members[start:end])
                start = max(start, end)
        flat = [torch.cat(p) if p else torch.zeros(0, dtype=torch.int64) for p in parts]
        if min(p.numel() for p in flat) >= min_size:
            return _sorted(flat)
    raise ValueError(
        f"dirichlet_partition: no draw in {max_tries} tries gave each of {num_clients} clients at least "
        f"{min_size} examples at alpha={alpha_f:g}. Fix: raise alpha, or lower num_clients or min_size"
    )


def shard_partition(
    labels: torch.Tensor, num_clients: int, labels_per_client: int, generator: torch.Generator
) -> Partition:
    """McMahan et al. 2017: sort by label, cut into ``num_clients * labels_per_client`` shards, deal them out.

    Examples are sorted by label (stable: ties keep their index order), the sorted list is cut
    into equal shards (sizes differ by at most one), and a random permutation of the shards
    gives client ``k`` the shards ``perm[k * labels_per_client : (k + 1) * labels_per_client]``.
    """
    labels = _check_labels(labels)
    _check_generator(generator)
    if isinstance(labels_per_client, bool) or not isinstance(labels_per_client, int) or labels_per_client < 1:
        raise ValueError(f"labels_per_client (the k of shards:k) must be an int >= 1; got {labels_per_client!r}")
    _check_clients(num_clients, labels.numel())
    shards = num_clients * labels_per_client
    if shards > labels.numel():
        raise ValueError(
            f"shards:{labels_per_client} for {num_clients} clients needs {shards} shards but there are only "
            f"{labels.numel()} examples. Fix: use fewer clients or a smaller k"
        )
    order = torch.sort(labels, stable=True).indices
    pieces = torch.tensor_split(order, shards)
    perm = torch.randperm(shards, generator=generator).tolist()
    parts = [
        torch.cat([pieces[s] for s in perm[k * labels_per_client : (k + 1) * labels_per_client]])
        for k in range(num_clients)
    ]
    return _sorted(parts)


def partition(labels: torch.Tensor, num_clients: int, spec: PartitionSpec | str, generator: torch.Generator) -> Partition:
    """Apply ``spec`` (a :class:`PartitionSpec` or its text form) to ``labels``."""
    if isinstance(spec, str):
        spec = parse_partition(spec)
    labels = _check_labels(labels)
    if spec.kind == "iid":
        return iid_partition(labels.numel(), num_clients, generator)
    if spec.kind == "dirichlet":
        return dirichlet_partition(labels, num_clients, float(spec.value), generator)  # type: ignore[arg-type]
    return shard_partition(labels, num_clients, int(spec.value), generator)  # type: ignore[arg-type]


def label_counts(labels: torch.Tensor, parts: Partition, num_classes: int | None = None) -> torch.Tensor:
    """``[num_clients, num_classes]`` counts of each label on each client."""
    labels = _check_labels(labels)
    classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    return torch.stack([torch.bincount(labels[p], minlength=classes) for p in parts])
