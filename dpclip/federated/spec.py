"""The text form of a partition scheme (``iid``, ``dirichlet:0.5``, ``shards:2``); torch-free."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["PartitionSpec", "parse_partition"]


@dataclass(frozen=True)
class PartitionSpec:
    """A partition scheme: ``kind`` is ``iid``, ``dirichlet`` (``value`` = alpha) or ``shards`` (``value`` = k)."""

    kind: str
    value: float | int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("iid", "dirichlet", "shards"):
            raise ValueError(f"partition kind must be iid, dirichlet or shards; got {self.kind!r}")

    def __str__(self) -> str:
        return self.kind if self.value is None else f"{self.kind}:{self.value:g}"


def parse_partition(text: str) -> PartitionSpec:
    """``"iid"``, ``"dirichlet:ALPHA"`` (ALPHA > 0) or ``"shards:K"`` (K >= 1) -> :class:`PartitionSpec`."""
    fix = "use iid, dirichlet:ALPHA (e.g. dirichlet:0.5) or shards:K (e.g. shards:2)"
    if not isinstance(text, str):
        raise TypeError(f"partition must be a string; got {text!r}")
    kind, _, arg = text.strip().partition(":")
    kind = kind.lower()
    if kind == "iid" and not arg:
        return PartitionSpec("iid")
    if kind == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            raise ValueError(f"partition {text!r}: alpha must be a number; {fix}") from None
        if not (alpha > 0 and math.isfinite(alpha)):
            raise ValueError(f"partition {text!r}: alpha must be a finite number > 0; {fix}")
        return PartitionSpec("dirichlet", alpha)
    if kind == "shards":
        try:
            k = int(arg)
        except ValueError:
            raise ValueError(f"partition {text!r}: K must be a whole number >= 1; {fix}") from None
        if k < 1:
            raise ValueError(f"partition {text!r}: K must be >= 1; {fix}")
        return PartitionSpec("shards", k)
    raise ValueError(f"unknown partition {text!r}; {fix}")
