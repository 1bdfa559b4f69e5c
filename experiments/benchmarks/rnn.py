"""Per-sample LSTM gradients: the exact loop against the batched recomputation (docs/design.md E6).

    .venv/bin/python experiments/benchmarks/rnn.py [--threads 2]

Prints the best of 5 timings (ms) for LSTM(32->64), B=64, T=20, float32: the per-sample loop,
the batched recomputation (with and without its output check) and one native batched
forward+backward, plus the speed-up of the batched path over the loop.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from dpclip.grad_sample.rnn import rnn_per_sample_grads_batched
from dpclip.grad_sample.vmap import rnn_per_sample_grads


def best(f, n: int = 5) -> float:
    f()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        times.append(time.perf_counter() - t0)
    return min(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(12)
    lstm = nn.LSTM(32, 64, batch_first=True)
    x = torch.randn(64, 20, 32)
    out, _ = lstm(x)
    go = (torch.randn_like(out), None)

    def native_step() -> None:
        lstm.zero_grad()
        o, _ = lstm(x)
        o.backward(go[0])

    t_loop = best(lambda: rnn_per_sample_grads(lstm, (x,), go))
    t_batched = best(lambda: rnn_per_sample_grads_batched(lstm, (x,), go))
    t_nocheck = best(lambda: rnn_per_sample_grads_batched(lstm, (x,), go, check_output=False))
    t_native = best(native_step)
    print(
        f"LSTM(32->64) B=64 T=20, {args.threads} threads: loop {t_loop:.1f} ms, batched {t_batched:.1f} ms "
        f"(without output check {t_nocheck:.1f} ms), native forward+backward {t_native:.1f} ms; "
        f"speed-up {t_loop / t_batched:.1f}x"
    )


if __name__ == "__main__":
    main()
