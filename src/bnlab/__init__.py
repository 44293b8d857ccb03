"""bnlab: a laboratory for batch normalization on PyTorch.

Subpackages are imported on demand so that ``import bnlab`` stays cheap and
``bnlab.reference`` never pulls in torch.
"""

__version__ = "0.1.0"
