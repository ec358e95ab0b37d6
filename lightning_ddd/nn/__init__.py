"""Plain nn.Modules: the bidirectional transformer backbone."""

from lightning_ddd.nn.transformer import Transformer

__all__ = ["Transformer"]
