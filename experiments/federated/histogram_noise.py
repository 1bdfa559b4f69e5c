"""Clip controllers fed privatised statistics of a FIXED norm distribution (no training).

    python experiments/federated/histogram_noise.py

Each round, 20 units with norms log-normal around 1 (``exp(0.3 N(0, 1))``: median 1, 10th
percentile about 0.68, mean + 2.5 std about 1.9) are released through
``dpclip.controllers.release_statistics``, exactly as DP-FedAvg releases them. The noise
multipliers are those of ``controllers.py``: sigma for epsilon 8 and 1 with 50 rounds at
q = 0.2, and sigma_c = 3 sigma (plus 10 sigma, for comparison). The script prints each
controller's threshold after rounds 10, 20, 30, 40 and 50, then MultiObjective's next threshold from an
exact histogram.

A controller that reads its statistics well should stay near its target. Drift here comes
from the statistics' noise alone, because the norms do not change.
"""

import torch

from dpclip.controllers import PrivateAutoClip, PrivateZClip, Quantile, release_statistics
from dpclip.noise import GaussianNoise

torch.set_num_threads(1)
g = torch.Generator().manual_seed(0)
for sigma, ratio in ((1.152, 3.0), (1.152, 10.0), (5.544, 3.0)):
    for ctl in (PrivateZClip(count_noise_multiplier=ratio * sigma), PrivateAutoClip(count_noise_multiplier=ratio * sigma),
                Quantile(count_noise_multiplier=ratio * sigma)):
        clip = (1.0,)
        traj = []
        for t in range(50):
            norms = torch.exp(0.3 * torch.randn(20, 1, generator=g, dtype=torch.float64))
            stats = release_statistics(ctl, norms, clip, 20.0, sigma,
                                       lambda s, v, sens: GaussianNoise(s).add(v, sens, g), dimension=50890)
            clip = ctl.update(clip, stats)
            traj.append(clip[0])
        print(f"sigma={sigma} sigma_c={ratio:g}*sigma {type(ctl).__name__:16s} C after rounds 10..50:",
              [f"{traj[i]:.3g}" for i in (9, 19, 29, 39, 49)])

# MultiObjective on an exact (noise-free) histogram: all 20 units at norm ~C, d = 50,890, B = 20
from dpclip.controllers import DEFAULT_EDGES, ClipStatistics, MultiObjective  # noqa: E402

hist = [0.0] * len(DEFAULT_EDGES)
hist[9] = hist[10] = 0.5  # the bins just below and above C
for sigma_grad in (1.222, 5.881):
    stats = ClipStatistics((), 20.0, histogram=(tuple(hist),), edges=DEFAULT_EDGES, clip=(1.0,),
                           noise_multiplier=sigma_grad, dimension=50890, count_noise_std=0.0)
    print(f"MultiObjective, exact histogram at C, sigma_grad={sigma_grad}: next C =",
          MultiObjective().update((1.0,), stats)[0])
empty = ClipStatistics((), 20.0, histogram=((0.0,) * len(DEFAULT_EDGES),), edges=DEFAULT_EDGES, clip=(1.0,),
                       noise_multiplier=1.222, dimension=50890)
print("MultiObjective, empty histogram: next C =", MultiObjective().update((1.0,), empty)[0])
