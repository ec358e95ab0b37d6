"""The image format torch-fidelity's extractors take, shared by the FID metric and the digits extractor."""

from __future__ import annotations

import torch
from torch import Tensor


def to_uint8_rgb(images: Tensor) -> Tensor:
    """(N, 1 or 3, H, W) floats in [0, 1] or uint8 -> (N, 3, H, W) uint8, torch-fidelity's input format."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (N, 1 or 3, H, W), got {tuple(images.shape)}.")
    if images.dtype != torch.uint8:
        images = (images.float() * 255.0).round().clamp(0, 255).to(torch.uint8)
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
