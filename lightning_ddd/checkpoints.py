"""Checkpoint loading with errors that say what is wrong and how to fix it."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable or of the wrong kind."""


def read_checkpoint(path: str) -> dict[str, Any]:
    """Load a Lightning checkpoint onto the CPU, raising ``CheckpointError`` with a one-line reason."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint '{path}' does not exist; check the path (runs write checkpoints/last.ckpt).")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # mmap: cheap for big files
    except Exception as err:  # truncated zip, pickle garbage, not a torch file at all
        raise CheckpointError(
            f"checkpoint '{path}' could not be read ({type(err).__name__}); the file is corrupt or not a "
            "PyTorch checkpoint: re-save it or point at another file."
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(
            f"'{path}' is not a Lightning checkpoint (no state_dict); pass a .ckpt written by this project's fit."
        )
    return ckpt


def checkpoint_class_name(ckpt: dict[str, Any]) -> str | None:
    """The module class recorded in a checkpoint's hyperparameters, if any."""
    hp = ckpt.get("hyper_parameters", {})
    class_path = hp.get("_class_path")
    if class_path:
        return class_path.rsplit(".", 1)[-1]
    return ckpt.get("lightning_ddd_class")


def validate_checkpoint(path: str, expected_class: type | None = None) -> dict[str, Any]:
    """Read ``path`` and check it was written by ``expected_class`` (or a subclass's parent), else raise."""
    ckpt = read_checkpoint(path)
    found = checkpoint_class_name(ckpt)
    if expected_class is not None and found is not None:
        names = {cls.__name__ for cls in expected_class.__mro__}
        if found not in names:
            raise CheckpointError(
                f"checkpoint '{path}' holds a {found} but this run builds a {expected_class.__name__}; "
                f"use a {expected_class.__name__} checkpoint or change model.class_path."
            )
    return ckpt


def file_sha256(path: str) -> str:
    """Content hash of a file (students record their teacher's)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
