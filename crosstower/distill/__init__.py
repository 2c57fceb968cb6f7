"""Distillation: a strong, slow teacher trains a fast two-tower student.

The run's ``model`` is the student (an inner-product model, served like DSSM); its ``distill``
section names the method and the teacher. Every module of this package that defines a method
registers its configuration under the method's name when imported
(:class:`crosstower.config.DistillConfig`), so adding a method is adding its module.
"""

from __future__ import annotations

import importlib
import pkgutil

from crosstower.distill.distiller import DistillContext, Distiller, build_distiller
from crosstower.distill.teacher import Teacher, load_teacher

__all__ = ["DistillContext", "Distiller", "Teacher", "build_distiller", "load_teacher"]

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
