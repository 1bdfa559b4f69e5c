"""dpclip: differentially private training for PyTorch.

Per-sample gradient clipping with Gaussian noise on the user's own model, optimizer and
loop (``PrivacyEngine`` / ``make_private``), RDP and PRV accounting (the torch-free
``accountants`` package) and a privacy-budget CLI (``dpclip budget``).

``import dpclip`` does not import torch: the training API is loaded on first use
(PEP 562), so the budget CLI starts fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "PrivacyEngine": "dpclip.privacy_engine",
    "make_private": "dpclip.privacy_engine",
    "Private": "dpclip.privacy_engine",
    "NotPoissonSampledError": "dpclip.privacy_engine",
    "PrivacyBudgetExhausted": "dpclip.privacy_engine",
    "BatchMemoryManager": "dpclip.sampling",
    "Fixed": "dpclip.controllers",
    "Quantile": "dpclip.controllers",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dpclip' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
