"""Opt-in ``torch.compile`` of the networks, in place, for ``fit``, ``sample`` and ``evaluate`` alike."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_ddd.compat import is_compiled


class Compile(Callback):
    """Compiles the module's networks with ``torch.compile`` (off unless this callback is in the list).

    ``nn.Module.compile`` works in place, so parameter names, ``state_dict`` keys, checkpoints, the EMA and the
    optimiser see the same module as without it. Applied in ``setup`` (before the strategy wraps the module)
    and by the ``sample`` and ``evaluate`` subcommands when the config lists this callback. The first steps
    are slow while the graphs compile; sampling's last, smaller batch and the caching sampler's row subsets
    recompile once with dynamic shapes.

    Args:
        modules: dotted attribute paths of the networks to compile; paths a module lacks are skipped (the
            default covers a teacher, the D-MMD auxiliary and a student's frozen teacher).
        mode: ``torch.compile`` mode (None, "reduce-overhead", "max-autotune", ...).
        backend: ``torch.compile`` backend ("inductor"; "aot_eager" traces without generating code).
        dynamic: ``torch.compile``'s dynamic-shape setting (None: automatic).
        fullgraph: fail on graph breaks instead of falling back to Python.
    """

    def __init__(
        self,
        modules: list[str] = ["backbone", "aux_backbone", "teacher.backbone"],
        mode: str | None = None,
        backend: str = "inductor",
        dynamic: bool | None = None,
        fullgraph: bool = False,
    ) -> None:
        if not modules:
            raise ValueError("Compile: give at least one module path, e.g. ['backbone'].")
        self.modules, self.mode, self.backend, self.dynamic, self.fullgraph = list(modules), mode, backend, dynamic, fullgraph

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.apply(pl_module)

    def apply(self, model: nn.Module) -> list[str]:
        """Compile every listed network ``model`` has (each once); return the paths compiled now or before."""
        found = []
        for path in self.modules:
            target = model
            for name in path.split("."):
                target = getattr(target, name, None)
            if not isinstance(target, nn.Module):
                continue
            if not is_compiled(target):
                target.compile(mode=self.mode, backend=self.backend, dynamic=self.dynamic, fullgraph=self.fullgraph)
            found.append(path)
        if not found:
            raise ValueError(f"Compile: {type(model).__name__} has none of the modules {self.modules}.")
        return found
