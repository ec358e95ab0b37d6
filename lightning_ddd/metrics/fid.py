"""FID, Inception Score and KID of generated images through torch-fidelity's feature extractors and formulas.

``ImageFidelity`` keeps sums of features and of their outer products (summed states, so FID is exact under
DDP without gathering features) and compares them against reference statistics of held-out images (the
DataModule's validation split by default, never trained on, so memorising the training set earns nothing),
which ``dataset_reference`` computes once and caches on disk under a hash of the data and the extractor.
FID is biased upwards at small sample counts; ``lightning_ddd.evaluation.data_row`` scores as many real
images from outside the reference, the floor every FID is read against.
Feature extractors are loaded once per process and live outside every module tree, so they are never
saved in a checkpoint nor copied by EMA.

Extractors: torch-fidelity's ``inception-v3-compat`` (the field's convention; its weights are downloaded
on first use unless ``weights_path`` names a local file) or ``digits-cnn``, a small classifier of the
Digits data that the project trains offline (``lightning_ddd.metrics.digits_classifier``).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_ddd.metrics.images import to_uint8_rgb

DEFAULT_EXTRACTOR = "inception-v3-compat"
# Bump when what a cached reference file holds, or how it is computed, changes.
_REFERENCE_VERSION = 2  # 2: held-out split by default, digits-cnn features normalised
# Extractors are process-wide: keyed by (name, features, weights_path); a metric holds only the key.
_EXTRACTORS: dict[tuple, object] = {}
_FEATURE_DIMS: dict[tuple, dict[str, int]] = {}


def _ensure_registered(name: str) -> None:
    """Register the project's own extractors with torch-fidelity on first use (importing them is enough)."""
    if name == "digits-cnn":
        import lightning_ddd.metrics.digits_classifier  # noqa: F401


def feature_layers(name: str) -> dict[str, str]:
    """The feature each metric reads from extractor ``name``: ``{"fid": ..., "kid": ..., "isc": ...}``."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    _ensure_registered(name)
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        raise ValueError(
            f"feature extractor '{name}' is not registered with torch-fidelity; use one of "
            f"{sorted(FEATURE_EXTRACTORS_REGISTRY)} or register it with torch_fidelity.register_feature_extractor."
        )
    cls = FEATURE_EXTRACTORS_REGISTRY[name]
    return {metric: cls.get_default_feature_layer_for_metric(metric) for metric in ("fid", "kid", "isc")}


def get_feature_extractor(name: str, features: tuple[str, ...], weights_path: str | None = None):
    """The torch-fidelity extractor ``name`` producing ``features``, built once per process (eval, no grad)."""
    key = (name, tuple(features), weights_path)
    if key not in _EXTRACTORS:
        from torch_fidelity.utils import create_feature_extractor

        feature_layers(name)  # clear error for an unknown name
        if weights_path is not None and not os.path.isfile(weights_path):
            raise FileNotFoundError(f"feature extractor weights '{weights_path}' not found; check weights_path.")
        _EXTRACTORS[key] = create_feature_extractor(
            name, list(features), cuda=False, feature_extractor_weights_path=weights_path, verbose=False
        )
    return _EXTRACTORS[key]


@torch.no_grad()
def extract_features(images: Tensor, extractor, batch_size: int = 64) -> dict[str, Tensor]:
    """Run ``extractor`` over (N, C, H, W) images in batches on its device: {feature name: (N, F) fp32 CPU}."""
    device = next(extractor.parameters(), torch.empty(0)).device
    out: dict[str, list[Tensor]] = {}
    for first in range(0, len(images), batch_size):
        batch = to_uint8_rgb(images[first : first + batch_size]).to(device)
        feats = extractor.convert_features_tuple_to_dict(extractor(batch))
        for name, value in feats.items():
            out.setdefault(name, []).append(value.float().cpu())
    return {name: torch.cat(parts) for name, parts in out.items()}


@dataclass
class ReferenceStats:
    """Feature statistics of the reference images.

    Attributes:
        mu: (F,) float64 mean.
        sigma: (F, F) float64 covariance (unbiased, as numpy's ``cov``).
        num: number of reference images.
        features: (num, F) fp32 features, kept only when KID needs them.
        split: the DataModule split the images came from (None when built from features directly).
    """

    mu: Tensor
    sigma: Tensor
    num: int
    features: Tensor | None = None
    split: str | None = None

    @classmethod
    def from_features(cls, features: Tensor, keep_features: bool = False) -> "ReferenceStats":
        f = features.double()  # (N, F)
        return cls(f.mean(0), torch.cov(f.T).reshape(f.shape[1], f.shape[1]), len(f),
                   features.float() if keep_features else None)


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), by torch-fidelity's (TTUR's) implementation."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    first, second = ({"mu": m.double().cpu().numpy(), "sigma": s.double().cpu().numpy()}
                     for m, s in ((mu1, sigma1), (mu2, sigma2)))
    return fid_statistics_to_metric(first, second, verbose=False)[KEY_METRIC_FID]


def _weights_identity(weights_path: str | None) -> list | None:
    if weights_path is None:
        return None
    stat = os.stat(weights_path)
    return [os.path.abspath(weights_path), stat.st_size, stat.st_mtime_ns]


def dataset_reference(
    datamodule,
    feature_extractor: str = DEFAULT_EXTRACTOR,
    weights_path: str | None = None,
    cache_dir: str = "data_cache/fid",
    max_images: int | None = None,
    keep_features: bool = False,
    batch_size: int = 64,
    split: str = "val",
) -> ReferenceStats:
    """Reference statistics of one split of an image DataModule, read from ``cache_dir`` when cached.

    The default is the held-out validation split (Digits: the 10% ``val_fraction``; CIFAR-10: the 10,000
    test images). The cache file is named by a hash of the split's tokens, the DataModule class, the
    extractor, its feature layer and weights file, ``max_images`` and ``keep_features``, so any change
    recomputes it.

    Args:
        datamodule: a DataModule with ``modality == "image"`` (its ``decode`` gives images).
        feature_extractor: torch-fidelity extractor name.
        weights_path: local weights of the extractor (None: its default, possibly a download).
        cache_dir: folder of the cached statistics.
        max_images: use the first this many images of the split (None: all).
        keep_features: also keep the features themselves (KID needs them).
        batch_size: images per extractor call.
        split: ``"val"`` (held out, the default) or ``"train"`` (the convention of CIFAR-10 papers, which
            rewards memorising the training set).
    """
    if getattr(datamodule, "modality", None) != "image":
        raise ValueError(f"FID needs image data; {type(datamodule).__name__} holds {datamodule.modality} data.")
    if split not in ("train", "val"):
        raise ValueError(f"reference split '{split}' is not one of 'train', 'val'; use 'val' (held out).")
    datamodule.setup("fit")
    dataset = getattr(datamodule, f"{split}_set")
    tokens = getattr(dataset, "tokens", None)
    if tokens is None:
        tokens = torch.stack([dataset[i] for i in range(len(dataset))])
    tokens = tokens[:max_images] if max_images is not None else tokens
    layer = feature_layers(feature_extractor)["fid"]
    key = {
        "version": _REFERENCE_VERSION,
        "data": type(datamodule).__name__,
        "split": split,
        "tokens": hashlib.sha256(tokens.contiguous().numpy().tobytes()).hexdigest(),
        "shape": list(tokens.shape),
        "extractor": feature_extractor,
        "layer": layer,
        "weights": _weights_identity(weights_path),
        "keep_features": keep_features,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"{type(datamodule).__name__}-{feature_extractor}-{digest}.pt")
    if os.path.isfile(path):
        return ReferenceStats(**torch.load(path, weights_only=True), split=split)
    extractor = get_feature_extractor(feature_extractor, (layer,), weights_path)
    feats = [
        extract_features(datamodule.decode(tokens[i : i + batch_size].long()), extractor, batch_size)[layer]
        for i in range(0, len(tokens), batch_size)
    ]
    ref = ReferenceStats.from_features(torch.cat(feats), keep_features)
    ref.split = split
    os.makedirs(cache_dir, exist_ok=True)
    # Temporary file + rename: a concurrent reader never sees half a file.
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
    os.close(fd)
    try:
        torch.save({"mu": ref.mu, "sigma": ref.sigma, "num": ref.num, "features": ref.features}, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return ref


class ImageFidelity(Metric):
    """FID (and optionally Inception Score and KID) of generated images against reference statistics.

    ``update(images)`` takes (N, 1 or 3, H, W) floats in [0, 1] or uint8 (what image DataModules' ``decode``
    returns). ``compute()`` returns ``{"fid"}`` (when there is a reference) plus ``{"isc_mean", "isc_std"}``
    and ``{"kid_mean", "kid_std"}`` when enabled. FID uses summed states; IS and KID need the features
    themselves, which are kept in list states (gathered across processes) only when they are enabled. KID
    reads the same feature layer as FID (torch-fidelity's default for all its extractors), so one cached
    reference serves both.

    Args:
        reference: statistics of the reference images (``dataset_reference``); needed for FID and KID (KID
            needs its ``features``), not for IS. Can also be set later as ``metric.reference``.
        feature_extractor: torch-fidelity extractor name (``inception-v3-compat``, ``digits-cnn``, or one you
            registered).
        weights_path: local weights of the extractor (None: its default, which may download).
        isc: also compute the Inception Score (from the extractor's ``isc`` layer, e.g. logits).
        kid: also compute KID.
        isc_splits: IS splits (lowered to the number of samples when there are fewer).
        kid_subsets: KID subsets.
        kid_subset_size: KID subset size (lowered to the smaller sample count when there are fewer).
        batch_size: images per extractor call.
    """

    full_state_update = False

    def __init__(
        self,
        reference: ReferenceStats | None = None,
        feature_extractor: str = DEFAULT_EXTRACTOR,
        weights_path: str | None = None,
        isc: bool = False,
        kid: bool = False,
        isc_splits: int = 10,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        batch_size: int = 64,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.reference = reference
        self.feature_extractor, self.weights_path = feature_extractor, weights_path
        self.isc, self.kid = isc, kid
        self.isc_splits, self.kid_subsets, self.kid_subset_size = isc_splits, kid_subsets, kid_subset_size
        self.batch_size = batch_size
        self.layers = feature_layers(feature_extractor)
        self._features = tuple(dict.fromkeys([self.layers["fid"]] + ([self.layers["isc"]] if isc else [])))
        dim = self._feature_dims()[self.layers["fid"]]
        f64 = torch.float64
        self.add_state("feat_sum", default=torch.zeros(dim, dtype=f64), dist_reduce_fx="sum")
        self.add_state("feat_outer", default=torch.zeros(dim, dim, dtype=f64), dist_reduce_fx="sum")
        self.add_state("num", default=torch.tensor(0.0, dtype=f64), dist_reduce_fx="sum")
        if kid:
            self.add_state("kid_features", default=[], dist_reduce_fx="cat")
        if isc:
            self.add_state("isc_logits", default=[], dist_reduce_fx="cat")

    def extractor(self):
        """The shared (process-wide) extractor, on this metric's device."""
        return get_feature_extractor(self.feature_extractor, self._features, self.weights_path).to(self.device)

    def _feature_dims(self) -> dict[str, int]:
        key = (self.feature_extractor, self._features, self.weights_path)
        if key not in _FEATURE_DIMS:
            extractor = get_feature_extractor(*key)
            try:
                dummy = extractor.get_dummy_input_for_compile()
            except NotImplementedError:
                dummy = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
            feats = extract_features(dummy, extractor)
            _FEATURE_DIMS[key] = {name: value.shape[1] for name, value in feats.items()}
        return _FEATURE_DIMS[key]

    def update(self, images: Tensor) -> None:
        feats = extract_features(images, self.extractor(), self.batch_size)
        f = feats[self.layers["fid"]].to(self.device, torch.float64)  # (N, F)
        self.feat_sum += f.sum(0)
        self.feat_outer += f.T @ f
        self.num += f.shape[0]
        if self.kid:
            self.kid_features.append(f.float())
        if self.isc:
            self.isc_logits.append(feats[self.layers["isc"]].to(self.device))

    def compute(self) -> dict[str, Tensor]:
        n = self.num.item()
        if n < 2:
            raise ValueError(f"ImageFidelity needs at least 2 generated images, got {int(n)}.")
        out = {}
        mu = self.feat_sum / n
        sigma = (self.feat_outer - n * torch.outer(mu, mu)) / (n - 1)
        if self.reference is None and not self.isc:  # IS alone needs no reference
            raise ValueError("ImageFidelity has no reference statistics; pass reference=dataset_reference(...).")
        if self.reference is not None:
            out["fid"] = torch.tensor(frechet_distance(mu, sigma, self.reference.mu, self.reference.sigma))
        if self.isc:
            out.update(self._isc())
        if self.kid:
            out.update(self._kid())
        return out

    def _isc(self) -> dict[str, Tensor]:
        from torch_fidelity.metric_isc import isc_features_to_metric

        logits = _cat(self.isc_logits).cpu()
        res = isc_features_to_metric(logits, splits=min(self.isc_splits, len(logits)))
        return {"isc_mean": torch.tensor(res["inception_score_mean"]),
                "isc_std": torch.tensor(res["inception_score_std"])}

    def _kid(self) -> dict[str, Tensor]:
        from torch_fidelity.metric_kid import kid_features_to_metric

        if self.reference is None or self.reference.features is None:
            raise ValueError("KID needs the reference features: build the reference with keep_features=True.")
        gen, ref = _cat(self.kid_features).cpu(), self.reference.features.cpu()
        size = min(self.kid_subset_size, len(gen), len(ref))
        res = kid_features_to_metric(gen, ref, kid_subsets=self.kid_subsets, kid_subset_size=size, verbose=False)
        return {"kid_mean": torch.tensor(res["kernel_inception_distance_mean"]),
                "kid_std": torch.tensor(res["kernel_inception_distance_std"])}


def _cat(state: list[Tensor] | Tensor) -> Tensor:
    """List states are lists before a sync and one tensor after it."""
    return torch.cat(state) if isinstance(state, list) else state
