"""Data layer: schema, loaders, synthetic generator, splits, negative samplers and batching."""

from crosstower.data.dataset import Dataset, build_dataset
from crosstower.data.ragged import Ragged
from crosstower.data.schema import Field, FieldKind, FeatureTable

__all__ = ["Dataset", "build_dataset", "Ragged", "Field", "FieldKind", "FeatureTable"]
