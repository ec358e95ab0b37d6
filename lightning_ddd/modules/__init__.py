"""LightningModules: the shared base, the teachers (trained or released), the distilled students and the AR
evaluator model."""

from lightning_ddd.modules.autoregressive import ARLanguageModel
from lightning_ddd.modules.base import DiffusionModule
from lightning_ddd.modules.dmmd_student import DMMDStudent
from lightning_ddd.modules.mixture_student import MixtureStudent
from lightning_ddd.modules.released_teacher import ReleasedTeacher
from lightning_ddd.modules.sdtt_student import SDTTStudent
from lightning_ddd.modules.student import DistilledStudent
from lightning_ddd.modules.teacher import DiffusionTeacher
from lightning_ddd.modules.teacher_source import TeacherOptions, load_teacher_source

__all__ = [
    "ARLanguageModel",
    "DMMDStudent",
    "DiffusionModule",
    "DiffusionTeacher",
    "DistilledStudent",
    "MixtureStudent",
    "ReleasedTeacher",
    "SDTTStudent",
    "TeacherOptions",
    "load_teacher_source",
]
