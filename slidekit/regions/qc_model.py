"""QC by example: a small pixel classifier trained from scribbles, used as one more QC detector.

A user draws a few scribbles (lines or areas, QuPath annotations) over an artefact the built-in rules
miss, classed e.g. "Artefact", and over good tissue, classed "Tissue". :func:`train_qc_model` reads the
slide at the QC raster's pixel size (``mpp``, 8 µm/px by default), computes per-pixel colour and texture
features (:func:`pixel_features`), and fits a random forest (scikit-learn) on the scribbled pixels.
The model names the QC class its pixels join (``label``, one of ``qc_detect.ARTEFACTS``); ``qc_labels(...,
models=[model])`` adds what it finds to that class. Models are saved with joblib (``QcModel.save`` /
``QcModel.load``); load only files you made yourself (a joblib file can run code when loaded).

Features (all float32, scales in µm so they mean the same at any pixel size): RGB / 255, hue as cos and
sin, saturation and value (HSV), optical density per channel, grey mean and standard deviation over
Gaussian windows of 8 and 32 µm, gradient magnitude and |Laplacian| of the grey view smoothed over 8 µm.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import cv2
import numpy as np

from slidekit.annotations.formats import read_annotations
from slidekit.annotations.geometry import rasterize
from slidekit.annotations.objects import Annotation
from slidekit.base.errors import ConfigError
from slidekit.base.io import atomic_path
from slidekit.regions.qc_detect import ARTEFACTS
from slidekit.slides.slide import open_slide

#: The feature set's version (a saved model records it; another version is refused).
FEATURES_VERSION = 1
FEATURE_NAMES = ("r", "g", "b", "hue_cos", "hue_sin", "sat", "val", "od_r", "od_g", "od_b",
                 "mean_8um", "std_8um", "mean_32um", "std_32um", "gradient", "laplacian")


def pixel_features(rgb: np.ndarray, mpp: float) -> np.ndarray:
    """Per-pixel colour and texture features of an RGB view (``mpp`` µm/px): ``(H, W, 16)`` float32,
    in the order of ``FEATURE_NAMES``."""
    rgb = np.ascontiguousarray(rgb[..., :3])
    out = np.empty(rgb.shape[:2] + (len(FEATURE_NAMES),), np.float32)
    out[..., 0:3] = rgb / np.float32(255)
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    hue = hsv[..., 0].astype(np.float32) * np.float32(np.pi / 90)  # OpenCV hue 0..179 -> radians
    out[..., 3], out[..., 4] = np.cos(hue), np.sin(hue)
    out[..., 5], out[..., 6] = hsv[..., 1] / np.float32(255), hsv[..., 2] / np.float32(255)
    out[..., 7:10] = -np.log(np.maximum(rgb.astype(np.float32), 1) / np.float32(255))
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32) / np.float32(255)
    for i, um in ((10, 8.0), (12, 32.0)):
        s = max(0.5, um / mpp)
        mean = cv2.GaussianBlur(grey, (0, 0), s)
        out[..., i] = mean
        out[..., i + 1] = np.sqrt(np.maximum(cv2.GaussianBlur(grey * grey, (0, 0), s) - mean * mean, 0))
    smooth = cv2.GaussianBlur(grey, (0, 0), max(0.5, 8.0 / mpp))
    gx, gy = cv2.Sobel(smooth, cv2.CV_32F, 1, 0), cv2.Sobel(smooth, cv2.CV_32F, 0, 1)
    out[..., 14] = np.sqrt(gx * gx + gy * gy)
    out[..., 15] = np.abs(cv2.Laplacian(smooth, cv2.CV_32F))
    return out


@dataclass
class QcModel:
    """A pixel classifier for one artefact (see the module docstring).

    Parameters
    ----------
    label
        The QC class its pixels join (one of ``qc_detect.ARTEFACTS``).
    mpp
        µm/px of the view it was trained on; it predicts on views within 1.5x of it.
    classifier
        A fitted scikit-learn classifier on ``pixel_features`` (class 1 = artefact).
    threshold
        Probability of the artefact above which a pixel is flagged.
    trained_on
        What it was trained from (slide, scribble file, pixel counts), for the record.
    """

    label: str
    mpp: float
    classifier: Any
    threshold: float = 0.5
    trained_on: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.label not in ARTEFACTS:
            raise ConfigError(f"QC model class {self.label!r} is not a QC class (one of: {', '.join(ARTEFACTS)})")

    def predict(self, rgb: np.ndarray, mpp: float, *, chunk_rows: int = 256) -> np.ndarray:
        """The artefact's mask (bool) on an RGB view whose pixels are ``mpp`` µm wide."""
        if not (self.mpp / 1.5 <= mpp <= self.mpp * 1.5):
            raise ConfigError(f"QC model trained at {self.mpp:g} µm/px cannot judge a view at {mpp:g} µm/px "
                              "(within 1.5x only); train it at the QC raster's µm/px")
        out = np.zeros(rgb.shape[:2], bool)
        margin = int(np.ceil(3 * 32.0 / mpp)) + 2  # the widest feature window, so bands join seamlessly
        for r0 in range(0, rgb.shape[0], chunk_rows):
            r1 = min(rgb.shape[0], r0 + chunk_rows)
            a, b = max(0, r0 - margin), min(rgb.shape[0], r1 + margin)
            feats = pixel_features(rgb[a:b], mpp)[r0 - a:r1 - a]
            p = self.classifier.predict_proba(feats.reshape(-1, feats.shape[-1]))[:, 1]
            out[r0:r1] = (p > self.threshold).reshape(r1 - r0, -1)
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model (joblib), atomically."""
        import joblib

        path = Path(path)
        with atomic_path(path) as tmp:
            joblib.dump({"format": "slidekit-qc-model", "features_version": FEATURES_VERSION,
                         "label": self.label, "mpp": self.mpp, "threshold": self.threshold,
                         "trained_on": self.trained_on, "classifier": self.classifier}, tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "QcModel":
        """Read a model written by ``save`` (ConfigError for anything else)."""
        import joblib

        try:
            d = joblib.load(path)
        except Exception as e:  # joblib/pickle raise many kinds for a damaged or foreign file
            raise ConfigError(f"{path}: not a readable QC model ({type(e).__name__}: {e})") from None
        if not isinstance(d, dict) or d.get("format") != "slidekit-qc-model":
            raise ConfigError(f"{path}: not a slidekit QC model")
        if d.get("features_version") != FEATURES_VERSION:
            raise ConfigError(f"{path}: QC model of feature version {d.get('features_version')}, this slidekit "
                              f"computes version {FEATURES_VERSION}: train it again")
        return cls(label=d["label"], mpp=float(d["mpp"]), classifier=d["classifier"],
                   threshold=float(d["threshold"]), trained_on=dict(d.get("trained_on") or {}))


@dataclass(frozen=True)
class QcModelTraining:
    """How :func:`train_qc_model` fits: scribbled lines' width (µm; None: two pixels of the view), pixels
    sampled per class at most, trees of the random forest, and its seed."""

    line_width_um: float | None = None
    max_pixels: int = 200_000
    n_estimators: int = 60
    seed: int = 0


def train_qc_model(slide: Any, scribbles: str | os.PathLike | Iterable[Annotation], *, artefact: str,
                   label: str, good: str = "Tissue", mpp: float = 8.0,
                   training: QcModelTraining = QcModelTraining()) -> QcModel:
    """Train a :class:`QcModel` from scribbles over an artefact and over good tissue.

    Parameters
    ----------
    slide
        An open slide (``slidekit.slides.slide.open_slide``) or a path to one.
    scribbles
        A QuPath GeoJSON (or any file ``read_annotations`` reads), or the annotations themselves;
        lines are drawn ``line_width_um`` wide, areas filled.
    artefact, good
        The scribbles' class names over the artefact and over good tissue (the latter may also cover
        glass or anything that must not be flagged).
    label
        The QC class the artefact joins (one of ``qc_detect.ARTEFACTS``, e.g. "Fold").
    mpp
        µm/px of the view the model learns on (the QC raster's, ``QcOptions.mpp``).
    training
        Line width, sampling and forest size (:class:`QcModelTraining`).
    """
    from sklearn.ensemble import RandomForestClassifier

    if label not in ARTEFACTS:
        raise ConfigError(f"QC model class {label!r} is not a QC class (one of: {', '.join(ARTEFACTS)})")
    own = not hasattr(slide, "read_whole")
    s: Any = open_slide(slide) if own else slide
    t = training
    try:
        source = str(scribbles) if isinstance(scribbles, (str, os.PathLike)) else "annotations"
        anns = read_annotations(scribbles) if isinstance(scribbles, (str, os.PathLike)) else list(scribbles)
        view_mpp = max(mpp, *s.mpp)
        rgb = s.read_whole(view_mpp, progress=False)
        W, H = s.dimensions
        marks = rasterize(anns, (0, 0, W, H), view_mpp, labels={good: 1, artefact: 2}, slide_mpp=tuple(s.mpp),
                          fill=0, line_width_um=t.line_width_um or 2 * view_mpp)
        marks = cv2.resize(marks, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_NEAREST)
        n_art, n_good = int((marks == 2).sum()), int((marks == 1).sum())
        if n_art == 0 or n_good == 0:
            missing = artefact if n_art == 0 else good
            raise ConfigError(f"{source}: no scribbled pixels of class {missing!r} on {s.path} at {view_mpp:g} µm/px")
        feats = pixel_features(rgb, view_mpp)
        rng = np.random.default_rng(t.seed)
        picks = [rng.permutation(np.flatnonzero(marks.ravel() == v))[:t.max_pixels] for v in (1, 2)]
        idx = np.concatenate(picks)
        X = feats.reshape(-1, feats.shape[-1])[idx]
        y = (marks.ravel()[idx] == 2).astype(np.uint8)
        clf = RandomForestClassifier(n_estimators=t.n_estimators, max_depth=12, min_samples_leaf=3,
                                     class_weight="balanced", n_jobs=1, random_state=t.seed)
        clf.fit(X, y)
        return QcModel(label=label, mpp=view_mpp, classifier=clf,
                       trained_on={"slide": str(s.path), "scribbles": source, "artefact": artefact, "good": good,
                                   "artefact_pixels": n_art, "good_pixels": n_good})
    finally:
        if own:
            s.close()
