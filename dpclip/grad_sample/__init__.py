"""The per-sample gradient engine: per-layer rules, the torch.func fallback, hooks and book-keeping."""

from .bookkeeping import Clipper, clip_and_sum
from .hooks import GradSampler, Unit, find_units, uncovered_parameters
from .rules import RULES, LayerRule, rule_for, use_ghost
from .vmap import RandomnessError, module_vjp_per_sample, per_sample_grads_vmap, rnn_per_sample_grads

__all__ = [
    "Clipper",
    "GradSampler",
    "LayerRule",
    "Unit",
    "clip_and_sum",
    "find_units",
    "uncovered_parameters",
    "RULES",
    "RandomnessError",
    "module_vjp_per_sample",
    "per_sample_grads_vmap",
    "rnn_per_sample_grads",
    "rule_for",
    "use_ghost",
]
