"""The Gaussian mechanism on clipped sums: plain, and secure against floating-point attacks.

Two classes with one interface, ``add(sums, sensitivity, generator) -> {key: noisy sum}``:

* :class:`GaussianNoise` adds ``N(0, (noise_multiplier * sensitivity)^2)`` in floating point,
  drawn from an explicit ``torch.Generator``. Fast and reproducible, but the released floats
  are ``fl(x + fl(noise))``, and which floats are reachable depends on ``x``: Mironov (2012)
  showed that such low-order bits reveal ``x`` for the Laplace mechanism, and Jin et al.
  (2022) did the same for the Gaussian mechanism of DP-SGD libraries.
* :class:`SecureGaussianNoise` releases ``grid * (round(x / grid) + Z)`` with ``Z`` an exact
  sample of the discrete Gaussian (Canonne, Kamath, Steinke 2020) drawn from the operating
  system's CSPRNG. The released value is a function of an integer only, so the float
  representation cannot leak ``x``; its output distribution is within a factor
  ``exp(±2.8e-137)`` per coordinate of a post-processing of the continuous Gaussian mechanism
  with the same noise multiplier (statement in the class docstring, proof in
  docs/secure_mode.md).

And :func:`secure_generator`, a ``torch.Generator`` seeded from ``secrets``.

References:
    I. Mironov. On significance of the least significant bits for differential privacy. CCS 2012.
    N. Holohan, S. Braghin. Secure random sampling in differential privacy. ESORICS 2021,
        arXiv:2107.10138.
    C. Canonne, G. Kamath, T. Steinke. The discrete Gaussian for differential privacy.
        NeurIPS 2020, arXiv:2004.00010.
    J. Jin, E. McMurtry, B. Rubinstein, O. Ohrimenko. Are we there yet? Timing and
        floating-point attacks on differential privacy systems. IEEE S&P 2022, arXiv:2112.05307.
    S. Haney, D. Desfontaines, L. Hartman, R. Shrestha, M. Hay. Precision-based attacks and
        interval refining. arXiv:2207.13793 (2022).
"""

from __future__ import annotations

import math
import numbers
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal, localcontext
from fractions import Fraction

import torch

from ._pool import in_shares, serial

try:  # the CPU noise kernel (dpclip/_csrc/gauss.c); absent when the install had no C compiler
    from . import _gauss
except ImportError:  # pragma: no cover - depends on the build
    _gauss = None

__all__ = [
    "GaussianNoise", "NoiseAhead", "SecureGaussianNoise", "SecureNoisePlan", "add_keyed_", "add_normal_", "draw_key",
    "fill_normal", "kernel_takes", "noise_kernel", "secure_generator",
]


# ----------------------------------------------------------------------------- validation
def _check_multiplier(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"noise_multiplier must be a real number (noise std / sensitivity); got {value!r} "
            f"of type {type(value).__name__}. Fix: pass a float such as 1.0"
        )
    sigma = float(value)
    if not sigma >= 0 or math.isinf(sigma):
        raise ValueError(
            f"noise_multiplier must be >= 0 and finite (noise std / sensitivity); got {value!r}. "
            "Fix: pass a value such as 1.0, or 0.0 for no noise"
        )
    return sigma


def _check_sensitivity(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"sensitivity must be a real number (the L2 sensitivity of the sums); got {value!r} "
            f"of type {type(value).__name__}"
        )
    s = float(value)
    if not s >= 0:
        raise ValueError(
            f"sensitivity must be >= 0 (the L2 sensitivity of the sums, e.g. max_grad_norm); got {value!r}"
        )
    return s


def _check_sums(sums: object) -> list[tuple[object, torch.Tensor]]:
    if not isinstance(sums, Mapping):
        raise TypeError(
            f"sums must be a mapping {{key: tensor}} (e.g. {{param: clipped sum}}); got {type(sums).__name__}. "
            "Fix: wrap a single tensor as {'sum': tensor}"
        )
    items = list(sums.items())
    for key, value in items:
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"sums[{key!r}] must be a torch.Tensor; got {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(
                f"sums[{key!r}] has dtype {value.dtype}; noise is added to floating-point tensors only. "
                "Fix: convert it, e.g. tensor.to(torch.float32)"
            )
    return items


def _generator_device(generator: object) -> torch.device:
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"generator must be a torch.Generator; got {type(generator).__name__}. "
            "Fix: pass torch.Generator().manual_seed(seed), or secure_generator()"
        )
    return generator.device


# ----------------------------------------------------------------------------- plain
@dataclass(frozen=True)
class GaussianNoise:
    """Adds ``N(0, (noise_multiplier * sensitivity)^2)`` to every coordinate, in floating point.

    The noise is drawn from ``generator`` on the generator's device (then moved to each sum's
    device), so a run is reproducible from the generator's state and no global RNG is touched.
    All sums of one dtype get their noise from a single draw over their concatenation, in the
    mapping's key order (:func:`fill_normal`; :func:`add_normal_` for :meth:`add_`). On CPU
    that draw is dpclip's noise kernel (counter-based Philox and a vectorised Box-Muller,
    docs/design.md P11) split over the intra-op threads, or, without the kernel, torch's
    generator in seeded pieces (P7). The values are i.i.d. ``N(0, std^2)`` either way, though
    not the same values as one draw per tensor.

    Not safe against floating-point attacks: the released float ``fl(x + noise)`` carries
    information about ``x`` in its low-order bits (Mironov 2012; Jin et al. 2022, who attack
    DP-SGD this way). Use :class:`SecureGaussianNoise` where that matters.

    Args:
        noise_multiplier: noise std divided by the sensitivity (sigma); 0 adds no noise.
    """

    noise_multiplier: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "noise_multiplier", _check_multiplier(self.noise_multiplier))

    def std(self, sensitivity: float) -> float:
        """``noise_multiplier * sensitivity``; 0 without noise, also for an unbounded sensitivity.

        Raises:
            ValueError: ``sensitivity`` is negative or NaN, or infinite while noise_multiplier > 0
                (no finite noise hides an unbounded contribution).
        """
        s = _check_sensitivity(sensitivity)
        if self.noise_multiplier == 0.0:
            return 0.0
        if math.isinf(s):
            raise ValueError(
                f"sensitivity is {sensitivity!r}: no finite noise hides an unbounded contribution. "
                "Fix: bound it, e.g. a finite max_grad_norm"
            )
        return self.noise_multiplier * s

    def add(
        self, sums: Mapping[object, torch.Tensor], sensitivity: float, generator: torch.Generator
    ) -> dict[object, torch.Tensor]:
        """``{key: sum + noise}`` as new tensors (dtype, shape and device of each sum kept).

        The keys' order fixes the order of the draws. Without noise (``std == 0``) each sum is
        returned as an exact copy.

        Raises:
            TypeError: ``sums`` is not a mapping of floating-point tensors, or ``generator`` is
                not a ``torch.Generator``.
            ValueError: an invalid ``sensitivity`` (see :meth:`std`).
        """
        items = _check_sums(sums)
        std = self.std(sensitivity)
        if std == 0.0:
            return {key: value.clone() for key, value in items}
        device = _generator_device(generator)
        out: dict[object, torch.Tensor] = {}
        for dtype in dict.fromkeys(value.dtype for _, value in items):
            group = [(key, value) for key, value in items if value.dtype == dtype]
            flat = torch.empty(sum(v.numel() for _, v in group), dtype=dtype, device=device)
            fill_normal(flat, std, generator)
            offset = 0
            for key, value in group:
                draw = flat[offset : offset + value.numel()].view(value.shape)
                offset += value.numel()
                out[key] = draw.to(value.device).add_(value)
        return {key: out[key] for key, _ in items}


    def add_(
        self, sums: Mapping[object, torch.Tensor], sensitivity: float, generator: torch.Generator
    ) -> Mapping[object, torch.Tensor]:
        """:meth:`add` in place: each sum becomes ``sum + noise``, with the values :meth:`add`
        would return (the same draws in the same order, and ``x + n == n + x`` in floating
        point). Returns ``sums``. Without noise nothing is touched.

        On CPU the noise kernel adds its numbers straight into the sums, or, without it, each
        thread draws torch's pieces into a small buffer and adds them from there
        (:func:`add_normal_`): no buffer the size of the model is allocated, page-faulted and
        freed per step, and none is kept (docs/design.md P10, P11).

        Raises: as :meth:`add`.
        """
        items = _check_sums(sums)
        std = self.std(sensitivity)
        if std == 0.0:
            return sums
        _generator_device(generator)
        for dtype in dict.fromkeys(value.dtype for _, value in items):
            add_normal_([value for _, value in items if value.dtype == dtype], std, generator)
        return sums


# ----------------------------------------------------------------------------- parallel draw
NOISE_CHUNK = 1 << 16
"""Numbers per independently seeded piece of a large CPU draw with torch's generator (the
path without the kernel, and for half-precision tensors)."""

KERNEL_SPLIT = 1 << 15
"""Numbers above which a kernel draw is split across ``torch.get_num_threads()`` threads."""


def noise_kernel() -> str | None:
    """The instruction set the CPU noise kernel runs on (``'avx512'``, ``'avx2'`` or
    ``'generic'``), or None when dpclip was installed without it (no C compiler), in which case
    CPU noise comes from torch's generator in seeded pieces (docs/design.md P7, P11)."""
    return None if _gauss is None else _gauss.isa()


def kernel_takes(tensors: list[torch.Tensor], generator: torch.Generator) -> bool:
    """Whether the noise kernel draws for ``tensors`` with ``generator`` (:func:`add_keyed_`
    then applies): the kernel is built, the generator is a CPU one, and the tensors are all
    contiguous CPU float32, or all float64."""
    if _gauss is None or generator.device.type != "cpu" or not tensors:
        return False
    dtype = tensors[0].dtype
    return dtype in (torch.float32, torch.float64) and all(
        t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous() for t in tensors
    )


def _kernel_draw(dests: list[torch.Tensor], std: float, generator: torch.Generator, add: bool) -> None:
    """Write (``add=False``) or add i.i.d. ``N(0, std^2)`` into ``dests`` (contiguous, one
    dtype), numbers ``0 .. n-1`` of the kernel's stream for a 64-bit key drawn from
    ``generator`` (one ``randint``), laid over the tensors one after the other.

    The stream is Philox4x32-10 (Salmon et al. 2011) through the Box-Muller transform, layout in
    dpclip/_csrc/gauss.c. Number ``i`` is a function of ``(key, i)`` alone, so the threads each
    take a contiguous share of whole batches and the values do not depend on the thread count.
    Above :data:`KERNEL_SPLIT` numbers the kernel splits the draw over
    ``torch.get_num_threads()`` threads of its own, started for the call (design P12).
    """
    if sum(t.numel() for t in dests) == 0:
        return
    _keyed(dests, std, draw_key(generator), add, None)


def draw_key(generator: torch.Generator) -> int:
    """A 64-bit key for the noise kernel's stream: one ``randint`` from ``generator``."""
    key = int(torch.randint(-(1 << 63), (1 << 63) - 1, (1,), generator=generator, dtype=torch.int64))
    return key & ((1 << 64) - 1)


def add_keyed_(dests: list[torch.Tensor], std: float, key: int, ahead: "NoiseAhead | None" = None) -> int:
    """Add numbers ``0 .. n-1`` of the noise kernel's stream for ``key`` (``N(0, std^2)``) into
    ``dests`` (contiguous CPU, one dtype: float32 or float64), laid over the tensors one after
    the other, in place. With ``ahead``, the numbers its background thread has already drawn
    for this ``(key, std, n, dtype)`` are added from its buffer and the rest computed here; the
    values are the same either way (bit for bit). Returns how many numbers came from ``ahead``.
    """
    return _keyed(dests, std, key, True, ahead)


def _keyed(dests: list[torch.Tensor], std: float, key: int, add: bool, ahead: "NoiseAhead | None") -> int:
    """Write or add numbers ``0 .. n-1`` of the stream for ``key`` into ``dests`` (the kernel's
    own threads above :data:`KERNEL_SPLIT` numbers); ``ahead`` (add only): take what its thread
    drew. Returns how many numbers came from ``ahead``."""
    live = [t for t in dests if t.numel()]
    n = sum(t.numel() for t in live)
    if n == 0:
        return 0
    threads = torch.get_num_threads() if n > KERNEL_SPLIT else 1
    addresses, counts = [t.data_ptr() for t in live], [t.numel() for t in live]
    is_f64 = live[0].dtype == torch.float64
    if ahead is not None and add:
        return int(_gauss.ahead_add(ahead._handle, addresses, counts, key, std, is_f64, threads))
    _gauss.fill(addresses, counts, 0, key, std, is_f64, add, threads)
    return 0


class NoiseAhead:
    """The next step's noise, drawn ahead of time by a background thread at idle priority.

    DP-SGD's noise depends on nothing the step computes, so the numbers of step ``t + 1`` can be
    drawn during its forward and backward passes, on a core the model leaves idle: Python
    between operators, single-threaded operators, the data loader. :meth:`start` hands the
    draw (its key, std and size) to a thread the kernel starts with Linux's ``SCHED_IDLE``
    policy, which runs only when no other thread of the machine wants the core, so it never
    delays the training step (an equal-priority helper did, docs/design.md P9).
    :func:`add_keyed_` with this object then adds the chunks the thread finished from its
    buffer and computes the others itself, without waiting: the values never depend on how far
    the thread got (docs/design.md P14).

    One buffer of the draw's size is kept between draws (2.7 MB for a 670k-parameter model in
    float32), reused once its thread has ended. Only where :meth:`available`: the noise kernel
    is built and the platform has ``SCHED_IDLE``.
    """

    def __init__(self) -> None:
        if not NoiseAhead.available():
            raise RuntimeError(
                "NoiseAhead needs dpclip's noise kernel (dpclip._gauss) on a platform with "
                "SCHED_IDLE (Linux); check NoiseAhead.available() first"
            )
        self._handle = _gauss.ahead_new()

    @staticmethod
    def available() -> bool:
        """The noise kernel is built and this platform can run its thread at idle priority."""
        return _gauss is not None and hasattr(_gauss, "ahead_new") and bool(_gauss.ahead_supported())

    def start(self, count: int, dtype: torch.dtype, std: float, key: int) -> bool:
        """Start drawing numbers ``0 .. count-1`` of the stream for ``key`` (``N(0, std^2)``,
        ``dtype`` float32 or float64) in the background, replacing any pending draw. Returns
        whether the thread started (below :data:`KERNEL_SPLIT` numbers none is: the draw is
        cheaper than the thread)."""
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"NoiseAhead.start: dtype must be torch.float32 or torch.float64, got {dtype}")
        if count < KERNEL_SPLIT:
            self.cancel()
            return False
        return bool(_gauss.ahead_start(self._handle, int(count), int(key), float(std), dtype == torch.float64))

    def cancel(self) -> None:
        """Drop the pending draw (its thread stops at its next chunk and frees what it holds)."""
        _gauss.ahead_start(self._handle, 0, 0, 0.0, False)


def fill_normal(flat: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """Fill the 1-D tensor ``flat`` in place with i.i.d. ``N(0, std^2)`` from ``generator``.

    On CPU, for float32 and float64, the numbers come from dpclip's noise kernel
    (dpclip/_csrc/gauss.c, docs/design.md P11): a counter-based Philox4x32-10 stream keyed by 64
    bits drawn from ``generator``, through a vectorised Box-Muller transform (3.1x faster
    than torch's ``normal_`` per core on AVX-512, 1.5x on AVX2), split over ``torch.get_num_threads()`` threads above
    :data:`KERNEL_SPLIT` numbers. Without the kernel (or for half precision) a large draw is
    split into :data:`NOISE_CHUNK`-number pieces, piece ``k`` drawn by torch's MT19937 seeded
    with the ``k``-th of a vector of 62-bit seeds from ``generator`` (P7). Either way the values
    depend only on ``generator``'s state and ``flat.numel()``, not on the thread count. On CUDA
    (already parallel) and for small torch draws it is one ``normal_`` call.

    Shapes: ``flat [n]``, contiguous. Returns ``flat``.
    """
    if kernel_takes([flat], generator):
        _kernel_draw([flat], std, generator, add=False)
        return flat
    n = flat.numel()
    if flat.device.type != "cpu" or n <= NOISE_CHUNK:
        return flat.normal_(0.0, std, generator=generator)
    seeds = _piece_seeds(n, generator)

    def fill(lo: int, hi: int) -> None:
        for k in range(lo, hi):
            piece = flat[k * NOISE_CHUNK : (k + 1) * NOISE_CHUNK]
            piece.normal_(0.0, std, generator=torch.Generator().manual_seed(seeds[k]))

    in_shares(fill, len(seeds))
    return flat


def _piece_seeds(n: int, generator: torch.Generator) -> list[int]:
    """One 62-bit seed per :data:`NOISE_CHUNK` numbers of a draw of ``n``, from ``generator``."""
    pieces = -(-n // NOISE_CHUNK)
    return torch.randint(0, 1 << 62, (pieces,), generator=generator, dtype=torch.int64).tolist()


def add_normal_(dests: list[torch.Tensor], std: float, generator: torch.Generator) -> None:
    """Add i.i.d. ``N(0, std^2)`` to every entry of ``dests`` (one dtype), in place: exactly
    the numbers :func:`fill_normal` would draw into one flat buffer holding the tensors one
    after the other, in ``dests``' order.

    With the noise kernel (CPU, contiguous float32 or float64) the kernel adds its numbers
    straight into the tensors, each thread a share of the stream: no buffer at all. Otherwise,
    on CPU with contiguous tensors, each :data:`NOISE_CHUNK`-number piece is drawn into a
    cache-resident buffer per thread and added to the slices it covers (P10). In every other
    case (CUDA, strided tensors, a generator on another device) the draw goes into one flat
    buffer that is then added.
    """
    if not dests:
        return
    if kernel_takes(dests, generator):
        _kernel_draw(dests, std, generator, add=True)
        return
    n = sum(t.numel() for t in dests)
    device, dtype = generator.device, dests[0].dtype
    fused = device.type == "cpu" and all(t.device.type == "cpu" and t.is_contiguous() for t in dests)
    if not fused or n == 0:
        flat = fill_normal(torch.empty(n, dtype=dtype, device=device), std, generator)
        offset = 0
        for t in dests:
            t.add_(flat[offset : offset + t.numel()].view(t.shape).to(t.device))
            offset += t.numel()
        return
    flats = [t.view(-1) for t in dests]
    starts = [0]
    for t in flats[:-1]:
        starts.append(starts[-1] + t.numel())

    def add(piece: torch.Tensor, lo: int) -> None:
        hi = lo + piece.numel()
        for t, s in zip(flats, starts):
            a, b = max(lo, s), min(hi, s + t.numel())
            if a < b:
                t[a - s : b - s].add_(piece[a - lo : b - lo])

    if n <= NOISE_CHUNK:  # one normal_ call on the generator itself, as fill_normal
        piece = torch.empty(n, dtype=dtype).normal_(0.0, std, generator=generator)
        with serial(n, piece.device):
            add(piece, 0)
        return
    seeds = _piece_seeds(n, generator)

    def fill(lo: int, hi: int) -> None:
        buffer = torch.empty(NOISE_CHUNK, dtype=dtype)
        for k in range(lo, hi):
            piece = buffer[: min(NOISE_CHUNK, n - k * NOISE_CHUNK)]
            piece.normal_(0.0, std, generator=torch.Generator().manual_seed(seeds[k]))
            add(piece, k * NOISE_CHUNK)

    in_shares(fill, len(seeds))


# ----------------------------------------------------------------------------- generator
def secure_generator(device: torch.device | str | None = None) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` (CPU by default) seeded with 64 bits from ``secrets``.

    What this does and does not buy: the seed cannot be guessed (unlike a fixed seed, a time
    stamp or a process id), but the generator itself is torch's, and neither of torch's
    generators is a cryptographic PRNG. On CPU it is the Mersenne Twister MT19937: linear over
    GF(2), so its whole state follows from 624 consecutive 32-bit outputs, after which every
    past and future draw can be computed. On CUDA it is Philox4x32-10, a counter-based
    generator built for statistical quality and speed, not analysed as a cipher. Either way
    ``manual_seed`` takes 64 bits, so every stream is one of 2^64, which an exhaustive search
    can in principle enumerate. In DP-SGD the noise on a coordinate whose clipped sum the
    adversary knows (an embedding row outside the batch has a zero sum) is released in the
    clear, so outputs of the generator do reach the adversary.

    Hence :class:`SecureGaussianNoise` draws its noise from ``os.urandom`` by default rather
    than from a generator; use this generator for randomness whose outputs are not released
    (e.g. the Poisson sampling) and where an unpredictable seed is what is wanted.

    Args:
        device: where the generator lives (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).
    """
    generator = torch.Generator(device="cpu" if device is None else device)
    generator.manual_seed(secrets.randbits(64))
    return generator


# ----------------------------------------------------------------------------- secure: parameters
# s2: the discrete Gaussian's variance exceeds (sigma * lattice sensitivity)^2 by at least
# _TAIL_VAR; this extra part is what makes it a post-processing of the continuous Gaussian
# mechanism (docs/secure_mode.md, Lemma). eta = 2 sum_k exp(-2 pi^2 s2 k^2) at s2 = 16:
_TAIL_VAR = 16
_ETA = 2.0 * math.exp(-2.0 * math.pi**2 * _TAIL_VAR)  # 1.37e-137; the k >= 2 terms add < 1e-500
_KAPPA = math.log1p(2.0 * _ETA / (1.0 - _ETA))  # 2.75e-137: |log P_secure(z) / P_ideal(z)| per coordinate
_GRID_SENSITIVITY = 2.0**-11  # grid * sqrt(d) <= 2^-11 * sensitivity: rounding adds < 0.05% to the sensitivity
_GRID_TAIL = 2.0**-5  # grid * 4 <= 2^-5 * sigma * sensitivity: the extra variance is < 0.1% of the noise's
_MAX_SCALE = 2.0**40  # lattice std bound: keeps every float64 step of the sampler exact
_SCALE_BITS = 26  # the lattice std has 26 significant bits, so scale**2 is an exact float64


@dataclass(frozen=True)
class SecureNoisePlan:
    """The lattice that :class:`SecureGaussianNoise` uses for one release.

    Attributes:
        grid: ``gamma``, a power of two; every released value is an integer multiple of it.
        scale: ``s``, the std of the integer noise ``Z ~ N_Z(0, s^2)`` (26 significant bits).
        lattice_sensitivity: ``Delta = sensitivity / grid + ceil(sqrt(coordinates))``, an upper
            bound on the L2 change of ``round(x / grid)`` between neighbouring datasets.
        std: ``grid * scale``, the noise std in the units of the sums; between
            ``noise_multiplier * sensitivity`` and 0.15% more.
        coordinates: ``d``, the number of coordinates released together.
    """

    grid: float
    scale: float
    lattice_sensitivity: float
    std: float
    coordinates: int


def _round_up_bits(x: float, bits: int) -> float:
    """The smallest float >= x with at most ``bits`` significant bits (x > 0)."""
    mantissa, exponent = math.frexp(x)
    return math.ldexp(math.ceil(math.ldexp(mantissa, bits)), exponent - bits)


def _secure_plan(sigma: float, sensitivity: float, coordinates: int) -> SecureNoisePlan:
    root = math.isqrt(coordinates)
    if root * root < coordinates:
        root += 1  # ceil(sqrt(d))
    bound = min(sensitivity * _GRID_SENSITIVITY / root, sigma * sensitivity * _GRID_TAIL / math.sqrt(_TAIL_VAR))
    if not (bound > 2.0**-1000 and math.isfinite(bound)):
        raise ValueError(
            f"sensitivity={sensitivity!r} with noise_multiplier={sigma!r} needs a grid of {bound!r}, "
            "outside float64's normal range. Fix: rescale the sums (e.g. a larger max_grad_norm)"
        )
    grid = math.ldexp(1.0, math.frexp(bound)[1] - 1)  # the largest power of two <= bound
    delta = Fraction(sensitivity) / Fraction(grid) + root
    target = Fraction(sigma) ** 2 * delta**2 + _TAIL_VAR  # s^2 must be at least this
    scale = _round_up_bits(math.sqrt(float(target)), _SCALE_BITS)
    while Fraction(scale) ** 2 < target:  # float rounding of the square root: step up until exact
        scale = _round_up_bits(math.nextafter(scale, math.inf), _SCALE_BITS)
    if scale >= _MAX_SCALE:
        raise ValueError(
            f"noise_multiplier={sigma!r} over d={coordinates} coordinates needs a lattice std of {scale:.3g} "
            f"(>= 2^40), beyond what the exact sampler supports. Fix: use a smaller noise_multiplier "
            "or release the coordinates in several calls with a split sensitivity"
        )
    return SecureNoisePlan(grid, scale, float(delta), grid * scale, coordinates)


# ----------------------------------------------------------------------------- secure: random bits
class _OSBits:
    """64-bit words from the operating system's CSPRNG (``os.urandom``: getrandom(2) on Linux)."""

    def words(self, n: int, device: torch.device) -> torch.Tensor:
        data = bytearray(os.urandom(8 * n))
        return torch.frombuffer(data, dtype=torch.int64, count=n).to(device)

    def word(self) -> int:
        return int.from_bytes(os.urandom(8), "little")


class _GeneratorBits:
    """64-bit words from a ``torch.Generator``: reproducible, fast, not cryptographic."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def words(self, n: int, device: torch.device) -> torch.Tensor:
        out = torch.empty(n, dtype=torch.int64, device=self.generator.device)
        return out.random_(-(2**63), None, generator=self.generator).to(device)

    def word(self) -> int:
        return int(self.words(1, self.generator.device).item()) & (2**64 - 1)


# ----------------------------------------------------------------------------- secure: exact sampler
# Relative error bound for every float64 quantity of the fast path below. It must cover
# torch's float64 log and exp (1-2 ulp = 2^-52..2^-51 on CPU (SLEEF) and CUDA; checked per
# device against Python's math to 2^-49 by _check_float64_functions) plus a few correctly
# rounded operations (2^-53 each). 2^-46 leaves a factor 8 over that; a wider margin only
# sends more candidates to the exact (slow) path, never changes the distribution.
_REL = 2.0**-46
_CHECK_REL = 2.0**-49
_U_BITS = 53
_V_BITS = 10
_MASK53 = (1 << 53) - 1
_P_SLACK = 2.0**-39  # relative slack on 1024 p (its float64 error is < 2^-41)
_CHECKED: set[str] = set()
# each refinement draws 64 more bits, after which the comparison stays open with probability
# about 2^-63; 32 refinements in a row happen with probability < 2^-2000
_MAX_REFINE = 32
_REFINE_FAILED = (
    "interval refining did not settle a comparison after 32 x 64 random bits; this happens with "
    "probability < 2^-2000 for uniform bits, so the random source is broken (e.g. it returns constants)"
)


def _check_float64_functions(device: torch.device) -> None:
    """Once per device: torch's float64 ``log``/``exp`` agree with ``math`` to 2^-49 relative."""
    name = str(device)
    if name in _CHECKED:
        return
    gen = torch.Generator().manual_seed(20240607)
    u = torch.exp2(-torch.rand(1024, generator=gen, dtype=torch.float64) * 53)  # (2^-53, 1]
    q = torch.rand(1024, generator=gen, dtype=torch.float64) * 700
    logs = torch.log(u.to(device)).cpu().tolist()
    exps = torch.exp(-q.to(device)).cpu().tolist()
    worst = 0.0
    for a, b in zip(u.tolist(), logs):
        ref = math.log(a)
        if ref != 0.0:
            worst = max(worst, abs(b - ref) / abs(ref))
    for a, b in zip(q.tolist(), exps):
        ref = math.exp(-a)
        worst = max(worst, abs(b - ref) / ref)
    if not worst <= _CHECK_REL:
        raise RuntimeError(
            f"torch's float64 log/exp on {name} differ from Python's math by {worst:.3g} relative, more "
            f"than the 2^-49 that SecureGaussianNoise's exactness argument assumes (they are normally "
            "within 2^-51). Fix: run secure noise on another device (e.g. CPU), or report the torch build"
        )
    _CHECKED.add(name)


def _exact_magnitude(t: float, uw: int, nbits: int, bits) -> int:
    """``floor(-t ln U)`` for ``U`` uniform on ``[uw, uw + 1) / 2^nbits``, exactly (interval refining).

    Python's ``Decimal.ln`` is correctly rounded; every quantity is widened by far more than
    its rounding error, and while the interval of possible values still straddles an integer,
    64 more bits of ``U`` are drawn (Haney et al. 2022 call this interval refining).
    """
    T = Decimal(t)
    for _ in range(_MAX_REFINE):
        with localcontext() as ctx:
            ctx.prec = nbits + 40  # the dyadic end points are exact at this precision
            tol = Decimal(10) ** -(nbits + 30)
            if uw > 0:
                lo = Decimal(uw) / Decimal(2) ** nbits
                hi = Decimal(uw + 1) / Decimal(2) ** nbits
                top = -T * lo.ln() * (1 + tol) + tol
                bottom = (-T * hi.ln() * (1 - tol) - tol) if hi < 1 else Decimal(0)
                m = int(top.to_integral_value(rounding=ROUND_FLOOR))
                if m == int(bottom.to_integral_value(rounding=ROUND_FLOOR)):
                    return m
        uw = (uw << 64) | bits.word()
        nbits += 64
    raise RuntimeError(_REFINE_FAILED)


def _exact_accept(t: float, m: int, vw: int, nbits: int, bits) -> bool:
    """``V < exp(-(m - t)^2 / (2 t^2))`` for ``V`` uniform on ``[vw, vw + 1) / 2^nbits``, exactly."""
    T = Decimal(t)
    for _ in range(_MAX_REFINE):
        with localcontext() as ctx:
            ctx.prec = nbits + 60
            tol = Decimal(10) ** -(nbits + 45)
            diff = Decimal(m) - T
            q = diff * diff / (2 * T * T)
            p = (-q).exp()
            slack = p * (q + 2) * tol + tol
            lo = Decimal(vw) / Decimal(2) ** nbits
            hi = Decimal(vw + 1) / Decimal(2) ** nbits
            if hi <= p - slack:
                return True
            if lo >= p + slack:
                return False
        vw = (vw << 64) | bits.word()
        nbits += 64
    raise RuntimeError(_REFINE_FAILED)


class _Workspace:
    """Reused buffers for :func:`_candidates` (six float64, five bool, one int64)."""

    def __init__(self, n: int, device: torch.device) -> None:
        self.f64 = [torch.empty(n, dtype=torch.float64, device=device) for _ in range(6)]
        self.bool = [torch.empty(n, dtype=torch.bool, device=device) for _ in range(5)]
        self.i64 = torch.empty(n, dtype=torch.int64, device=device)


def _candidates(
    words: torch.Tensor, t: float, bits, stats: dict | None, ws: _Workspace | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One round of Canonne-Kamath-Steinke Algorithm 3 on a batch of candidates.

    Each 64-bit word gives ``U`` (bits 11-63), a sign (bit 10) and the first 10 bits of ``V``
    (bits 0-9). The candidate is ``Y = ±floor(-t ln U)``, a discrete Laplace(t) draw (the
    magnitude is geometric, by inversion; ``(-, 0)`` is rejected so that 0 is not counted
    twice), accepted with probability ``exp(-(|Y| - t)^2 / (2 t^2))``, which makes accepted
    values exactly ``N_Z(0, t^2)`` (CKS 2020, Algorithm 3 with sigma = t). Every decision is
    taken in float64 only where the float64 value is provably on one side of the boundary
    (bounds below). Acceptances still open (~2^-10 of the candidates) get 53 more bits of V,
    again decided in float64; magnitudes still open (~t 2^-44) and acceptances open after 63
    bits (~2^-38) are settled exactly in Python by interval refining.

    Returns:
        (float64 values, bool accepted), one per word; rejected entries' values are arbitrary.
        Both are views of ``ws`` (valid until its next use).
    """
    device = words.device
    f64 = torch.float64
    k = words.numel()
    ws = _Workspace(k, device) if ws is None else ws
    uwf, v, g, err, m, tmp = (buf[:k] for buf in ws.f64)
    resolved, negative, accept, reject, zero = (buf[:k] for buf in ws.bool)
    ints = ws.i64[:k]
    # every op writes into the reused workspace: fresh megabyte tensors would cost a page fault
    # per 4 KiB, more than the arithmetic
    uwf.copy_(torch.bitwise_right_shift(words, 11, out=ints).bitwise_and_(_MASK53))
    v.copy_(torch.bitwise_and(words, (2 << _V_BITS) - 1, out=ints))  # sign bit and V's 10 bits
    torch.ge(v, 2.0**_V_BITS, out=negative)
    v.fmod_(2.0**_V_BITS)  # V in [v, v + 1) 2^-10
    # Magnitude floor(g(U)), g(U) = -t ln U, decreasing. U in [uw, uw + 1) 2^-53 puts g(U) in
    # [g(u) - t ln(1 + 1/uw), g(u)], and ln(1 + 1/uw) <= 1/uw; the float64 g has relative
    # error < 2^-48 (log, one product). So g(U) lies in [g - err, g + err].
    torch.mul(uwf, 2.0**-_U_BITS, out=g).log_().mul_(-t)  # +inf for uw == 0
    torch.reciprocal(uwf, out=err).mul_(t * (1 + _REL)).add_(g, alpha=_REL)  # inf for uw == 0
    torch.add(g, err, out=m).floor_()
    torch.ge(g.sub_(err), m, out=resolved)  # floor(g - err) == m; NaN (uw == 0): unresolved
    # Acceptance: V < p = exp(-q), q = (m - t)^2 / (2 t^2). m - t and 2 t^2 are exact (t has
    # 26 significant bits, m <= 37 t); q has relative error <= 2^-52, and with q <= 680 and
    # exp within 2^-49, P = 1024 p has relative error < 2^-41: slack 2^-39 P (+ underflow).
    q = torch.sub(m, t, out=err)
    q.mul_(q).div_(2.0 * t * t).neg_()
    big_p = torch.exp(q, out=g).mul_(2.0**_V_BITS)
    slack = torch.mul(big_p, _P_SLACK, out=err).add_(2.0**-990)
    torch.le(v, torch.sub(big_p, slack, out=tmp).sub_(1.0), out=accept)  # v + 1 <= P - slack
    torch.ge(v, torch.add(big_p, slack, out=tmp), out=reject)
    torch.eq(m, 0.0, out=zero).logical_and_(negative)  # "-0": the discrete Laplace's double-counted zero
    reject.logical_or_(zero)
    accept.logical_and_(resolved).logical_and_(zero.logical_not_())
    refine = torch.logical_or(accept, reject, out=zero).logical_not_().logical_and_(resolved)
    value = tmp.copy_(negative).mul_(-2.0).add_(1.0).mul_(m)  # (-1)^negative m
    exact_idx = (~resolved).nonzero().squeeze(1)
    ext_idx = exact_idx[:0]
    ext_v = None
    ref_idx = refine.nonzero().squeeze(1)
    if ref_idx.numel():
        # 53 more bits of V: V = (v + (w2 + [0, 1)) 2^-53) 2^-10 < p  <=>  (w2 + [0, 1)) 2^-53 < r,
        # r = P - v, whose float64 error is at most slack + |r| 2^-52
        w2 = (bits.words(ref_idx.numel(), device) >> 11) & _MASK53
        r = big_p[ref_idx] - v[ref_idx]
        r_err = slack[ref_idx] + r.abs() * 2.0**-52
        w2f = w2.to(f64) * 2.0**-53
        yes = (w2f + 2.0**-53) <= (r - r_err)
        no = w2f >= (r + r_err)
        accept[ref_idx] = yes
        open_ = ~(yes | no)
        ext_idx = ref_idx[open_]
        ext_v = (v[ext_idx].to(torch.int64) << 53) | w2[open_]  # all 63 bits of V so far
    if exact_idx.numel() or ext_idx.numel():
        # exact resolution in Python: a handful of candidates per call
        ok, vals = [], []
        for uw, neg, vw in zip(
            ((words[exact_idx] >> 11) & _MASK53).tolist(),
            negative[exact_idx].tolist(),
            (words[exact_idx] & ((1 << _V_BITS) - 1)).tolist(),
        ):
            magnitude = _exact_magnitude(t, uw, _U_BITS, bits)
            ok.append(not (neg and magnitude == 0) and _exact_accept(t, magnitude, vw, _V_BITS, bits))
            vals.append(-magnitude if neg else magnitude)
        for mag, vw in zip(m[ext_idx].tolist(), ext_v.tolist() if ext_v is not None else []):
            ok.append(_exact_accept(t, int(mag), vw, _V_BITS + 53, bits))
        idx = torch.cat([exact_idx, ext_idx])
        accept[idx] = torch.tensor(ok, dtype=torch.bool, device=device)
        value[exact_idx] = torch.tensor(vals, dtype=f64, device=device)
    if stats is not None:
        stats["candidates"] = stats.get("candidates", 0) + words.numel()
        stats["accepted"] = stats.get("accepted", 0) + int(accept.sum())
        stats["refined"] = stats.get("refined", 0) + int(ref_idx.numel())
        stats["exact"] = stats.get("exact", 0) + int(exact_idx.numel())
        stats["exact_v"] = stats.get("exact_v", 0) + int(ext_idx.numel())
    return value, accept


def _chunk_size(device: torch.device) -> int:
    return 1 << 22 if device.type == "cuda" else 1 << 16


def _discrete_gaussian(
    n: int, scale: float, device: torch.device, bits, stats: dict | None = None
) -> torch.Tensor:
    """``n`` i.i.d. exact draws of ``N_Z(0, scale^2)`` as a float64 tensor on ``device``.

    ``scale`` must have at most 26 significant bits and lie in [1, 2^40). Candidates are
    drawn in chunks and the accepted ones taken in order, so which values are kept never
    depends on the values themselves.
    """
    out = torch.empty(n, dtype=torch.float64, device=device)
    filled = 0
    chunk = _chunk_size(device)
    ws = _Workspace(min(chunk, n + n // 3 + 32), device)
    while filled < n:
        need = n - filled
        k = min(chunk, need + need // 3 + 32)  # acceptance is about 0.76
        value, accept = _candidates(bits.words(k, device), scale, bits, stats, ws)
        kept = value[accept][:need]
        out[filled : filled + kept.numel()] = kept
        filled += kept.numel()
    return out


# ----------------------------------------------------------------------------- secure: the mechanism
@dataclass(frozen=True)
class SecureGaussianNoise:
    """Gaussian noise that floating-point attacks cannot see through, with exact sampling.

    For sums ``x`` (all keys together, ``d`` coordinates) with L2 sensitivity ``S`` it
    releases, per coordinate,

        ``y = grid * (round(x / grid) + Z)``,   ``Z ~ N_Z(0, s^2)`` i.i.d. (discrete Gaussian),

    computed as: ``x / grid`` in float64 (exact: ``grid`` is a power of two), rounded to the
    nearest integer (ties to even), ``Z`` added in float64 (integers, exact below 2^53), the
    result scaled by ``grid`` (exact) and cast to the sum's dtype. Every step after ``round``
    is a fixed function of the integer ``n = round(x / grid) + Z``, so the released float
    carries nothing about ``x`` beyond ``n``: the attack of Mironov (2012) and Jin et al.
    (2022), which reads ``x`` off the set of floats that ``x + noise`` can reach, has nothing
    to read. Parameters (:meth:`plan`): ``grid`` is the largest power of two with
    ``grid * sqrt(d) <= 2^-11 S`` and ``4 grid <= 2^-5 sigma S``; the lattice sensitivity is
    ``Delta = S / grid + ceil(sqrt(d))`` (rounding moves each coordinate by at most 1/2);
    ``s^2 >= (sigma Delta)^2 + 16``.

    Guarantee. ``Z`` is an exact sample of the discrete Gaussian (Canonne, Kamath, Steinke 2020,
    Algorithm 3 with the discrete Laplace drawn by inversion; every comparison is certified
    in float64 or settled in exact decimal arithmetic by interval refining, Haney et al. 2022),
    given uniform random bits and torch's float64 ``log``/``exp`` within 2^-49 relative (checked
    once per device). Writing ``s^2 = (sigma Delta)^2 + s_2^2`` with ``s_2 >= 4``, the released
    integer vector's distribution is, pointwise within a factor ``exp(±d kappa)`` with
    ``kappa < 3e-137``, that of a data-independent post-processing of the *continuous* Gaussian
    mechanism ``round(x / grid) + N(0, (sigma Delta)^2 I)`` (Poisson summation; proof in
    docs/secure_mode.md). That mechanism has noise multiplier ``sigma`` for sensitivity
    ``Delta``, so every (epsilon, delta) an accountant proves for the (subsampled, composed)
    continuous Gaussian mechanism with multiplier ``sigma`` holds for T secure releases as
    ``(epsilon + 2 T d kappa, exp(T d kappa) delta)``: no privacy cost below 1e-100 for any
    T d < 1e30. The noise std ``grid * s`` is between ``sigma S`` and 0.15% more; rounding
    biases each coordinate by at most ``grid / 2``.

    Not covered: ``S`` must bound the change of the float tensors actually passed in
    (floating-point summation of clipped gradients can exceed the real-arithmetic bound;
    Casacuberta et al. 2022); timing (rejection sampling takes a random number of rounds, which
    is independent of the accepted values; the rare exact fallbacks are more likely for large
    ``|Z|``, an aggregate signal over all coordinates; no constant-time claim, cf. Jin et al.
    2022); the generator of the Poisson sampling; a non-finite sum raises instead of being
    released (the exception itself is data-dependent).

    Randomness. With ``source="os"`` (the default) the bits come from ``os.urandom`` and the
    ``generator`` argument of :meth:`add` is not used: torch's generators are not
    cryptographic (see :func:`secure_generator`), and released noise values give an adversary
    their outputs. ``source="generator"`` draws the same algorithm's bits from ``generator``
    instead: reproducible and about 1.5x faster (no system calls), but only as unpredictable as
    that generator.

    Args:
        noise_multiplier: sigma, the noise std divided by the sensitivity; 0 adds no noise (and
            does no rounding).
        source: ``"os"`` or ``"generator"``, where the random bits come from.
    """

    noise_multiplier: float
    source: str = "os"

    def __post_init__(self) -> None:
        object.__setattr__(self, "noise_multiplier", _check_multiplier(self.noise_multiplier))
        if self.source not in ("os", "generator"):
            raise ValueError(
                f"source must be 'os' (operating-system CSPRNG, the default) or 'generator' "
                f"(the torch.Generator passed to add); got {self.source!r}"
            )

    def std(self, sensitivity: float) -> float:
        """The nominal std ``noise_multiplier * sensitivity``; :meth:`plan` gives the exact one
        (at most 0.15% larger)."""
        return GaussianNoise(self.noise_multiplier).std(sensitivity)

    def plan(self, sensitivity: float, coordinates: int) -> SecureNoisePlan:
        """The grid and the discrete Gaussian's scale for ``coordinates`` values released together.

        Raises:
            ValueError: no noise (noise_multiplier or sensitivity 0: nothing to plan), an
                invalid sensitivity, or settings beyond the sampler's range.
        """
        std = self.std(sensitivity)
        if isinstance(coordinates, bool) or not isinstance(coordinates, int) or coordinates < 1:
            raise ValueError(f"coordinates must be an int >= 1; got {coordinates!r}")
        if std == 0.0:
            raise ValueError(
                "no noise to plan: noise_multiplier or sensitivity is 0, and add() then returns the sums unchanged"
            )
        return _secure_plan(self.noise_multiplier, float(sensitivity), coordinates)

    def add(
        self,
        sums: Mapping[object, torch.Tensor],
        sensitivity: float,
        generator: torch.Generator | None = None,
        *,
        stats: dict | None = None,
    ) -> dict[object, torch.Tensor]:
        """``{key: grid * (round(sum / grid) + Z)}`` as new tensors (dtype, shape, device kept).

        All keys are one release: ``sensitivity`` bounds the L2 change of all sums together.
        Without noise (``std == 0``) each sum is returned as an exact copy.

        Args:
            sums: ``{key: floating-point tensor}``.
            sensitivity: the L2 sensitivity ``S`` of all sums together.
            generator: used only with ``source="generator"`` (then required).
            stats: if given, counters are added to it: ``candidates`` drawn and ``accepted``, ``refined``
                (acceptance decided with 53 more bits of V), ``exact`` (magnitude settled in
                Python) and ``exact_v`` (acceptance settled in Python).

        Raises:
            TypeError: ``sums`` is not a mapping of floating-point tensors; a missing or wrong
                ``generator`` with ``source="generator"``.
            ValueError: an invalid ``sensitivity``; a NaN or infinite value in ``sums``.
        """
        items = _check_sums(sums)
        std = self.std(sensitivity)
        d = sum(value.numel() for _, value in items)
        if std == 0.0 or d == 0:
            return {key: value.clone() for key, value in items}
        for key, value in items:
            if not bool(torch.isfinite(value).all()):
                raise ValueError(
                    f"sums[{key!r}] contains NaN or infinite values; secure noise rounds every value to "
                    "an integer grid and cannot release them. Fix: find where training diverged "
                    "(e.g. a smaller learning rate); a clipped sum is finite by construction"
                )
        if self.source == "generator":
            device = _generator_device(generator)
            bits = _GeneratorBits(generator)
        else:
            if generator is not None:
                _generator_device(generator)  # a wrong type is still a caller's bug
            device = items[0][1].device
            bits = _OSBits()
        _check_float64_functions(device)
        plan = _secure_plan(self.noise_multiplier, float(sensitivity), d)
        z = _discrete_gaussian(d, plan.scale, device, bits, stats)
        out: dict[object, torch.Tensor] = {}
        offset = 0
        limit = 2.0**62  # clamping x / grid is 1-Lipschitz: it never increases the sensitivity
        for key, value in items:
            noise = z[offset : offset + value.numel()].view(value.shape).to(value.device)
            offset += value.numel()
            n = value.to(torch.float64).div(plan.grid).round_().clamp_(-limit, limit).add_(noise)
            out[key] = n.mul_(plan.grid).to(value.dtype)
        return out
