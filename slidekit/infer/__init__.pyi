"""Type stub of ``slidekit.infer``: every name of its ``__all__`` for type checkers. At runtime
``__init__.py`` loads some of them on first use (PEP 562); tests/test_public_api.py checks that
this stub and ``__all__`` name the same objects."""
from slidekit.infer.cells import (
    CELL_OUTPUTS as CELL_OUTPUTS,
    cells_slide as cells_slide,
    measure_instances as measure_instances,
    split_instances as split_instances,
)
from slidekit.infer.gpu_decode import (
    BatchDecoder as BatchDecoder,
    StreamBatches as StreamBatches,
    StreamDecoder as StreamDecoder,
    decode_path as decode_path,
)
from slidekit.infer.heatmap import HEATMAP_FORMAT as HEATMAP_FORMAT, Heatmap as Heatmap, HeatmapWriter as HeatmapWriter
from slidekit.infer.heatmap_tiff import TIFF_MODES as TIFF_MODES, write_heatmap_tiff as write_heatmap_tiff
from slidekit.infer.legend import draw_legend as draw_legend, legend_info as legend_info, read_legend as read_legend
from slidekit.infer.ome_zarr import write_heatmap_ome_zarr as write_heatmap_ome_zarr, write_ome_zarr as write_ome_zarr
from slidekit.infer.predictor import (
    Predictor as Predictor,
    checkpoint_stain as checkpoint_stain,
    heatmap_slide as heatmap_slide,
    load_model as load_model,
    resolve_stain as resolve_stain,
)

__all__ = [
    "Heatmap",
    "HeatmapWriter",
    "HEATMAP_FORMAT",
    "write_heatmap_tiff",
    "TIFF_MODES",
    "read_legend",
    "draw_legend",
    "legend_info",
    "write_ome_zarr",
    "write_heatmap_ome_zarr",
    "Predictor",
    "heatmap_slide",
    "load_model",
    "resolve_stain",
    "checkpoint_stain",
    "decode_path",
    "BatchDecoder",
    "StreamBatches",
    "StreamDecoder",
    "cells_slide",
    "split_instances",
    "measure_instances",
    "CELL_OUTPUTS",
]
