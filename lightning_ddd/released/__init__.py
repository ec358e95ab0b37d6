"""Released masked diffusion language models (Hugging Face hub or local directories) as frozen teachers.

- :class:`ReleasedTeacher`: a ``DiffusionModule`` for ``validate``/``evaluate``/``sample`` (``--model ReleasedTeacher``).
- :func:`load_teacher_source`: hub id, directory or project ``.ckpt`` -> frozen teacher with an ``identity``.
- :class:`DiT`: MDLM's and SEDD's network rebuilt natively; :class:`HFMaskedLM`: any transformers masked LM.
"""

from lightning_ddd.released.dit import DiT, DiTConfig, release_name_map
from lightning_ddd.released.hf import HFMaskedLM
from lightning_ddd.released.release import Release, load_release
from lightning_ddd.released.sources import ReleasedModelError, ResolvedSource, resolve_source
from lightning_ddd.released.teacher import ReleasedTeacher, check_identity, load_teacher_source

__all__ = [
    "DiT",
    "DiTConfig",
    "HFMaskedLM",
    "Release",
    "ReleasedModelError",
    "ReleasedTeacher",
    "ResolvedSource",
    "check_identity",
    "load_release",
    "load_teacher_source",
    "release_name_map",
    "resolve_source",
]
