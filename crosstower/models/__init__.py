"""The models, found by name.

Every module of this package is imported here, and each model's configuration class registers
itself under its names when its module is imported (:class:`crosstower.config.ModelConfig`), so
adding a model is adding its module: no list to edit. :func:`build_model` turns a validated
``model`` section into the model it describes.
"""

from __future__ import annotations

import importlib
import pkgutil

from crosstower.config import ModelConfig, model_config_class
from crosstower.data.dataset import Dataset
from crosstower.models.base import BuildContext, EmbeddingRecommender, Recommender

__all__ = ["BuildContext", "EmbeddingRecommender", "Recommender", "build_model", "model_config_class"]

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def build_model(config: ModelConfig, dataset: Dataset, protocol: str = "p1", history_length: int = 50) -> Recommender:
    """The untrained model ``config`` describes, for ``dataset`` under ``protocol``.

    Under P2/P3 the evaluated users were never trained on, so a ``user_id`` embedding would be
    untrained noise for them: it is left out by default and refused when asked for. Under P3
    the evaluated users have no history, so the user side does not read one in training either
    (:class:`~crosstower.models.base.BuildContext`).
    """
    return config.build(dataset, BuildContext(protocol, history_length))
