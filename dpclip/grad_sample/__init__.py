"""The per-sample gradient engine: per-layer rules (and, alongside, the vmap fallback)."""

from .rules import RULES, LayerRule, rule_for, use_ghost

__all__ = ["LayerRule", "RULES", "rule_for", "use_ghost"]
