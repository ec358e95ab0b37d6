"""Released masked diffusion language models (Hugging Face hub or local directories): networks and loading.

- :func:`load_release`: hub id or directory -> a :class:`Release` (backbone, tokenizer, mask id, identity).
- :class:`DiT`: MDLM's and SEDD's network rebuilt natively; :class:`HFMaskedLM`: any transformers masked LM.
- ``python -m lightning_ddd.released.make_tiny DIR``: a tiny MDLM-layout release and a corpus, for the quickstart.

The LightningModules built on them live in :mod:`lightning_ddd.modules`: ``ReleasedTeacher`` (``--model
ReleasedTeacher``) and the students, which take a release as ``teacher_ckpt``.
"""

from lightning_ddd.released.dit import DiT, DiTConfig, release_name_map
from lightning_ddd.released.hf import HFMaskedLM
from lightning_ddd.released.release import Release, load_release
from lightning_ddd.released.sources import ReleasedModelError, ResolvedSource, resolve_source

__all__ = [
    "DiT",
    "DiTConfig",
    "HFMaskedLM",
    "Release",
    "ReleasedModelError",
    "ResolvedSource",
    "load_release",
    "release_name_map",
    "resolve_source",
]
