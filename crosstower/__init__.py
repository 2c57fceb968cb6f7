"""crosstower: candidate retrieval beyond the two-tower model.

``crosstower.load_run(DIR)`` opens a finished run as a retriever (:mod:`crosstower.recommend`).
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_run", "Retriever", "Recommendation"]


def __getattr__(name: str) -> Any:
    # Imported on first use: `import crosstower` (and the CLI's start) stays free of torch.
    if name in __all__:
        from crosstower import recommend

        return getattr(recommend, name)
    raise AttributeError(f"module 'crosstower' has no attribute {name!r}")
