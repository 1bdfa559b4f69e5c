"""dpclip.models: shapes and sizes of the Tramèr & Boneh CNNs and the ResNet-18, seeding, DP compatibility."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dpclip.models import Cifar10CNN, MnistCNN, ResNet18, build_model, count_parameters, init_parameters


pytestmark = pytest.mark.usefixtures("one_thread")


def test_mnist_cnn_shapes_and_size():
    model = MnistCNN()
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert count_parameters(model) == 26010  # as in ftramer/Handcrafted-DP's MNIST_CNN
    assert sum(isinstance(m, nn.Tanh) for m in model.modules()) == 3
    assert MnistCNN(in_channels=2, num_classes=4)(torch.zeros(1, 2, 28, 28)).shape == (1, 4)


def test_cifar10_cnn_shapes_and_size():
    model = Cifar10CNN()
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert count_parameters(model) == 550570
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 6


@pytest.mark.parametrize("norm, kind", [("group", nn.GroupNorm), ("batch", nn.BatchNorm2d)])
def test_resnet18_layout_and_norm_choice(norm, kind):
    model = ResNet18(in_channels=1, norm=norm, width=8)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len([c for c in convs if c.kernel_size == (3, 3)]) == 17  # stem + 8 blocks x 2: ResNet-18
    norms = [m for m in model.modules() if isinstance(m, (nn.GroupNorm, nn.BatchNorm2d))]
    assert norms and all(isinstance(m, kind) for m in norms)
    # BatchNorm keeps no running statistics (they would leak private data un-noised)
    assert all(not m.track_running_stats for m in norms if isinstance(m, nn.BatchNorm2d))
    with torch.device("meta"):  # sizes only: no memory, no initialisation
        assert count_parameters(ResNet18(width=64)) == 11173962  # the standard CIFAR ResNet-18 size


def test_resnet18_rejects_unknown_norm():
    with pytest.raises(ValueError, match="'group'.*'batch'.*got 'layer'"):
        ResNet18(norm="layer")


def test_build_model_picks_the_cnn_by_image_size_and_seeds_from_the_generator():
    assert isinstance(build_model("cnn", 1, image_size=28), MnistCNN)
    assert isinstance(build_model("cnn", 3, image_size=32), Cifar10CNN)
    assert isinstance(build_model("resnet18-bn", 3, image_size=32).stem[1], nn.BatchNorm2d)
    with pytest.raises(ValueError, match="28x28.*32x32.*got 64x64"):
        build_model("cnn", 3, image_size=64)
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        build_model("vgg", 1)
    state = torch.get_rng_state()
    a = build_model("cnn", 1, generator=torch.Generator().manual_seed(4))
    b = build_model("cnn", 1, generator=torch.Generator().manual_seed(4))
    c = build_model("cnn", 1, generator=torch.Generator().manual_seed(5))
    for pa, pb, pc in zip(a.parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left as it was


def test_init_parameters_uses_torch_default_bounds():
    layer = nn.Linear(400, 3)
    init_parameters(layer, torch.Generator().manual_seed(0))
    bound = 1 / 400**0.5
    assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.9 * bound
    assert layer.bias.abs().max() <= bound


@pytest.mark.parametrize("name, shape", [("cnn", (1, 28, 28)), ("resnet18", (3, 32, 32))])
def test_models_train_privately(name, shape):
    """Every layer of the GroupNorm models has a per-sample rule: one private step runs and accounts."""
    from torch.utils.data import DataLoader, TensorDataset

    from dpclip import PrivacyEngine

    g = torch.Generator().manual_seed(0)
    if name == "resnet18":
        model = init_parameters(ResNet18(shape[0], width=4, groups=2), g)  # a narrow one: same layers, faster
    else:
        model = build_model(name, shape[0], image_size=shape[1], generator=g)
    data = TensorDataset(torch.randn(16, *shape, generator=g), torch.arange(16) % 10)
    before = [p.detach().clone() for p in model.parameters()]
    engine = PrivacyEngine()
    model, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                            data_loader=DataLoader(data, batch_size=8), noise_multiplier=1.0,
                                            max_grad_norm=1.0, generator=g)
    x, y = next(iter(loader))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert engine.accountant.history[-1][2] == 1


def test_batchnorm_resnet_trains_with_batch_clipping():
    from torch.utils.data import DataLoader, TensorDataset

    from dpclip import PrivacyEngine

    g = torch.Generator().manual_seed(1)
    model = init_parameters(ResNet18(1, norm="batch", width=4, groups=2), g)
    data = TensorDataset(torch.randn(16, 1, 28, 28, generator=g), torch.arange(16) % 10)
    engine = PrivacyEngine()
    model, opt, loader = engine.make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                            data_loader=DataLoader(data, batch_size=8), noise_multiplier=1.0,
                                            max_grad_norm=1.0, clipping="batch", generator=g)
    x, y = next(iter(loader))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert engine.accountant.history[-1][2] == 1


def test_batchnorm_resnet_is_refused_by_per_sample_clipping():
    from torch.utils.data import DataLoader, TensorDataset

    from dpclip import PrivacyEngine

    model = build_model("resnet18-bn", 1)
    data = TensorDataset(torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="BatchNorm"):
        PrivacyEngine().make_private(module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                     data_loader=DataLoader(data, batch_size=2), noise_multiplier=1.0,
                                     max_grad_norm=1.0)
