"""Inference to slide maps: the ``Predictor`` and the resumable ``heatmap_slide`` job (``predictor``),
GPU JPEG decode (``gpu_decode``), the chunked zarr heatmap (``heatmap``), the overlay legend
(``legend``), the heatmap as a pyramidal TIFF (``heatmap_tiff``).

Imports: every stage below (``base`` to ``data``). ``predictor`` and ``gpu_decode`` load torch
(re-exported lazily here); ``heatmap``, ``legend`` and ``heatmap_tiff`` do not.
"""
from slidekit.base.lazy import lazy_exports
from slidekit.infer.heatmap import Heatmap, HeatmapWriter
from slidekit.infer.heatmap_tiff import write_heatmap_tiff

__all__ = ["Heatmap", "HeatmapWriter", "write_heatmap_tiff", "Predictor", "heatmap_slide", "load_model"]
__getattr__, __dir__ = lazy_exports(__name__, {"Predictor": ".predictor", "heatmap_slide": ".predictor",
                                               "load_model": ".predictor"})
