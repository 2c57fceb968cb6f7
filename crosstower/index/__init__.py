"""Indexes that serve a trained model: one protocol (:class:`Index`), several implementations.

``Index.load(path)`` opens any saved index; each class's ``describe()`` feeds the ``"index"``
entry of a run's ``metrics.json``.
"""

from crosstower.index.base import Index
from crosstower.index.code_ids import CodeQueries, encode_code_ids, every_code
from crosstower.index.exact import ExactInnerProductIndex
from crosstower.index.faiss_inner_product import FaissInnerProductIndex
from crosstower.index.late_interaction import LateInteractionIndex
from crosstower.index.sparse_code import SparseCodeIndex
from crosstower.index.two_rankers import TwoRankerIndex, TwoRankerQuery

__all__ = ["CodeQueries", "ExactInnerProductIndex", "FaissInnerProductIndex", "Index", "LateInteractionIndex", "SparseCodeIndex",
           "TwoRankerIndex", "TwoRankerQuery", "encode_code_ids", "every_code"]
