"""Where a student's teacher comes from: a lightning_ddd checkpoint, a hub id, or a local directory in the hub's layout.

:func:`load_teacher_source` turns any of them into a frozen teacher in eval mode with an ``identity``
(``{"source", "revision", "sha256"}``: a checkpoint file or a directory by the SHA-256 of its contents, a hub id
by its resolved commit), which a student records and checks whenever it is rebuilt. :class:`TeacherOptions`
holds how a release is loaded and the dropout of the student's copy of the teacher network.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from torch import nn

from lightning_ddd.checkpoints import CheckpointError, checkpoint_class, file_sha256, validate_checkpoint
from lightning_ddd.modules.base import DiffusionModule
from lightning_ddd.modules.released_teacher import ReleasedTeacher
from lightning_ddd.released.hf import TimeInput
from lightning_ddd.released.release import Loader


@dataclass(frozen=True)
class TeacherOptions:
    """How a released teacher (a hub id or a directory given as ``teacher_ckpt``) is loaded, and the dropout of
    the student's copy. A lightning_ddd ``.ckpt`` teacher takes ``dropout`` only.

    Args:
        revision: hub branch, tag or commit (None: ``main``). A student's checkpoint records the resolved commit
            here, so resuming or evaluating it loads the same weights.
        trust_remote_code: allow the release's own Python code (the transformers loader only; MDLM and SEDD are
            rebuilt natively and never need it).
        loader: "auto" (MDLM and SEDD natively, anything else through transformers), "native" or "transformers".
        mask_id: the release's mask token id; default from its config.json or tokenizer.
        tokenizer: the release's tokenizer (name or directory); default its own, GPT-2 for MDLM and SEDD.
        time_input: transformers loader only: "auto", "none", "sigma" or "t" (see ``ReleasedTeacher``).
        noise_eps: eps of the release's log-linear schedule ``alpha_t = 1 - (1 - eps) t`` (MDLM, SEDD: 1e-3).
        cache_dir: Hugging Face cache directory (default: ``HF_HUB_CACHE``).
        dropout: dropout probability of the student's copy of the teacher network (and of D-MMD's auxiliary):
            the ``p`` of every ``torch.nn.Dropout`` in it. None: as loaded (MDLM and SEDD were trained with 0.1;
            a project teacher keeps its own). The frozen teacher itself always runs without dropout.
    """

    revision: str | None = None
    trust_remote_code: bool = False
    loader: Loader = "auto"
    mask_id: int | None = None
    tokenizer: str | None = None
    time_input: TimeInput = "auto"
    noise_eps: float = 1e-3
    cache_dir: str | None = None
    dropout: float | None = None

    def __post_init__(self) -> None:
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TeacherOptions: dropout={self.dropout} must lie in [0, 1) (or null: as loaded).")

    def release_arguments(self) -> dict[str, Any]:
        """The arguments of :class:`ReleasedTeacher` (every field but ``dropout``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "dropout"}


def is_checkpoint_source(source: str) -> bool:
    """Whether ``source`` names a lightning_ddd checkpoint file (else a hub id or a release directory)."""
    return source.endswith(".ckpt") or os.path.isfile(os.path.expanduser(source))


def load_teacher(path: str) -> DiffusionModule:
    """Load a trained lightning_ddd model from ``path``, frozen (no gradients) and in eval mode."""
    cls = checkpoint_class(validate_checkpoint(path, DiffusionModule))
    if cls is None or cls is DiffusionModule:
        raise CheckpointError(f"teacher checkpoint '{path}' does not record a lightning_ddd model class.")
    teacher = cls.load_from_checkpoint(path, map_location="cpu")  # state_dict holds EMA weights when EMA was on
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def load_teacher_source(
    source: str,
    options: TeacherOptions | None = None,
    vocab_size: int | None = None,
    seq_len: int | None = None,
) -> DiffusionModule:
    """A frozen teacher in eval mode from a lightning_ddd ``.ckpt``, a hub id or a local release directory.

    The result has ``denoise``, ``process``, ``vocab_size``, ``seq_len``, ``backbone`` and ``identity``. A release
    is checked against the data's ``vocab_size`` and ``seq_len`` (it may serve rows shorter than its context);
    a checkpoint is returned as trained (the student compares the sizes).

    Raises:
        ValueError: one line (``ReleasedModelError``, ``CheckpointError``) naming the problem and the fix, before
            any weights are read where the problem shows in the source or its config.json.
    """
    options = options if options is not None else TeacherOptions()
    if not source:
        raise ValueError("teacher_ckpt is empty; give a lightning_ddd .ckpt, a hub id (e.g. kuleshov-group/mdlm-owt) "
                         "or a release directory.")
    if is_checkpoint_source(source):
        release_defaults = TeacherOptions(dropout=options.dropout)
        if options != release_defaults:
            changed = [f.name for f in dataclasses.fields(options) if getattr(options, f.name) != getattr(release_defaults, f.name)]
            raise ValueError(f"'{source}' is a lightning_ddd checkpoint; teacher_options {changed} apply to hub ids and "
                             "release directories only: drop them.")
        teacher = load_teacher(source)
        teacher.identity = {"source": os.path.abspath(source), "revision": None, "sha256": file_sha256(source)}
        return teacher
    teacher = ReleasedTeacher(source, vocab_size=vocab_size, seq_len=seq_len, **options.release_arguments())
    teacher.requires_grad_(False)
    return teacher.eval()


def set_dropout(module: nn.Module, p: float) -> int:
    """Set the probability of every ``nn.Dropout`` in ``module`` to ``p``; returns how many there were."""
    layers = [m for m in module.modules() if isinstance(m, nn.Dropout)]
    for layer in layers:
        layer.p = p
    return len(layers)


def check_identity(recorded: dict[str, Any] | None, current: dict[str, Any]) -> None:
    """Raise one line when a student's recorded teacher identity differs from the teacher loaded now."""
    if not recorded:
        return
    for key in ("revision", "sha256"):
        if recorded.get(key) != current.get(key):
            how = ("pin teacher_options.revision to that commit" if key == "revision"
                   else "point teacher_ckpt at the original teacher")
            raise ValueError(
                f"the teacher '{current.get('source')}' now has {key} {current.get(key)} but the student was trained "
                f"against {recorded.get(key)}; {how}."
            )
