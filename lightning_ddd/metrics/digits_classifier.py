"""A small CNN classifier of scikit-learn's 8x8 digits, used as an offline FID/IS/KID feature extractor.

Inception-v3 needs a download and was trained on photographs, not 8x8 grey digits; this network trains in
seconds on the CPU from data that ships with scikit-learn. Importing this module registers it with
torch-fidelity as ``digits-cnn`` (features: ``features`` (N, F) for FID/KID, ``logits`` (N, 10) for IS).
With no ``weights_path`` it trains itself once into ``DEFAULT_WEIGHTS_PATH`` and reuses that file.

Feature scale. The raw penultimate ReLU layer is a poor FID space: a cross-entropy classifier grows its
activations (per-unit variance about 30 on real digits) and about half of the 128 units never fire on a
digit (dead ReLUs), so FID came out 12-68x an independent digit classifier's. The ``features`` are
therefore the live units only (those with non-zero variance over the training images) divided by one
constant, chosen so that the mean per-feature variance over the training images is 1. One constant rather
than a per-unit z-score keeps the classifier's geometry (which units vary most); the live units are all
active on a large share of the digits, so the two give nearly the same FID. Both are fitted once, after
training, on the training split, and stored with the weights.

Train it explicitly with ``python -m lightning_ddd.metrics.digits_classifier [path] [epochs]``.
"""

from __future__ import annotations

import logging
import os
import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_fidelity import register_feature_extractor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from lightning_ddd.metrics.images import to_uint8_rgb

log = logging.getLogger(__name__)

NAME = "digits-cnn"
DEFAULT_WEIGHTS_PATH = os.path.join("data_cache", "fid", "digits_cnn-v1.pt")
_SIDE, _LEVELS = 8, 17


class DigitsCNN(nn.Module):
    """conv(32) -> conv(64) -> pool -> linear(feature_dim) -> linear(10) on (N, 1, 8, 8) grey images in [0, 1].

    Args:
        width: channels of the first convolution (the second has twice as many).
        feature_dim: width of the penultimate layer, the FID features.
        num_classes: digit classes.
    """

    def __init__(self, width: int = 32, feature_dim: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * (_SIDE // 2) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = F.relu(self.conv2(F.relu(self.conv1(x))))  # (N, 2w, 8, 8)
        h = F.max_pool2d(h, 2).flatten(1)  # (N, 2w * 16)
        features = F.relu(self.fc(h))  # (N, feature_dim)
        return features, self.head(features)  # (N, F), (N, 10)


def preprocess(images: Tensor) -> Tensor:
    """torch-fidelity's (N, 3, H, W) uint8 -> (N, 1, 8, 8) floats in [0, 1] (grey, resized when not 8x8)."""
    x = images.float().mean(1, keepdim=True) / 255.0  # (N, 1, H, W)
    return x if x.shape[-2:] == (_SIDE, _SIDE) else F.interpolate(x, size=(_SIDE, _SIDE), mode="area")


def feature_normalisation(net: DigitsCNN, images: Tensor) -> tuple[Tensor, float]:
    """The live units of ``net``'s features on (N, 1, 8, 8) ``images`` and the scale that gives them mean variance 1.

    Returns:
        index: (F,) long, units whose activation varies over the images (a dead ReLU is constant at 0).
        scale: sqrt of the mean variance of those units.
    """
    with torch.no_grad():
        features = net(images)[0].double()  # (N, 128)
    variance = features.var(0)  # (128,)
    index = (variance > 0).nonzero().squeeze(1)
    if len(index) == 0:
        raise ValueError("digits-cnn: every feature unit is dead on the training images; retrain the classifier.")
    return index, variance[index].mean().sqrt().item()


def _digits(val_fraction: float, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(train images, train labels, val images, val labels), split by the same rule as ``Digits``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    tokens = torch.from_numpy(data.data).round().long()  # (1797, 64) grey levels 0..16
    labels = torch.from_numpy(data.target).long()
    # Through the same uint8 path as generated images, so training sees exactly what evaluation feeds it.
    images = preprocess(to_uint8_rgb(tokens.reshape(-1, 1, _SIDE, _SIDE).float() / (_LEVELS - 1)))
    num_val = max(1, round(val_fraction * len(tokens)))
    order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(seed))
    val, train = order[:num_val].sort().values, order[num_val:].sort().values
    return images[train], labels[train], images[val], labels[val]


def train_digits_classifier(
    path: str = DEFAULT_WEIGHTS_PATH,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    val_fraction: float = 0.1,
    width: int = 32,
) -> float:
    """Train ``DigitsCNN`` on the Digits training split, fit the feature normalisation (module doc) on that
    split, save both to ``path`` and return the validation accuracy.

    Args:
        path: where to write the weights (a dict with ``state_dict``, ``width``, ``val_accuracy``,
            ``feature_index`` and ``feature_scale``).
        epochs: passes over the training split.
        batch_size: images per step.
        lr: Adam learning rate.
        seed: seed of the initialisation and shuffling (and of the split, as ``Digits(seed=...)``).
        val_fraction: share of the images held out, as ``Digits(val_fraction=...)``.
        width: channels of the first convolution (recorded in the file; tests use a narrow network).
    """
    x, y, x_val, y_val = _digits(val_fraction, seed)
    with torch.random.fork_rng():  # leave the caller's global RNG alone
        torch.manual_seed(seed)
        model = DigitsCNN(width)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(batch_size):
            loss = F.cross_entropy(model(x[idx])[1], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_val)[1].argmax(-1) == y_val).float().mean().item()
    index, scale = feature_normalisation(model, x)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "width": width, "val_accuracy": accuracy,
                "feature_index": index, "feature_scale": scale}, path + ".tmp")
    os.replace(path + ".tmp", path)
    return accuracy


class FeatureExtractorDigits(FeatureExtractorBase):
    """torch-fidelity extractor ``digits-cnn``: (N, 3, H, W) uint8 -> (``features`` (N, F), ``logits`` (N, 10)).

    ``features`` are the F live penultimate units, scaled to mean variance 1 on the training digits (module
    doc). A weights file without the normalisation (an older one, or bare weights) gets it fitted on load
    on the default Digits training split.

    Args:
        name: registered name (torch-fidelity passes it).
        features_list: requested features, a subset of ``("features", "logits")``.
        feature_extractor_weights_path: weights from ``train_digits_classifier``; None trains them once into
            ``DEFAULT_WEIGHTS_PATH`` (a few seconds on a CPU) or loads that file.
    """

    def __init__(self, name: str, features_list: list[str], feature_extractor_weights_path: str | None = None,
                 **kwargs) -> None:
        super().__init__(name, features_list)
        path = feature_extractor_weights_path or DEFAULT_WEIGHTS_PATH
        if feature_extractor_weights_path is None and not os.path.isfile(path):
            log.info("training the digits-cnn feature extractor into %s", path)
            train_digits_classifier(path)
        saved = torch.load(path, map_location="cpu", weights_only=True)
        self.net = DigitsCNN(saved.get("width", 32))
        self.net.load_state_dict(saved["state_dict"])
        self.eval()
        if "feature_index" in saved:
            index, scale = saved["feature_index"], saved["feature_scale"]
        else:
            index, scale = feature_normalisation(self.net, _digits(0.1, 0)[0])
        self.register_buffer("feature_index", index.long())
        self.feature_scale = scale
        self.requires_grad_(False)

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> Tensor:
        return torch.zeros(1, 3, _SIDE, _SIDE, dtype=torch.uint8)

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        features, logits = self.net(preprocess(images))  # (N, 128), (N, 10)
        out = {"features": features[:, self.feature_index] / self.feature_scale, "logits": logits}  # (N, F)
        return tuple(out[name] for name in self.features_list)


if NAME not in FEATURE_EXTRACTORS_REGISTRY:  # a second import (e.g. a reload) must not fail
    register_feature_extractor(NAME, FeatureExtractorDigits)


if __name__ == "__main__":
    out_path = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_WEIGHTS_PATH
    acc = train_digits_classifier(out_path, epochs=int(sys.argv[2]) if len(sys.argv) > 2 else 30)
    print(f"wrote {out_path} (validation accuracy {acc:.3f})")
