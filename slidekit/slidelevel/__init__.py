"""From slide maps to slide decisions: patch embeddings (``embed``), top-K tiles (``topk``),
morphology features of heatmaps (``features``), pN staging and weighted kappa (``staging``),
linear evaluation of frozen features (``linear_eval``).

Imports: every stage below (``base`` to ``infer``). ``embed`` and ``linear_eval`` load torch
(re-exported lazily here); the rest does not.
"""
from slidekit.base.lazy import lazy_exports
from slidekit.slidelevel.features import features_table, heatmap_features
from slidekit.slidelevel.staging import pn_stage, stage_table, weighted_kappa
from slidekit.slidelevel.topk import TopK, topk_from_heatmap, topk_from_scores, topk_mean

__all__ = ["features_table", "heatmap_features", "pn_stage", "stage_table", "weighted_kappa", "TopK",
           "topk_from_heatmap", "topk_from_scores", "topk_mean", "embed_slide", "open_embeddings", "linear_eval"]
__getattr__, __dir__ = lazy_exports(__name__, {"embed_slide": ".embed", "open_embeddings": ".embed",
                                               "linear_eval": ".linear_eval"})
