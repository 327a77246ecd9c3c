"""Regions of a slide: tissue masks (``tissue``), tile grids at a target MPP and fast tile reads
(``tiling``), regions of interest (``roi``), patch export for other tools (``patches``).

Imports: ``slidekit.base``, ``slidekit.slides``, ``slidekit.annotations``. Never loads torch.
"""
from slidekit.regions.patches import export_patches
from slidekit.regions.roi import read_roi
from slidekit.regions.tiling import TileGrid, TileReader, make_grid, read_tiles
from slidekit.regions.tissue import TissueMask, detect_tissue, mask_to_polygons, save_tissue, tissue_mask

__all__ = ["TissueMask", "tissue_mask", "detect_tissue", "mask_to_polygons", "save_tissue", "TileGrid",
           "TileReader", "read_tiles", "make_grid", "read_roi", "export_patches"]
