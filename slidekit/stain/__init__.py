"""Stain tools on torch batches: normalisation to a reference (Macenko, Reinhard; ``normalize``) and
augmentation for trainers (HED jitter, RandStainNA; ``augment``).

Imports: ``slidekit.base`` only. Loads torch.
"""
from slidekit.stain.augment import STAIN_AUGMENTS, HEDJitter, RandStainNA, augmenter_from_options, hed_shift
from slidekit.stain.normalize import STAIN_METHODS, StainNormalizer, normalizer_from_options

__all__ = ["StainNormalizer", "normalizer_from_options", "STAIN_METHODS", "HEDJitter", "RandStainNA", "hed_shift",
           "augmenter_from_options", "STAIN_AUGMENTS"]
