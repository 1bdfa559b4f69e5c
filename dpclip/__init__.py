"""dpclip: differentially private training for PyTorch.

Per-sample clipping (flat, per-layer, adaptive, batch, automatic), Gaussian noise, RDP and
PRV accounting (the torch-free ``accountants`` package), clip-norm controllers, federated
simulation and a privacy-budget CLI (``dpclip budget``).

Importing ``dpclip`` stays light (no torch) until the training API lands here.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
