"""Reference models for private training: the end-to-end CNNs of Tramèr & Boneh and a ResNet-18.

* :class:`MnistCNN` and :class:`Cifar10CNN` are the "end-to-end CNN" baselines of
  F. Tramèr and D. Boneh, *Differentially Private Learning Needs Better Features (or Much
  More Data)*, ICLR 2021 (arXiv:2011.11660; code: github.com/ftramer/Handcrafted-DP,
  ``models.py``). Their reported test accuracies at (ε = 3, δ = 1e-5) are 98.1% (MNIST),
  86.0% (Fashion-MNIST, same CNN as MNIST) and 59.2% (CIFAR-10). Both use tanh activations,
  which the paper found better than ReLU under DP-SGD, and no normalisation layers.
* :class:`ResNet18` is a ResNet-18 layout (He et al. 2016: four stages of two basic blocks)
  with a CIFAR-style 3x3 stem and a choice of GroupNorm (usable with per-sample clipping)
  or BatchNorm (which per-sample clipping refuses: its statistics mix samples).

:func:`build_model` maps a model name and a dataset to a fresh model, seeded by an explicit
``torch.Generator`` (the global RNG's state is left as it was).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["MnistCNN", "Cifar10CNN", "ResNet18", "BasicBlock", "MODELS", "build_model", "init_parameters",
           "count_parameters"]


class MnistCNN(nn.Module):
    """Tramèr & Boneh's end-to-end CNN for MNIST and Fashion-MNIST (ICLR 2021, Table 9 / ``MNIST_CNN``).

    Input ``[B, in_channels, 28, 28]`` (pixels in [0, 1] in the paper; standardised inputs work
    as well); output logits ``[B, num_classes]``. Layers (shapes for one 28x28 image)::

        Conv2d(in, 16, 8, stride 2, padding 2) + tanh   -> [16, 13, 13]
        MaxPool2d(2, stride 1)                          -> [16, 12, 12]
        Conv2d(16, 32, 4, stride 2) + tanh              -> [32, 5, 5]
        MaxPool2d(2, stride 1)                          -> [32, 4, 4]
        Linear(512, 32) + tanh, Linear(32, num_classes)

    26,010 parameters for one input channel and 10 classes.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, kernel_size=8, stride=2, padding=2),
            nn.Tanh(),
            nn.MaxPool2d(kernel_size=2, stride=1),
            nn.Conv2d(16, 32, kernel_size=4, stride=2),
            nn.Tanh(),
            nn.MaxPool2d(kernel_size=2, stride=1),
        )
        self.classifier = nn.Sequential(nn.Linear(32 * 4 * 4, 32), nn.Tanh(), nn.Linear(32, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, in_channels, 28, 28]`` -> logits ``[B, num_classes]``."""
        return self.classifier(self.features(x).flatten(1))


class Cifar10CNN(nn.Module):
    """Tramèr & Boneh's end-to-end CNN for CIFAR-10 (ICLR 2021, ``CIFAR10_CNN``).

    Input ``[B, in_channels, 32, 32]`` (the paper standardises each channel); output logits
    ``[B, num_classes]``. Three stages of two 3x3 convolutions (padding 1) with tanh, each
    followed by a 2x2 max-pool: 32, 32 | 64, 64 | 128, 128 channels, so ``[128, 4, 4]``
    before ``Linear(2048, 128) + tanh, Linear(128, num_classes)``. 551,466 parameters for
    3 input channels and 10 classes.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for width in (32, 64, 128):
            for _ in range(2):
                layers += [nn.Conv2d(c, width, kernel_size=3, padding=1), nn.Tanh()]
                c = width
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(128 * 4 * 4, 128), nn.Tanh(), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, in_channels, 32, 32]`` -> logits ``[B, num_classes]``."""
        return self.classifier(self.features(x).flatten(1))


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(min(groups, channels), channels)
    if kind == "batch":
        # no running statistics: they would be computed from private batches and released with
        # the model without noise; every batch (also at evaluation) is normalised by its own
        return nn.BatchNorm2d(channels, track_running_stats=False)
    raise ValueError(f"norm must be 'group' (GroupNorm, works with per-sample clipping) or 'batch' (BatchNorm); "
                     f"got {kind!r}")


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with normalisation and ReLU, plus the (projected) identity.

    ``[B, c_in, H, W]`` -> ``[B, c_out, H / stride, W / stride]``.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(norm, c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = _norm(norm, c_out, groups)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                          _norm(norm, c_out, groups))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """A ResNet-18-style network (He et al., CVPR 2016) for small images.

    Input ``[B, in_channels, H, W]`` (28x28 or 32x32; any size >= 8 works); output logits
    ``[B, num_classes]``. A 3x3 stem (no max-pool, as is usual for CIFAR), then four stages
    of two :class:`BasicBlock` s with ``width, 2 width, 4 width, 8 width`` channels (strides
    1, 2, 2, 2), global average pooling and a linear classifier.

    Args:
        norm: ``"group"`` — GroupNorm with ``min(groups, channels)`` groups, which per-sample
            (DP-SGD) clipping supports, as in De et al. 2022; or ``"batch"`` — BatchNorm, which
            mixes the samples of a batch, so dpclip's per-sample modes refuse it (use batch
            clipping). It keeps no running statistics (``track_running_stats=False``): those
            would be computed from private data and released without noise, so every batch,
            also at evaluation, is normalised by its own statistics.
        width: channels of the first stage. The default 32 is half the usual ResNet-18
            (2.8M parameters instead of 11.2M), which is what a CPU can train; ``width=64``
            is the standard size.
        groups: GroupNorm groups (default 16).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, *, norm: str = "group", width: int = 32,
                 groups: int = 16) -> None:
        super().__init__()
        _norm(norm, 1, 1)  # fail early with the message above
        if width < 1:
            raise ValueError(f"width must be a positive number of channels (e.g. 32 or 64); got {width}")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), _norm(norm, width, groups),
                                  nn.ReLU())
        blocks = []
        c = width
        for stage, stride in enumerate((1, 2, 2, 2)):
            out = width * 2**stage
            blocks += [BasicBlock(c, out, stride, norm, groups), BasicBlock(out, out, 1, norm, groups)]
            c = out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, in_channels, H, W]`` -> logits ``[B, num_classes]``."""
        return self.classifier(self.pool(self.blocks(self.stem(x))).flatten(1))


# model name -> what it is (build_model constructs it)
MODELS = {
    "cnn": "Tramèr & Boneh's end-to-end tanh CNN for the dataset (MnistCNN for MNIST/Fashion-MNIST, "
           "Cifar10CNN for CIFAR-10)",
    "resnet18": "ResNet-18-style, GroupNorm (works with per-sample clipping)",
    "resnet18-bn": "ResNet-18-style, BatchNorm (refused by per-sample clipping; for batch clipping)",
}


def build_model(name: str, in_channels: int, num_classes: int = 10, *, image_size: int = 28,
                generator: torch.Generator | None = None) -> nn.Module:
    """A fresh model ``name`` (a key of :data:`MODELS`) for images ``[B, in_channels, image_size, image_size]``.

    ``"cnn"`` is :class:`MnistCNN` for 28x28 inputs and :class:`Cifar10CNN` for 32x32 inputs.
    With ``generator``, the parameters are re-drawn from it (:func:`init_parameters`) and the
    global RNG's state is restored after construction, so the initialisation is reproducible
    and leaves torch's global RNG as it was.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    if name == "cnn" and image_size not in (28, 32):
        raise ValueError(f"model 'cnn' is defined for 28x28 (MNIST) and 32x32 (CIFAR-10) images; got "
                         f"{image_size}x{image_size}; use model 'resnet18' for other sizes")
    if generator is None:
        return _construct(name, in_channels, num_classes, image_size)
    with torch.random.fork_rng(devices=[]):  # construction draws from the global RNG: undo that
        model = _construct(name, in_channels, num_classes, image_size)
    return init_parameters(model, generator)


def _construct(name: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    if name == "cnn":
        return MnistCNN(in_channels, num_classes) if image_size == 28 else Cifar10CNN(in_channels, num_classes)
    return ResNet18(in_channels, num_classes, norm="batch" if name == "resnet18-bn" else "group")


def init_parameters(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Re-draw every Conv/Linear weight and bias from ``generator`` (torch's default scheme).

    Weights and biases are ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for the biases and
    kaiming-uniform with ``a = sqrt(5)`` for the weights (which is the same bound), as
    ``nn.Conv2d.reset_parameters`` / ``nn.Linear.reset_parameters`` do; normalisation layers
    keep weight 1 and bias 0. Returns ``model``.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                fan_in = module.weight[0].numel()
                bound = 1.0 / fan_in**0.5
                module.weight.copy_(_uniform(module.weight.shape, bound, generator))
                if module.bias is not None:
                    module.bias.copy_(_uniform(module.bias.shape, bound, generator))
    return model


def _uniform(shape: torch.Size, bound: float, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
