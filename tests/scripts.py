"""Loading experiment scripts (``experiments/...``) as modules in tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
REPRODUCE = ROOT / "experiments" / "reproduce"


def load_script(path: Path, name: str | None = None) -> ModuleType:
    """Import the script at ``path`` as module ``name`` (its file stem by default).

    The script's folder goes on ``sys.path`` so that it can import its siblings, and the module
    is registered in ``sys.modules`` (dataclasses and pickling look it up there)."""
    name = name or path.stem
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
