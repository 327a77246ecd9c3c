"""Regions of a slide: tissue masks (``tissue``), tile grids at a target MPP and fast tile reads
(``tiling``), regions of interest (``roi``), patch export for other tools (``patches``).

Imports: ``slidekit.base``, ``slidekit.slides``, ``slidekit.annotations``. Never loads torch.
"""
from slidekit.regions.grid_job import GridJob, grid_job, save_grid
from slidekit.regions.job import JobContext, SlideJob, run_job, verify_folder
from slidekit.regions.masks import Intersect, MaskImage, Region, Roi, Subtract, Tissue, WholeSlide, build_region
from slidekit.regions.options import (
                                      OptionGroups,
                                      ReadOptions,
                                      RoiOptions,
                                      RunOptions,
                                      StainNormOptions,
                                      TileOptions,
                                      TissueOptions,
)
from slidekit.regions.patches import export_patches, tile_labels, write_grid_geojson
from slidekit.regions.qc import QcArtefacts, QcJob, QcOptions, qc_job, qc_slide, read_qc_labels
from slidekit.regions.qc_tiles import TileQc, qc_max_of, tile_fractions
from slidekit.regions.qc_zarr import read_label_zarr
from slidekit.regions.roi import read_roi, restrict_mask
from slidekit.regions.tiling import TileGrid, TileReader, make_grid, read_tiles
from slidekit.regions.tissue import TissueMask, detect_tissue, glass_colour, mask_to_polygons, tissue_mask
from slidekit.regions.tissue_job import TissueJob, save_tissue, tissue_job

__all__ = ["TissueMask", "tissue_mask", "detect_tissue", "glass_colour", "mask_to_polygons", "save_tissue",
           "TileGrid", "TileReader", "read_tiles", "make_grid", "read_roi", "restrict_mask", "export_patches",
           "tile_labels", "write_grid_geojson",
           "SlideJob", "JobContext", "run_job", "verify_folder", "TissueJob",
           "Region", "Tissue", "Roi", "MaskImage", "WholeSlide", "Intersect", "Subtract", "build_region",
           "ReadOptions", "TissueOptions", "TileOptions", "RunOptions", "RoiOptions", "StainNormOptions",
           "OptionGroups", "GridJob", "grid_job", "save_grid", "tissue_job",
           "QcOptions", "QcJob", "QcArtefacts", "qc_slide", "qc_job", "read_qc_labels", "TileQc", "qc_max_of",
           "tile_fractions", "read_label_zarr"]
