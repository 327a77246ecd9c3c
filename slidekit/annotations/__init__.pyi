"""Type stub of ``slidekit.annotations``: every name of its ``__all__`` for type checkers. At runtime
``__init__.py`` loads some of them on first use (PEP 562); tests/test_public_api.py checks that
this stub and ``__all__`` name the same objects."""
from slidekit.annotations.formats import (
    MAX_ANNOTATION_BYTES as MAX_ANNOTATION_BYTES,
    read_annotations as read_annotations,
    write_geojson as write_geojson,
)
from slidekit.annotations.geometry import (
    clip_annotations as clip_annotations,
    filled_area as filled_area,
    filled_geometry as filled_geometry,
    make_valid as make_valid,
    rasterize as rasterize,
)
from slidekit.annotations.objects import KINDS as KINDS, Annotation as Annotation, default_color as default_color
from slidekit.annotations.scribbles import (
    IGNORE as IGNORE,
    foreground_iou as foreground_iou,
    generate_scribbles as generate_scribbles,
    instances_from_mask as instances_from_mask,
    object_dice as object_dice,
    segmentation_scores as segmentation_scores,
)

__all__ = [
    "Annotation",
    "KINDS",
    "default_color",
    "read_annotations",
    "write_geojson",
    "MAX_ANNOTATION_BYTES",
    "rasterize",
    "clip_annotations",
    "filled_area",
    "filled_geometry",
    "make_valid",
    "generate_scribbles",
    "instances_from_mask",
    "object_dice",
    "foreground_iou",
    "segmentation_scores",
    "IGNORE",
]
