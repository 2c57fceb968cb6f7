"""Model registry: a validated model config -> the model it describes."""

from __future__ import annotations

from dataclasses import fields

from crosstower.config import (
    CrossConfig,
    DSSMConfig,
    InttowerConfig,
    LateInteractionConfig,
    MVKEConfig,
    PopularityConfig,
    SparCodeConfig,
    TokenTwoTowerConfig,
    YouTubeDNNConfig,
)
from crosstower.data.dataset import Dataset
from crosstower.errors import ConfigError
from crosstower.models.base import EmbeddingRecommender, Recommender
from crosstower.models.cross import CrossEncoder, CrossSettings
from crosstower.models.inttower import IntTower, IntTowerSettings
from crosstower.models.late_interaction import LateInteraction, LateInteractionSettings
from crosstower.models.mvke import MVKE, MVKESettings
from crosstower.models.popularity import Popularity
from crosstower.models.sparcode import SparCode, SparCodeSettings
from crosstower.models.token_two_tower import TokenTwoTower
from crosstower.models.two_tower import TwoTower, TwoTowerSettings

__all__ = [
    "build_model", "Recommender", "EmbeddingRecommender", "CrossEncoder", "IntTower", "LateInteraction", "MVKE",
    "Popularity", "SparCode", "TokenTwoTower", "TwoTower",
]


# Models over the shared token substrate: their settings dataclass and class, by config type.
_TOKEN_SUBSTRATE_MODELS = {
    CrossConfig: (CrossSettings, CrossEncoder),
    LateInteractionConfig: (LateInteractionSettings, LateInteraction),
}


def _settings(settings_class, config, **fixed):
    """The dataclass of settings filled from the config keys it declares."""
    names = {f.name for f in fields(settings_class)}
    return settings_class(**{k: v for k, v in config.model_dump().items() if k in names}, **fixed)


def _user_fields_for(protocol: str, requested: list[str] | None, dataset: Dataset) -> list[str] | None:
    if protocol not in ("p2", "p3"):
        return requested
    if requested is None:
        return [f for f in dataset.users.fields if f != "user_id"]
    if "user_id" in requested:
        raise ConfigError(f"model.user_fields: 'user_id' is untrained for held-out users under {protocol}")
    return requested


def build_model(config, dataset: Dataset, protocol: str = "p1", history_length: int = 50) -> Recommender:
    """The model ``config`` describes, for ``dataset`` under ``protocol``.

    Under P2/P3 the evaluated users were never trained on, so a ``user_id`` embedding would be
    untrained noise for them: it is left out by default and refused when asked for. Under P3
    the evaluated users have no history, so the user tower does not read one in training either.
    """
    if isinstance(config, PopularityConfig):
        return Popularity(dataset.num_items)
    if type(config) in _TOKEN_SUBSTRATE_MODELS:
        settings_class, model_class = _TOKEN_SUBSTRATE_MODELS[type(config)]
        settings = _settings(settings_class, config, max_history=history_length)
        settings.user_fields = _user_fields_for(protocol, settings.user_fields, dataset)
        return model_class(dataset, settings)
    if isinstance(config, (SparCodeConfig, TokenTwoTowerConfig)):
        settings = _settings(SparCodeSettings, config, quantize=config.name == "sparcode", max_history=history_length)
        settings.user_fields = _user_fields_for(protocol, settings.user_fields, dataset)
        return TokenTwoTower(dataset, settings) if config.name == "twotower" else SparCode(dataset, settings)
    if isinstance(config, (DSSMConfig, YouTubeDNNConfig)):
        settings = _settings(TwoTowerSettings, config)
        settings.user_fields = _user_fields_for(protocol, settings.user_fields, dataset)
        if protocol == "p3":
            settings.use_history = False
        if settings.use_example_age and not dataset.has_time:
            settings.use_example_age = False  # no time stamps: example age carries nothing
        return TwoTower(dataset, settings)
    if isinstance(config, MVKEConfig):
        settings = _settings(MVKESettings, config, use_history=protocol != "p3")
        settings.user_fields = _user_fields_for(protocol, settings.user_fields, dataset)
        return MVKE(dataset, settings)
    if isinstance(config, InttowerConfig):
        settings = _settings(IntTowerSettings, config, use_history=protocol != "p3")
        settings.user_fields = _user_fields_for(protocol, settings.user_fields, dataset)
        return IntTower(dataset, settings)
    raise TypeError(f"no model for config {type(config).__name__}")
