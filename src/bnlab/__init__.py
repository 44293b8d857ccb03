"""bnlab: a laboratory for batch normalization on PyTorch.

Subpackages are imported on demand so that ``import bnlab`` stays cheap and
``bnlab.reference`` never pulls in torch.
"""

__version__ = "0.1.0"

_LAZY = {"convert": "bnlab.conversion", "to_torch": "bnlab.conversion", "from_torch": "bnlab.conversion",
         "register_factory": "bnlab.models.factory"}


def __getattr__(name: str):
    """``bnlab.convert`` / ``to_torch`` / ``from_torch`` / ``register_factory`` without importing torch at
    ``import bnlab``."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bnlab' has no attribute {name!r}")
