"""The two settings objects every sampling entry point takes: how to sample, and what to score.

``SamplingSettings`` fixes everything that decides a set of samples and is recorded next to every result,
so a number is never separated from the protocol that produced it. ``MetricOptions`` says which metrics
beyond entropy and the oracle NLL to compute. Both are frozen and keyword-only: the ``sample`` and
``evaluate`` subcommands and every sampling callback take them whole (a ``sampling:`` and a ``metrics:``
block in YAML), and a sweep derives its settings with ``dataclasses.replace`` (:func:`sweep`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import torch

from lightning_ddd.diffusion.sampling import validate_sampling_args
from lightning_ddd.extras import require


@dataclass(frozen=True, kw_only=True)
class SamplingSettings:
    """How samples are drawn; recorded next to every result.

    Attributes:
        steps: sampling steps (network evaluations per sample, at most).
        temperature: softmax temperature of the x-prediction (1.0 leaves the model unchanged).
        top_p: nucleus mass kept (1.0 = off).
        top_k: most likely tokens kept (0 = off).
        precision: dtype of the categorical draws, "float64" or "float32" (float32 Gumbel noise is
            truncated and acts like a lower temperature).
        seed: seed of the sampler's generator: the same noise for every setting and every evaluation.
        num_samples: samples per setting.
        batch_size: samples drawn at once.
        cache: use the RADD caching sampler (masked, time-independent models).
    """

    steps: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    precision: str = "float64"
    seed: int = 0
    num_samples: int = 64
    batch_size: int = 64
    cache: bool = False

    def __post_init__(self) -> None:
        self.validate()  # a bad value fails when the config is read, not after hours of training

    def validate(self, seq_len: int = 1) -> None:
        """Raise ``ValueError`` naming the first bad value (``seq_len``: the model's, when known)."""
        validate_sampling_args(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, precision=self.precision,
            num_steps=self.steps, num_samples=self.num_samples, seq_len=seq_len,
        )
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size!r} must be an integer >= 1.")

    @property
    def sampler(self) -> str:
        return "caching" if self.cache else "ancestral"


def sweep(base: SamplingSettings, steps: list[int] | None = None, temperatures: list[float] | None = None,
          top_ps: list[float] | None = None) -> list[SamplingSettings]:
    """``base`` at every (steps, temperature, top_p) combination, in that nesting order.

    A list that is None keeps ``base``'s value; an empty list is an error (a sweep of nothing).
    """
    axes = {"steps": steps, "temperatures": temperatures, "top_ps": top_ps}
    empty = [name for name, values in axes.items() if values is not None and len(values) == 0]
    if empty:
        raise ValueError(f"{', '.join(empty)}: give at least one value, or null to keep the sampling setting.")
    grid = itertools.product(steps or [base.steps], temperatures or [base.temperature], top_ps or [base.top_p])
    return [replace(base, steps=n, temperature=t, top_p=p) for n, t, p in grid]


@dataclass(frozen=True, kw_only=True)
class MetricOptions:
    """Metrics beyond entropy and the oracle NLL, and how to compute them; recorded next to the results.

    Attributes:
        evaluator: generative perplexity under "oracle" (the data's exact density), an ARLanguageModel
            checkpoint path, or a Hugging Face causal LM name or folder (e.g. "gpt2-large"); None: off.
        evaluator_batch_size: sequences per evaluator forward pass.
        gradient_moment: also the D-MMD gradient moment under the evaluator (a torch model), against as many
            validation sequences as there are samples.
        gradient_moment_params: regular expression selecting the evaluator parameters it uses (None: all).
        fid: FID of the decoded samples against the held-out (validation) images (image data only).
        isc: Inception Score of the decoded samples (image data only).
        kid: KID against the held-out (validation) images (image data only).
        fid_extractor: torch-fidelity feature extractor: "inception-v3-compat" (downloads its weights unless
            fid_weights_path is set) or "digits-cnn" (trained offline on the Digits data).
        fid_weights_path: local weights file of the extractor (None: its default, which may download).
        fid_reference_size: validation images in the reference statistics (None: all).
        cache_dir: folder of the cached reference statistics.
    """

    evaluator: str | None = None
    evaluator_batch_size: int = 16
    gradient_moment: bool = False
    gradient_moment_params: str | None = None
    fid: bool = False
    isc: bool = False
    kid: bool = False
    fid_extractor: str = "inception-v3-compat"
    fid_weights_path: str | None = None
    fid_reference_size: int | None = None
    cache_dir: str = "data_cache/fid"

    def __post_init__(self) -> None:
        if self.gradient_moment and self.evaluator in (None, "oracle"):
            raise ValueError("gradient_moment needs a model evaluator: set evaluator to a checkpoint or LM name.")
        if self.evaluator_batch_size < 1:
            raise ValueError(f"evaluator_batch_size={self.evaluator_batch_size} must be >= 1.")

    @property
    def images(self) -> bool:
        """Whether any image metric (FID, IS, KID) is on."""
        return self.fid or self.isc or self.kid

    def validate(self, datamodule) -> None:
        """Raise on options this data cannot serve or this install cannot compute, before any model loads."""
        if self.images:
            if getattr(datamodule, "modality", None) != "image":
                raise ValueError("fid/isc/kid need image data (e.g. Digits, CIFAR10Pixels).")
            require("torch_fidelity", "torchvision", feature="FID/IS/KID")
        if self.evaluator == "oracle" and not has_density(datamodule):
            raise ValueError("evaluator='oracle' needs data with a known density (MarkovChain).")


def has_density(datamodule) -> bool:
    """Whether the data knows the exact log-likelihood of a sequence (``oracle_log_likelihood`` is not None)."""
    if datamodule is None:
        return False
    probe = torch.zeros(1, datamodule.seq_len, dtype=torch.long)
    return datamodule.oracle_log_likelihood(probe) is not None
