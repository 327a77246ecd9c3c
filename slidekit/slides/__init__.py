"""Slides: ``Slide`` over OpenSlide, tiffslide and Pillow with its MPP rules (``slide``), the
TIFF structure check and direct stored-tile decode (``tiffio``), DICOM WSI series (``dicom``),
whole-slide overviews (``whole``), a slide file's identity (``identity``), the demo slide and
synthetic pyramids (``demo``).

Imports: ``slidekit.base`` only. Never loads torch.
"""
from slidekit.slides.demo import write_demo_slide, write_pyramid
from slidekit.slides.identity import slide_fingerprint
from slidekit.slides.slide import Slide, magnification_to_mpp, mpp_to_magnification, open_slide

__all__ = ["Slide", "open_slide", "mpp_to_magnification", "magnification_to_mpp", "slide_fingerprint",
           "write_demo_slide", "write_pyramid"]
