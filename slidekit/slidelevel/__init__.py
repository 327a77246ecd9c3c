"""From slide maps to slide decisions: patch embeddings (``embed``), top-K tiles (``topk``),
morphology features of heatmaps (``features``), pN staging and weighted kappa (``staging``),
linear evaluation of frozen features (``linear_eval``).

Imports: every stage below (``base`` to ``infer``). ``embed`` and ``linear_eval`` load torch
(re-exported lazily here, as are ``features`` and ``topk``, which load zarr and scikit-image);
``staging`` loads neither.
"""
from slidekit.base.lazy import lazy_exports
from slidekit.slidelevel.staging import pn_stage, stage_table, weighted_kappa

__all__ = ["features_table", "heatmap_features", "pn_stage", "stage_table", "weighted_kappa", "TopK",
           "topk_from_heatmap", "topk_from_scores", "topk_mean", "embed_slide", "open_embeddings", "linear_eval"]
# embed and linear_eval load torch, features and topk zarr and scikit-image: on first use only.
__getattr__, __dir__ = lazy_exports(__name__, {
    "embed_slide": ".embed", "open_embeddings": ".embed", "linear_eval": ".linear_eval",
    "features_table": ".features", "heatmap_features": ".features", "TopK": ".topk",
    "topk_from_heatmap": ".topk", "topk_from_scores": ".topk", "topk_mean": ".topk"})
