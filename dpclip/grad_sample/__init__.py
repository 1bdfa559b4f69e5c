"""The per-sample gradient engine: per-layer rules, the torch.func fallback, hooks and book-keeping."""

from .rules import RULES, LayerRule, rule_for, use_ghost
from .vmap import RandomnessError, module_vjp_per_sample, per_sample_grads_vmap, rnn_per_sample_grads

__all__ = [
    "LayerRule",
    "RULES",
    "RandomnessError",
    "module_vjp_per_sample",
    "per_sample_grads_vmap",
    "rnn_per_sample_grads",
    "rule_for",
    "use_ghost",
]
