"""Find every module or setting that per-sample DP training cannot handle, with the fix.

``problems(module)`` returns one line per problem; ``make_private`` reports all of them in
one error instead of failing on the first (and never trains on a model it cannot make
private).
"""

from __future__ import annotations

from torch import nn

from .grad_sample.rules import rule_for

__all__ = ["problems"]


def problems(module: nn.Module, clipping: str = "flat") -> list[str]:
    """Every problem of ``module`` for ``clipping``, each naming the module and the fix.

    Per-sample modes refuse BatchNorm (and layer settings a rule refuses). Batch clipping
    (``clipping="batch"``) runs ordinary backprop on whole micro-batches, so BatchNorm is
    allowed, but its running statistics are data-dependent and are released with the model:
    it must not update them from private data (``track_running_stats=False`` normalises with
    the batch's own statistics also at evaluation; ``momentum=0.0`` freezes them).
    """
    out = []
    for name, m in module.named_modules():
        where = f"{name or '<root>'} ({type(m).__name__})"
        if clipping == "batch":
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.momentum != 0.0:
                out.append(
                    f"{where}: its running mean and variance would be updated from private batches and released "
                    "with the model without noise; build it with track_running_stats=False (batch statistics also "
                    "at evaluation) or momentum=0.0 (frozen statistics)"
                )
            continue
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            out.append(
                f"{where}: BatchNorm normalises with statistics of the whole batch, so one sample's "
                "gradient depends on the others and per-sample clipping bounds nothing; replace it with "
                f"nn.GroupNorm(num_groups, {m.num_features}) (e.g. dpclip's models use GroupNorm), or use "
                "clipping='batch', which clips whole micro-batches and allows BatchNorm"
            )
            continue
        try:
            rule_for(m)
        except ValueError as e:  # a layer with a rule, in a setting the rule refuses
            out.append(f"{where}: {e}")
    return out
