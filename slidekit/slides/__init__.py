"""Slides: ``Slide`` over OpenSlide, tiffslide and Pillow with its MPP rules (``slide``), the
TIFF structure check and direct stored-tile decode (``tiffio``), DICOM WSI series (``dicom``),
whole-slide overviews (``whole``), a slide file's identity (``identity``), the demo slide and
synthetic pyramids (``demo``).

Imports: ``slidekit.base`` only. Never loads torch.
"""
from slidekit.slides.demo import DEMO_MPP, demo_image, write_demo_slide, write_pyramid
from slidekit.slides.dicom import DicomStoredTiles, is_dicom_folder
from slidekit.slides.identity import slide_fingerprint
from slidekit.slides.slide import BACKENDS, Slide, magnification_to_mpp, mpp_to_magnification, open_slide
from slidekit.slides.tiffio import StoredTiles, check_tiff_structure
from slidekit.slides.whole import read_downsampled

__all__ = ["Slide", "open_slide", "BACKENDS", "mpp_to_magnification", "magnification_to_mpp", "slide_fingerprint",
           "check_tiff_structure", "StoredTiles", "is_dicom_folder", "DicomStoredTiles", "read_downsampled",
           "write_demo_slide", "write_pyramid", "demo_image", "DEMO_MPP"]
