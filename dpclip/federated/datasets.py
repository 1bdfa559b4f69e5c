"""Data and models for federated runs: a synthetic task, and MNIST / Fashion-MNIST through dpclip.data.

* ``synthetic``: a Gaussian mixture classification task drawn from an explicit generator:
  ``classes`` means ``m_c ~ N(0, separation^2 I_features)``, each example ``x = m_y + N(0, I)``
  with ``y`` uniform. Small, fast and reproducible; for tests and quick experiments.
* ``mnist`` / ``fashion-mnist``: :func:`dpclip.data.load_arrays` (imported lazily), images
  standardised per channel.

Models: ``mlp`` (flatten, one hidden tanh layer of ``hidden`` units, linear output) for any
dataset, and ``cnn`` (Tramer & Boneh's MNIST CNN from :mod:`dpclip.models`) for 28x28 images.
Both are initialised from a generator, without touching torch's global RNG.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["FederatedData", "DATASETS", "MODELS", "synthetic", "load", "build_model"]

DATASETS = ("mnist", "fashion-mnist", "synthetic")
MODELS = ("mlp", "cnn")


@dataclass(frozen=True)
class FederatedData:
    """Training and test tensors: ``x [N, ...]`` float32, ``y [N]`` int64."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int


def synthetic(
    num_train: int, num_test: int, generator: torch.Generator, *, features: int = 32, classes: int = 10,
    separation: float = 1.0,
) -> FederatedData:
    """A Gaussian mixture: ``x = m_y + N(0, I)``, ``m_c ~ N(0, separation^2 I)``, ``y`` uniform."""
    for name, value in (("num_train", num_train), ("num_test", num_test), ("features", features), ("classes", classes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (2 if name == "classes" else 1):
            raise ValueError(f"{name} must be a whole number >= {2 if name == 'classes' else 1}; got {value!r}")
    means = torch.randn(classes, features, generator=generator) * float(separation)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(classes, (n,), generator=generator)
        return means[y] + torch.randn(n, features, generator=generator), y

    train_x, train_y = draw(num_train)
    test_x, test_y = draw(num_test)
    return FederatedData("synthetic", train_x, train_y, test_x, test_y, classes)


def load(name: str, generator: torch.Generator, *, data_dir: str | None = None, train_subset: int | None = None,
         synthetic_examples: int = 6000) -> FederatedData:
    """Dataset ``name`` (:data:`DATASETS`); ``train_subset`` keeps that many random training examples."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "synthetic":
        data = synthetic(train_subset or synthetic_examples, max(1000, (train_subset or synthetic_examples) // 6),
                         generator)
        return data
    from .. import data as dpdata  # numpy only; the loaders fetch or read the files

    arrays = dpdata.load_arrays(name, data_dir)
    train_x, train_y = dpdata.to_tensors(arrays.train_x, arrays.train_y, name)
    test_x, test_y = dpdata.to_tensors(arrays.test_x, arrays.test_y, name)
    if train_subset is not None:
        if train_subset > len(train_y):
            raise ValueError(f"train_subset={train_subset} exceeds the {len(train_y)} training examples of {name}")
        keep = torch.sort(torch.randperm(len(train_y), generator=generator)[:train_subset]).values
        train_x, train_y = train_x[keep], train_y[keep]
    return FederatedData(name, train_x, train_y, test_x, test_y, 10)


class MLP(nn.Module):
    """Flatten, ``Linear(d, hidden)``, tanh, ``Linear(hidden, classes)``."""

    def __init__(self, in_features: int, hidden: int, classes: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(in_features, hidden)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(x.flatten(1))))


def build_model(name: str, data: FederatedData, generator: torch.Generator, *, hidden: int = 64) -> nn.Module:
    """Model ``name`` (:data:`MODELS`) for ``data``, initialised from ``generator``."""
    from ..models import build_model as build, init_parameters

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    shape = tuple(data.train_x.shape[1:])
    if name == "cnn":
        if len(shape) != 3 or shape[1:] != (28, 28):
            raise ValueError(f"model 'cnn' needs 28x28 images (mnist, fashion-mnist); {data.name} examples have "
                             f"shape {shape}. Fix: use --model mlp")
        return build("cnn", shape[0], data.num_classes, image_size=28, generator=generator)
    with torch.random.fork_rng(devices=[]):
        model = MLP(int(torch.Size(shape).numel()), hidden, data.num_classes)
    return init_parameters(model, generator)
