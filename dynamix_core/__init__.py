"""DynaMix core library: data formats, model, losses, centroid bank, samplers, clustering, evaluation.

Runs in a bare PyTorch process: it imports neither Ray nor MLflow (a test enforces this).
"""

from dynamix_core import _compat  # noqa: F401  (must run before timm/torchvision are imported)

__version__ = "0.1.0"
