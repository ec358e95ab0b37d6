"""LightningModules: the shared base and the teacher (students subclass the base)."""

from lightning_ddd.modules.base import DiffusionModule
from lightning_ddd.modules.teacher import DiffusionTeacher

__all__ = ["DiffusionModule", "DiffusionTeacher"]
