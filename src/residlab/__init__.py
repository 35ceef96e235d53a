"""residlab: residual-stream experiments on Hugging Face chat models.

The public API is re-exported here lazily, so ``import residlab`` stays cheap::

    from residlab import load_model, intervene, Add, Capture
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "Add",
    "Capture",
    "NoisingConfig",
    "intervene",
    "load_config",
    "load_model",
    "resolve_arch",
    "run_covariance",
    "run_generate",
]

_HOMES = {
    "Add": "residlab.hooks",
    "Capture": "residlab.hooks",
    "intervene": "residlab.hooks",
    "NoisingConfig": "residlab.config",
    "load_config": "residlab.config",
    "load_model": "residlab.models",
    "resolve_arch": "residlab.arch",
    "run_covariance": "residlab.noising.covariance",
    "run_generate": "residlab.noising.generate",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'residlab' has no attribute {name!r}")
