"""Evaluation: exact full-ranking metrics (Recall, NDCG, Precision, HitRate, MRR) and pointwise
metrics (AUC, GAUC, log loss)."""

from crosstower.evaluate.pointwise import auc, gauc, log_loss
from crosstower.evaluate.ranking import METRICS, Scorer, evaluate_ranking, topk_items

__all__ = ["METRICS", "Scorer", "auc", "evaluate_ranking", "gauc", "log_loss", "topk_items"]
