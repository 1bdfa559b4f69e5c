"""Find every module or setting that per-sample DP training cannot handle, with the fix.

``problems(module)`` returns one line per problem; ``make_private`` reports all of them in
one error instead of failing on the first (and never trains on a model it cannot make
private).
"""

from __future__ import annotations

from torch import nn

from .grad_sample.rules import rule_for

__all__ = ["problems"]


def problems(module: nn.Module) -> list[str]:
    """Every problem of ``module`` for per-sample clipping, each naming the module and the fix."""
    out = []
    for name, m in module.named_modules():
        where = f"{name or '<root>'} ({type(m).__name__})"
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            out.append(
                f"{where}: BatchNorm normalises with statistics of the whole batch, so one sample's "
                "gradient depends on the others and per-sample clipping bounds nothing; replace it with "
                f"nn.GroupNorm(num_groups, {m.num_features}) (e.g. dpclip's models use GroupNorm)"
            )
            continue
        try:
            rule_for(m)
        except ValueError as e:  # a layer with a rule, in a setting the rule refuses
            out.append(f"{where}: {e}")
    return out
