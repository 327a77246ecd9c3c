"""Annotations: the QuPath object model (``objects``), QuPath GeoJSON and ASAP/ImageScope XML in
and out (``formats``), the fill rule, clipping and rasterising (``geometry``), scribbles from
instance masks and segmentation scores (``scribbles``).

Imports: ``slidekit.base`` only (annotations are level-0 geometry; they need no slide). Never
loads torch.
"""
from __future__ import annotations

from slidekit.annotations.formats import MAX_ANNOTATION_BYTES, read_annotations, write_geojson
from slidekit.annotations.geometry import clip_annotations, filled_area, filled_geometry, make_valid, rasterize
from slidekit.annotations.objects import KINDS, Annotation, default_color
from slidekit.base.lazy import lazy_exports

__all__ = ["Annotation", "KINDS", "default_color", "read_annotations", "write_geojson", "MAX_ANNOTATION_BYTES",
           "rasterize", "clip_annotations", "filled_area", "filled_geometry", "make_valid", "generate_scribbles",
           "instances_from_mask", "object_dice", "foreground_iou", "segmentation_scores", "IGNORE"]
# scribbles loads scikit-image: on first use only, so reading annotations stays quick to start.
__getattr__, __dir__ = lazy_exports(__name__, {name: ".scribbles" for name in (
    "generate_scribbles", "instances_from_mask", "object_dice", "foreground_iou", "segmentation_scores", "IGNORE")})
