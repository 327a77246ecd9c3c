"""From slide maps to slide decisions: patch embeddings (``embed``), per-slide HDF5 feature files
(``feature_store``), top-K tiles (``topk``), morphology features of heatmaps (``features``), pN staging
and weighted kappa (``staging``), linear evaluation of frozen features (``linear_eval``), MIL scoring and
attention maps of feature files (``mil_deploy``), SpatialData stores for wsidata, LazySlide and sopa
(``spatialdata_export`` writes them, ``spatialdata_read`` reads their feature tables as bags), survival and
regression from slides at patient level (``outcomes``: clinical tables, patient bags, C-index, KM plots,
linear baselines; ``outcome_tasks``: the MIL tasks ``survival``, ``regression`` and their variants).

Imports: every stage below (``base`` to ``infer``). ``embed``, ``linear_eval`` and ``mil_deploy`` load
torch (re-exported lazily here, as are ``features`` and ``topk``, which load zarr and scikit-image,
and ``feature_store``, which loads h5py); ``staging`` loads none of them.
"""
from __future__ import annotations

from slidekit.base.lazy import lazy_exports
from slidekit.slidelevel.staging import (
    NODE_LABELS,
    PN_STAGES,
    LabelTable,
    pn_stage,
    read_label_csv,
    score_against,
    stage_csv,
    stage_table,
    weighted_kappa,
    write_submission,
)

# embed, linear_eval and mil_deploy load torch, features and topk zarr and scikit-image, feature_store
# h5py: on first use only.
_LAZY = {name: ".embed" for name in ("embed_slide", "open_embeddings", "Embeddings", "write_cluster_geojson",
                                     "EmbedJob")}
_LAZY.update({name: ".feature_store" for name in (
    "read_features", "iter_feature_chunks", "feature_info", "FeatureBag", "FeatureInfo", "FeatureWriter",
    "write_feature_store", "is_complete_store", "FEATURE_SUFFIXES")})
_LAZY.update({name: ".features" for name in (
    "features_table", "heatmap_features", "annotation_features", "size_class", "predicted_size_class",
    "SIZE_CLASSES", "HeatmapView", "open_heatmap_view", "features_from_view")})
# linear_eval's function of the same name is not re-exported: importing the module anywhere rebinds
# slidekit.slidelevel.linear_eval to the module, so that name would change meaning with import order.
_LAZY.update({name: ".linear_eval" for name in ("linear_probe", "fine_tune", "extract_features")})
_LAZY.update({name: ".mil_tasks" for name in ("MILTask", "Classification", "register_mil_task", "get_mil_task",
                                               "available_mil_tasks", "task_from_checkpoint")})
_LAZY.update({name: ".mil_deploy" for name in ("deploy", "score_file", "read_bag", "BagScore", "attention_outputs")})
# outcomes (survival and regression from slides, docs/outcomes.md): its statistics load scikit-survival,
# its MIL tasks torch.
_LAZY.update({name: ".outcomes" for name in (
    "Endpoint", "read_clinical", "read_slide_table", "patient_bags", "harrell_c", "uno_c", "time_auc",
    "integrated_brier", "survival_metrics", "regression_metrics", "risk_groups", "logrank", "km_plot", "km_from_oof",
    "meanpool_baseline", "linear_baseline")})
_LAZY.update({name: ".outcome_tasks" for name in (
    "Survival", "SurvivalEfron", "SurvivalDiscrete", "Regression", "RegressionL1", "RegressionMSE")})
_LAZY.update({name: ".topk" for name in ("TopK", "topk_from_heatmap", "topk_from_scores", "topk_mean",
                                         "read_score_table")})
# SpatialData stores (wsidata, LazySlide, sopa): spatialdata_export loads spatialdata, spatialdata_read zarr/anndata.
_LAZY.update({name: ".spatialdata_export" for name in ("export_spatialdata", "export_cohort_spatialdata",
                                                        "SpatialDataOptions")})
_LAZY.update({name: ".spatialdata_read" for name in ("open_store_bag", "iter_store_chunks", "StoreBag",
                                                      "is_spatialdata_path")})

__all__ = ["pn_stage", "stage_table", "stage_csv", "weighted_kappa", "read_label_csv", "write_submission",
           "score_against", "LabelTable", "PN_STAGES", "NODE_LABELS", *_LAZY]
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
