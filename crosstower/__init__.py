"""crosstower: candidate retrieval beyond the two-tower model."""

__version__ = "0.1.0"
