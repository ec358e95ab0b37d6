"""lightning_ddd: discrete diffusion teachers and few-step students on PyTorch Lightning."""

__version__ = "0.1.0"
