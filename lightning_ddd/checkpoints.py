"""Checkpoint loading with errors that say what is wrong and how to fix it.

Below the module layer: it imports no ``lightning_ddd`` module class. A checkpoint's class is resolved by
its LightningCLI class path, or by name among the project's LightningModule classes loaded so far (the
callers, which pass the class they expect, have loaded them).
"""

from __future__ import annotations

import hashlib
import importlib
import os
from typing import Any

import lightning.pytorch as pl
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


def checkpoint_class(ckpt: dict[str, Any]) -> type | None:
    """The module class that wrote a checkpoint, when it can be resolved."""
    class_path = ckpt.get("hyper_parameters", {}).get("_class_path")  # written by LightningCLI
    if class_path:
        module_name, _, class_name = class_path.rpartition(".")
        try:
            return getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            raise CheckpointError(
                f"checkpoint was written by {class_path}, which cannot be imported; install the package that defines it."
            ) from None
    name = ckpt.get("lightning_ddd_class")  # written by every lightning_ddd module
    return _loaded_module_class(name) if name else None


def _loaded_module_class(name: str) -> type | None:
    """The ``lightning_ddd`` LightningModule subclass called ``name`` among the classes defined so far."""
    pending, seen = [pl.LightningModule], set()
    while pending:
        for cls in pending.pop().__subclasses__():
            if cls in seen:
                continue
            seen.add(cls)
            pending.append(cls)
            if cls.__name__ == name and cls.__module__.startswith("lightning_ddd."):
                return cls
    return None


def validate_checkpoint(path: str, expected_class: type | None = None) -> dict[str, Any]:
    """Read ``path`` and check that it was written by ``expected_class``, a subclass or a parent, else raise."""
    ckpt = read_checkpoint(path)
    check_class(ckpt, path, expected_class)
    return ckpt


def check_class(ckpt: dict[str, Any], path: str, expected_class: type | None) -> None:
    """Raise unless the checkpoint was written by ``expected_class``, a subclass or a parent of it."""
    found = checkpoint_class(ckpt)
    if expected_class is not None and found is not None:
        if not (issubclass(found, expected_class) or issubclass(expected_class, found)):
            raise CheckpointError(
                f"checkpoint '{path}' holds {checkpoint_origin(ckpt, path)} but this run needs a "
                f"{expected_class.__name__}; use a {expected_class.__name__} checkpoint or change the model's class_path."
            )


def checkpoint_origin(ckpt: dict[str, Any], path: str) -> str:
    """Where a checkpoint comes from, for error messages: its class, step and run folder."""
    name = ckpt.get("lightning_ddd_class") or ckpt.get("hyper_parameters", {}).get("_class_path", "").rpartition(".")[2]
    parts = [f"a {name}" if name else "a model", f"at step {ckpt['global_step']}" if "global_step" in ckpt else ""]
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.basename(folder) == "checkpoints":  # <run>/checkpoints/<file>.ckpt, as Lightning writes them
        parts.append(f"from the run in '{os.path.dirname(folder)}'")
    return " ".join(p for p in parts if p)


def check_state_dict(model: torch.nn.Module, ckpt: dict[str, Any], path: str, shown: int = 3) -> None:
    """Raise ``CheckpointError`` naming a few missing, unexpected and mis-shaped weights if the checkpoint's
    ``state_dict`` does not fit ``model`` (the model a config builds, before any weight is loaded)."""
    hparams = ckpt.get("hyper_parameters", {})
    for name in ("vocab_size", "seq_len"):  # the data decides these: say so rather than list weight shapes
        if name in hparams and getattr(model, name, hparams[name]) != hparams[name]:
            raise CheckpointError(
                f"checkpoint '{path}' was trained with {name}={hparams[name]} but this run's data has "
                f"{name}={getattr(model, name)}; use the data the checkpoint was trained on."
            )
    expected, found = model.state_dict(), ckpt["state_dict"]
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [f"{k} {tuple(found[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in found and hasattr(found[k], "shape") and tuple(found[k].shape) != tuple(v.shape)]
    problems = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("shape (checkpoint vs model)", shapes)):
        if names:
            more = f" and {len(names) - shown} more" if len(names) > shown else ""
            problems.append(f"{label}: {', '.join(names[:shown])}{more}")
    if problems:
        raise CheckpointError(
            f"checkpoint '{path}' ({checkpoint_origin(ckpt, path)}) does not fit the model this config builds "
            f"({'; '.join(problems)}); use the config it was trained with (its run folder holds config.yaml)."
        )


def file_sha256(path: str) -> str:
    """Content hash of a file (students record their teacher's)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
