"""dpclip._gauss (dpclip/_csrc/gauss.c): the CPU noise kernel against an independent reference.

The reference is written here from the papers: Philox4x32-10 in pure Python (Salmon et al.,
SC 2011), checked against the published known-answer vectors, and the Box-Muller transform of
its words in numpy float64, following the layout documented in gauss.c. Every instruction set
the machine has is checked (the tests switch the kernel to it and back).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import dpclip.noise as noise_module

gauss = noise_module._gauss
pytestmark = pytest.mark.skipif(gauss is None, reason="dpclip was installed without the noise kernel")

M32 = 0xFFFFFFFF


def philox4x32_10(counter, key):
    """Philox4x32-10 of one 4-word counter under a 2-word key (Salmon et al. 2011, Fig. 2)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & M32, (p0 >> 32) ^ c3 ^ k1, p0 & M32
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return [c0, c1, c2, c3]


def reference_words(key: int, batches: range) -> np.ndarray:
    """The kernel's word stream: batch q = blocks 64q .. 64q+63, word i of block 64q+j at 256q + 64i + j."""
    out = []
    for q in batches:
        batch = np.zeros((4, 64), dtype=np.uint64)
        for j in range(64):
            b = 64 * q + j
            batch[:, j] = philox4x32_10([b & M32, b >> 32, 0, 0], [key & M32, key >> 32])
        out.append(batch.reshape(-1))
    return np.concatenate(out)


def reference_normals(key: int, batches: range, is_f64: bool) -> np.ndarray:
    """Box-Muller of the reference words in float64, as gauss.c specifies for each dtype."""
    out = []
    for q in batches:
        w = reference_words(key, range(q, q + 1))
        if is_f64:
            a = (w[:64] << np.uint64(20)) ^ (w[64:128] >> np.uint64(12))
            b = (w[128:192] << np.uint64(20)) ^ (w[192:] >> np.uint64(12))
            u1 = 1.0 - a.astype(np.float64) * 2.0**-52
            u2 = b.astype(np.float64) * 2.0**-52
        else:
            u1 = (w[:128].astype(np.float32).astype(np.float64) + 0.5) * 2.0**-32
            u1 = u1.astype(np.float32).astype(np.float64)
            u2 = (w[128:] >> np.uint64(8)).astype(np.float64) * 2.0**-24
        r = np.sqrt(-2.0 * np.log(u1))
        out.append(np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)]))
    return np.concatenate(out)


def isas() -> list[str]:
    names = ["generic"]
    if gauss is None:  # collected without the kernel: every test here is skipped
        return names
    for name in ("avx2", "best"):
        try:
            got = gauss.set_isa(name)
        except ValueError:
            continue
        if got not in names:
            names.append(got)
    gauss.set_isa("best")
    return names


@pytest.fixture(params=isas())
def isa(request):
    got = gauss.set_isa("avx2" if request.param == "avx2" else "best" if request.param != "generic" else "generic")
    assert got == request.param
    yield got
    gauss.set_isa("best")


def fill(n: int, start: int, key: int, std: float, dtype=torch.float32, add_to=None) -> torch.Tensor:
    out = torch.zeros(n, dtype=dtype) if add_to is None else add_to.clone()
    gauss.fill([out.data_ptr()], [n], start, key, std, dtype == torch.float64, add_to is not None)
    return out


def test_philox_known_answers():
    """The three known-answer vectors published with Random123 for philox4x32_10."""
    assert philox4x32_10([0, 0, 0, 0], [0, 0]) == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert philox4x32_10([M32] * 4, [M32, M32]) == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    pi = [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344]
    assert philox4x32_10(pi, [0xA4093822, 0x299F31D0]) == [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


@pytest.mark.parametrize("key", [0, 12345, (1 << 64) - 1, 0xDEADBEEF << 32])
@pytest.mark.parametrize("start", [0, 5, 256 * 3 - 7])
def test_words_are_philox(isa, key, start):
    n = 700
    got = torch.empty(n, dtype=torch.int32)
    gauss.words(got.data_ptr(), n, start, key)
    want = reference_words(key, range(start // 256, (start + n) // 256 + 1))
    assert np.array_equal(got.numpy().view(np.uint32), want[start % 256 : start % 256 + n].astype(np.uint32))


def test_block_counter_carries_into_the_high_word(isa):
    """Blocks past 2^32 (numbers past 2^34): the high half of the block counter is word c1."""
    q = (1 << 32) // 64 - 1  # the batch that ends at block 2^32 - 1, and the next
    start = q * 256
    got = torch.empty(512, dtype=torch.int32)
    gauss.words(got.data_ptr(), 512, start, 77)
    assert np.array_equal(got.numpy().view(np.uint32), reference_words(77, range(q, q + 2)).astype(np.uint32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("start", [0, 3, 1000])
def test_normals_are_box_muller_of_the_words(isa, dtype, start):
    is_f64 = dtype == torch.float64
    per = 128 if is_f64 else 256
    n, key, std = 1500, 99, 2.5
    got = fill(n, start, key, std, dtype).numpy().astype(np.float64)
    want = std * reference_normals(key, range(start // per, (start + n) // per + 1), is_f64)
    want = want[start % per : start % per + n]
    # float32: the vector log/sin/cos are within a few ulp; float64 likewise
    tol = 4e-6 * std if not is_f64 else 1e-13 * std
    assert np.abs(got - want).max() <= tol * np.maximum(1.0, np.abs(want)).max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_segments_and_offsets_are_slices_of_one_stream(isa, dtype):
    """Any split into segments and start offsets gives the same numbers bit for bit, and add
    mode adds exactly the numbers write mode writes."""
    n, key = 3000, 4242
    whole = fill(n, 0, key, 1.7, dtype)
    for cut in ([1, 255, 256, 2488], [700, 0, 2300], [3000], [129, 127, 2744]):
        parts = [torch.full((c,), float("nan"), dtype=dtype) for c in cut]
        gauss.fill([p.data_ptr() if p.numel() else 1 for p in parts], cut, 0, key, 1.7, dtype == torch.float64, False)
        assert torch.equal(torch.cat(parts), whole)
    for start in (1, 255, 256, 1001):
        assert torch.equal(fill(n - start, start, key, 1.7, dtype), whole[start:])
    base = torch.randn(n, dtype=dtype, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fill(n, 0, key, 1.7, dtype, add_to=base), base + whole)


def test_instruction_sets_agree():
    """Every instruction set gives the same stream up to the math libraries' last bits."""
    names = isas()
    draws = {}
    for name in names:
        gauss.set_isa("avx2" if name == "avx2" else "best" if name != "generic" else "generic")
        draws[name] = (fill(5000, 17, 8, 1.0, torch.float32), fill(5000, 17, 8, 1.0, torch.float64))
    gauss.set_isa("best")
    first = draws[names[0]]
    for name in names[1:]:
        assert (draws[name][0] - first[0]).abs().max().item() < 1e-5
        assert (draws[name][1] - first[1]).abs().max().item() < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_distribution_is_standard_normal(isa, dtype):
    """1M numbers: moments, the Kolmogorov-Smirnov distance, and the tail mass beyond 3 and 4
    standard deviations, at tolerances that a correct sampler fails with probability < 1e-4."""
    n = 1 << 20
    x = fill(n, 0, 2024, 1.0, dtype).double()
    assert abs(x.mean().item()) < 4.5 / math.sqrt(n)
    assert abs(x.var().item() - 1.0) < 4.5 * math.sqrt(2.0 / n)
    assert abs((x**4).mean().item() - 3.0) < 4.5 * math.sqrt(96.0 / n)
    assert abs((x**3).mean().item()) < 4.5 * math.sqrt(15.0 / n)
    s = torch.sort(x).values
    cdf = 0.5 * (1 + torch.erf(s / math.sqrt(2)))
    emp_hi = torch.arange(1, n + 1, dtype=torch.float64) / n
    ks = torch.maximum(emp_hi - cdf, cdf - (emp_hi - 1.0 / n)).max().item()
    assert ks < 1.95 / math.sqrt(n)  # the 0.1% critical value
    for k in (3.0, 4.0):
        p = math.erfc(k / math.sqrt(2))
        count = (x.abs() > k).sum().item()
        assert abs(count - n * p) < 4.5 * math.sqrt(n * p)


def test_tails_reach_past_torchs_float32_draw():
    """The float32 stream's uniforms have 32 bits (largest |z| 6.77), torch's 24 (5.77);
    float64's have 52 (8.49). Checked on the largest values the formulas allow."""
    assert math.sqrt(-2 * math.log(0.5 * 2.0**-32)) == pytest.approx(6.77, abs=0.01)
    assert math.sqrt(-2 * math.log(2.0**-52)) == pytest.approx(8.49, abs=0.01)
    x = fill(1 << 22, 0, 5, 1.0, torch.float32)
    assert x.abs().max().item() <= 6.78
    assert x.abs().max().item() > 4.5  # 4M draws reach 4.5 with probability > 0.97


def test_keys_give_independent_streams():
    """Streams of different keys (also keys that differ only in the high 32 bits) are
    uncorrelated, and none repeats another shifted by a batch."""
    n = 1 << 16
    keys = [1, 2, 1 + (1 << 32), (1 << 63) + 1]
    rows = torch.stack([fill(n, 0, k, 1.0, torch.float64) for k in keys] + [fill(n, 256, 1, 1.0, torch.float64)])
    corr = torch.corrcoef(rows)
    off = corr[~torch.eye(len(rows), dtype=torch.bool)]
    assert off.abs().max().item() < 5 / math.sqrt(n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_threads_split_one_stream(isa, dtype):
    """The kernel's own threads (1-7, more than there are batches too) each take a share of
    whole batches: over several segments, with any start offset, in write and in add mode,
    the numbers are bit for bit those of one thread."""
    key = 77
    for cut, start in (([3000], 0), ([1, 255, 256, 2488], 0), ([700, 0, 2300], 301), ([5], 1001)):
        n = sum(cut)
        whole = fill(n, start, key, 0.9, dtype)
        base = torch.randn(n, dtype=dtype, generator=torch.Generator().manual_seed(1))
        for threads in (1, 2, 3, 7):
            parts = [torch.full((c,), float("nan"), dtype=dtype) for c in cut]
            addresses = [p.data_ptr() if p.numel() else 1 for p in parts]
            gauss.fill(addresses, cut, start, key, 0.9, dtype == torch.float64, False, threads)
            assert torch.equal(torch.cat(parts), whole), (cut, start, threads)
            parts = list(base.clone().split(cut))
            gauss.fill([p.data_ptr() if p.numel() else 1 for p in parts], cut, start, key, 0.9,
                       dtype == torch.float64, True, threads)
            assert torch.equal(torch.cat(parts), base + whole), (cut, start, threads)


def test_bad_arguments_are_refused():
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="addresses but"):
        gauss.fill([x.data_ptr()], [4, 4], 0, 1, 1.0, False, False)
    with pytest.raises(ValueError, match="null address"):
        gauss.fill([0], [4], 0, 1, 1.0, False, False)
    with pytest.raises(ValueError, match="counts"):
        gauss.fill([x.data_ptr()], [-1], 0, 1, 1.0, False, False)
    with pytest.raises(ValueError, match="threads"):
        gauss.fill([x.data_ptr()], [4], 0, 1, 1.0, False, False, 0)
    with pytest.raises(ValueError, match="set_isa"):
        gauss.set_isa("sse9")
    assert gauss.isa() in ("avx512", "avx2", "generic")


# ----------------------------------------------------------------------------- drawn ahead (P14)
def _wait_filled(handle, n: int, timeout: float = 20.0) -> bool:
    """Wait until the background thread has finished all ``n`` numbers (it runs at idle
    priority: on a busy machine it may not get there, and the caller then skips that check)."""
    import time

    end = time.monotonic() + timeout
    while gauss.ahead_filled(handle) < n:
        if time.monotonic() > end:
            return False
        time.sleep(0.002)
    return True


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ahead_adds_the_numbers_fill_would_however_far_its_thread_got(isa, dtype):
    """ahead_add equals fill(add=True) bit for bit, with the draw not started, just started,
    finished, over segments that straddle the 8192- (4096-) number chunks, on 1-3 threads; the
    numbers taken from the buffer are counted."""
    key, std, is_f64 = 0xDEADBEEF12345, 0.37, dtype == torch.float64
    cuts = ([40000], [1, 8191, 8192, 9, 20000, 3], [4095, 4097, 0, 31000])
    handle = gauss.ahead_new()
    for cut in cuts:
        n = sum(cut)
        base = torch.randn(n, dtype=dtype, generator=torch.Generator().manual_seed(2))
        expected = fill(n, 0, key, std, dtype, add_to=base)
        for when in ("none", "now", "done"):
            for threads in (1, 2, 3):
                if when != "none":
                    assert gauss.ahead_start(handle, n, key, std, is_f64)
                finished = when == "done" and _wait_filled(handle, n)
                parts = list(base.clone().split(cut))
                taken = gauss.ahead_add(handle, [p.data_ptr() if p.numel() else 1 for p in parts], cut, key, std,
                                        is_f64, threads)
                assert torch.equal(torch.cat(parts), expected), (cut, when, threads)
                assert 0 <= taken <= n
                if when == "none":
                    assert taken == 0  # nothing pending (the last draw was used)
                if finished:
                    assert taken == n
    del handle


def test_ahead_ignores_a_draw_that_is_not_this_one():
    """A pending draw for another key, std, size or dtype, one superseded by a later start, a
    cancelled one, or one begun on another instruction set is not used: every number is computed
    in the add, and the result is still exactly fill's."""
    n, key, std = 50000, 99, 1.5
    base = torch.randn(n, generator=torch.Generator().manual_seed(3))
    expected = fill(n, 0, key, std, add_to=base)
    handle = gauss.ahead_new()

    def add(k=key, s=std, count=n):
        out = base.clone()
        taken = gauss.ahead_add(handle, [out.data_ptr()], [count], k, s, False, 2)
        return out, taken

    for pending in ((n, key + 1, std, False), (n, key, 1.25, False), (n - 1, key, std, False), (n, key, std, True)):
        assert gauss.ahead_start(handle, *pending)  # (count, key, std, is_f64)
        _wait_filled(handle, pending[0], timeout=5.0)
        out, taken = add()
        assert taken == 0 and torch.equal(out, expected), pending
    gauss.ahead_start(handle, n, key + 5, std, False)
    gauss.ahead_start(handle, n, key, std, False)  # supersedes the first
    out, taken = add()
    assert torch.equal(out, expected)
    gauss.ahead_start(handle, n, key, std, False)
    gauss.ahead_start(handle, 0, 0, 0.0, False)  # cancels
    out, taken = add()
    assert taken == 0 and torch.equal(out, expected)
    other = [name for name in isas() if name != gauss.isa()]
    if other:
        gauss.ahead_start(handle, n, key, std, False)
        _wait_filled(handle, n, timeout=5.0)
        gauss.set_isa("generic" if other[0] == "generic" else other[0] if other[0] == "avx2" else "best")
        try:
            out, taken = add()
            assert taken == 0
            assert torch.equal(out, fill(n, 0, key, std, add_to=base))  # this instruction set's numbers
        finally:
            gauss.set_isa("best")


def test_ahead_handle_dropped_while_its_thread_draws():
    """Dropping a handle with a large draw under way neither waits nor crashes; the thread
    frees what it holds when it stops. Many handles in a row, each with its own thread."""
    import gc

    for i in range(20):
        handle = gauss.ahead_new()
        assert gauss.ahead_start(handle, 1 << 22, i, 1.0, False)
        if i % 2:
            gauss.ahead_start(handle, 1 << 21, i + 1, 1.0, True)  # replaced while the first is drawn
        del handle
        gc.collect()
    handle = gauss.ahead_new()
    n = 40000
    gauss.ahead_start(handle, n, 5, 2.0, False)
    out = torch.zeros(n)
    gauss.ahead_add(handle, [out.data_ptr()], [n], 5, 2.0, False, 2)
    assert torch.equal(out, fill(n, 0, 5, 2.0))


def test_ahead_bad_arguments_are_refused():
    handle = gauss.ahead_new()
    x = torch.zeros(4)
    with pytest.raises(ValueError, match="addresses but"):
        gauss.ahead_add(handle, [x.data_ptr()], [4, 4], 1, 1.0, False)
    with pytest.raises(ValueError, match="null address"):
        gauss.ahead_add(handle, [0], [4], 1, 1.0, False)
    with pytest.raises(ValueError, match="threads"):
        gauss.ahead_add(handle, [x.data_ptr()], [4], 1, 1.0, False, 0)
    with pytest.raises(ValueError, match="out of range"):
        gauss.ahead_start(handle, 1 << 62, 1, 1.0, False)
    with pytest.raises(ValueError):  # not a handle
        gauss.ahead_start(object(), 4, 1, 1.0, False)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="no fork here")
def test_ahead_in_a_forked_child_draws_nothing_ahead_and_stays_exact():
    """A fork's child (a DataLoader worker, say) inherits the handle but not its thread: there
    ahead_start starts nothing, ahead_add still adds exactly fill's numbers, and dropping the
    handle neither waits nor locks (its lock may have been held at the fork)."""
    import os

    n, key = 40000, 17
    handle = gauss.ahead_new()
    assert gauss.ahead_start(handle, n, key, 1.0, False)
    expected = fill(n, 0, key + 1, 1.0)
    want = expected.numpy().tobytes()
    pid = os.fork()
    if pid == 0:  # the child: numpy only (torch's OpenMP pool does not survive a fork), exit status
        ok = False
        try:
            started = gauss.ahead_start(handle, n, key + 1, 1.0, False)
            out = np.zeros(n, dtype=np.float32)
            gauss.ahead_add(handle, [out.ctypes.data], [n], key + 1, 1.0, False, 2)
            ok = not started and out.tobytes() == want
            del handle
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    out = torch.zeros(n)  # the parent's handle is untouched
    gauss.ahead_add(handle, [out.data_ptr()], [n], key, 1.0, False, 2)
    assert torch.equal(out, fill(n, 0, key, 1.0))
