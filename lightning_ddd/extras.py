"""Optional dependencies: which ``pip install "lightning_ddd[<extra>]"`` provides each, and one-line errors.

``pip install .`` trains and samples on token data. Images and FID, plots, and Hugging Face text each need
an extra; a feature that needs a missing one fails before any work with the command that installs it.
"""

from __future__ import annotations

import importlib.util
import sys

#: import name -> (distribution name, extra that installs it)
OPTIONAL: dict[str, tuple[str, str]] = {
    "torch_fidelity": ("torch-fidelity", "images"),
    "torchvision": ("torchvision", "images"),
    "sklearn": ("scikit-learn", "images"),
    "matplotlib": ("matplotlib", "plots"),
    "datasets": ("datasets", "text"),
    "transformers": ("transformers", "text"),
    "safetensors": ("safetensors", "text"),
    "huggingface_hub": ("huggingface-hub", "text"),
}


class MissingExtraError(ImportError):
    """An optional package that a requested feature needs is not installed."""


def install_hint(module: str, feature: str | None = None) -> str | None:
    """The one-line message for a missing optional ``module`` (None when it is not an optional package)."""
    root = module.split(".")[0]
    if root not in OPTIONAL:
        return None
    distribution, extra = OPTIONAL[root]
    what = f"{feature} needs {distribution}, which is not installed" if feature else f"{distribution} is not installed"
    return f'{what}: pip install "lightning_ddd[{extra}]"'


def require(*modules: str, feature: str) -> None:
    """Raise ``MissingExtraError`` naming the extra if any of ``modules`` cannot be imported (nothing is imported)."""
    for module in modules:
        if sys.modules.get(module) is None and importlib.util.find_spec(module) is None:  # a loaded module counts
            raise MissingExtraError(install_hint(module, feature) or f"{feature} needs the package '{module}'.")
