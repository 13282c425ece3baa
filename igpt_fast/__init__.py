"""igpt-fast: Image GPT ("Generative Pretraining from Pixels", Chen et al. 2020), fast.

The public names are imported lazily so that `igpt-fast --help` and the data tools do not pay for
importing torch:

    from igpt_fast import Palette, GPTConfig, IGPT, PRESETS
"""
import importlib

__version__ = "0.1.0"

_LAZY = {
    "Palette": "igpt_fast.palette",
    "GPTConfig": "igpt_fast.model",
    "IGPT": "igpt_fast.model",
    "PRESETS": "igpt_fast.model",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'igpt_fast' has no attribute {name!r}")
