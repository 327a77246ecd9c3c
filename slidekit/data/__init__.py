"""Training data: seeded samplers (``sampling``) and torch datasets over slides and image folders
(``datasets``), and the PASCAL VOC + ScribbleSup folder layout (``voc``).

Imports: ``slidekit.base``, ``slidekit.slides``, ``slidekit.annotations``, ``slidekit.regions``. Loads torch.
"""
from slidekit.data.datasets import ImageFolderDataset, JointAugment, SlidePatchDataset, list_images, load_image_folder
from slidekit.data.sampling import (
    ClassBalancedSampler,
    FixedRatioSampler,
    HardNegativeSampler,
    PerSlideCapSampler,
    UniformSampler,
    WeightedSampler,
    ratio_counts,
)
from slidekit.data.voc import VOC_CLASSES, VocSource, voc_source

__all__ = ["SlidePatchDataset", "ImageFolderDataset", "JointAugment", "load_image_folder", "list_images",
           "UniformSampler", "PerSlideCapSampler", "WeightedSampler", "ClassBalancedSampler", "HardNegativeSampler",
           "FixedRatioSampler", "ratio_counts", "VOC_CLASSES", "VocSource", "voc_source"]
