"""Inference to slide maps: the ``Predictor`` and the resumable ``heatmap_slide`` job (``predictor``),
GPU JPEG decode (``gpu_decode``), the chunked zarr heatmap (``heatmap``), the overlay legend
(``legend``), the heatmap as a pyramidal TIFF (``heatmap_tiff``), slide maps as OME-Zarr
(``ome_zarr``), nuclei instances and measurements, the resumable ``cells_slide`` job (``cells``).

Imports: every stage below (``base`` to ``data``). ``predictor``, ``gpu_decode`` and ``cells`` load torch
(re-exported lazily here); ``heatmap``, ``legend``, ``heatmap_tiff`` and ``ome_zarr`` do not.
"""
from __future__ import annotations

from slidekit.base.lazy import lazy_exports
from slidekit.infer.heatmap import HEATMAP_FORMAT, Heatmap, HeatmapWriter
from slidekit.infer.heatmap_tiff import TIFF_MODES, write_heatmap_tiff
from slidekit.infer.legend import draw_legend, legend_info, read_legend
from slidekit.infer.ome_zarr import write_heatmap_ome_zarr, write_ome_zarr

_LAZY = {name: ".predictor" for name in ("Predictor", "heatmap_slide", "load_model", "resolve_stain",
                                         "checkpoint_stain")}
_LAZY.update({name: ".gpu_decode" for name in ("decode_path", "BatchDecoder", "StreamBatches", "StreamDecoder")})
_LAZY.update({name: ".cells" for name in ("cells_slide", "split_instances", "measure_instances", "CELL_OUTPUTS")})

__all__ = ["Heatmap", "HeatmapWriter", "HEATMAP_FORMAT", "write_heatmap_tiff", "TIFF_MODES", "read_legend",
           "draw_legend", "legend_info", "write_ome_zarr", "write_heatmap_ome_zarr", *_LAZY]
__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
