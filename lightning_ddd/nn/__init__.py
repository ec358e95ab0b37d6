"""Plain nn.Modules: the backbones (``Backbone``, their base; the bidirectional ``DenoisingTransformer``)."""

from lightning_ddd.nn.backbone import Backbone
from lightning_ddd.nn.transformer import DenoisingTransformer

__all__ = ["Backbone", "DenoisingTransformer"]
