"""The legend under a heatmap overlay: slide name, a scale bar in µm, and what the colours mean
(a colour bar with the value range for one-class models, class names with their colours for several).

The same facts are stored as PNG text (``slidekit.infer.legend``: JSON), so a program can read what a
person sees.
"""
from __future__ import annotations

import json
import math
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from slidekit.base.io import atomic_path

MIN_WIDTH = 360  # px: narrower overlays get a wider legend panel (white beside the image)
PAD = 8


def nice_length(target: float) -> float:
    """The largest 1, 2 or 5 x 10^k not above ``target`` (a scale bar's length)."""
    if target <= 0:
        return 0.0
    k = math.floor(math.log10(target))
    for m in (5, 2, 1):
        if m * 10 ** k <= target:
            return float(m * 10 ** k)
    return float(10 ** k)


def _font(size: int) -> tuple[Any, str]:
    """A font of ``size`` px and how it writes micrometres: DejaVu Sans (has µ) when installed,
    else Pillow's built-in font, whose µ is missing, with "um"."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size), "µm"
    except OSError:
        return ImageFont.load_default(size=size), "um"


def _um_text(um: float, micro: str = "µm") -> str:
    return f"{um / 1000:g} mm" if um >= 1000 else f"{um:g} {micro}"


def legend_info(heatmap: Any, slide_name: str, px_um: float, width: int, value_range: tuple[float, float]) -> dict:
    """What the legend says: slide, scale bar (µm and px), and the colour key."""
    bar_um = nice_length(width * px_um / 4)
    info = {"slide": slide_name, "scale_bar_um": bar_um, "scale_bar_px": round(bar_um / px_um),
            "overlay_um_per_px": px_um}
    if len(heatmap.classes) == 1 or heatmap.prob.shape[0] == 1:
        info.update(kind="colorbar", label=heatmap.classes[0] if heatmap.classes else "value",
                    range=[float(value_range[0]), float(value_range[1])], colormap="jet")
    else:
        colors = heatmap.colors or [(255, 0, 0)] * len(heatmap.classes)
        # class 0 is background: the overlay leaves it uncoloured
        info.update(kind="classes", classes=[{"name": c, "color": list(map(int, colors[i]))}
                                             for i, c in enumerate(heatmap.classes) if i > 0],
                    uncoloured=heatmap.classes[0])
    return info


def draw_legend(image: np.ndarray, info: dict) -> np.ndarray:
    """``image`` (RGB uint8) with the legend panel of ``info`` below it."""
    h, w = image.shape[:2]
    W = max(w, MIN_WIDTH)
    size = max(12, min(24, W // 90))
    font, micro = _font(size)
    line = size + 6
    rows = 2 if info["kind"] == "colorbar" else 1 + math.ceil(len(info["classes"]) / 3)
    panel_h = PAD * 2 + line * (rows + 1)
    canvas = Image.new("RGB", (W, h + panel_h), (255, 255, 255))
    canvas.paste(Image.fromarray(image), (0, 0))
    d = ImageDraw.Draw(canvas)
    y = h + PAD
    # Slide name on the left, the scale bar on the right of the first row.
    d.text((PAD, y), info["slide"], fill=(0, 0, 0), font=font)
    bar = max(1, int(info["scale_bar_px"]))
    label = _um_text(info["scale_bar_um"], micro)
    tw = d.textlength(label, font=font)
    x1 = W - PAD
    x0 = x1 - bar
    d.rectangle([x0, y + size // 2 - 2, x1, y + size // 2 + 2], fill=(0, 0, 0))
    d.text((x0 - tw - 6, y), label, fill=(0, 0, 0), font=font)
    y += line + 4
    if info["kind"] == "colorbar":
        lo, hi = info["range"]
        bw = max(64, min(W // 3, W - 2 * PAD - 160))
        ramp = cv2.applyColorMap(np.linspace(0, 255, bw).astype(np.uint8)[None], cv2.COLORMAP_JET)[0, :, ::-1]
        strip = np.repeat(ramp[None], size, axis=0)
        canvas.paste(Image.fromarray(np.ascontiguousarray(strip)), (PAD, y))
        d.rectangle([PAD, y, PAD + bw - 1, y + size - 1], outline=(0, 0, 0))
        d.text((PAD + bw + 8, y - 2), f"{info['label']}", fill=(0, 0, 0), font=font)
        y += size + 2
        d.text((PAD, y), f"{lo:g}", fill=(0, 0, 0), font=font)
        hi_text = f"{hi:g}"
        d.text((PAD + bw - d.textlength(hi_text, font=font), y), hi_text, fill=(0, 0, 0), font=font)
    else:
        col_w = (W - 2 * PAD) // 3
        for i, c in enumerate(info["classes"]):
            cx, cy = PAD + (i % 3) * col_w, y + (i // 3) * line
            d.rectangle([cx, cy + 2, cx + size, cy + size + 2], fill=tuple(c["color"]), outline=(0, 0, 0))
            d.text((cx + size + 6, cy), c["name"], fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def save_png(image: np.ndarray, path: Any, info: dict | None) -> None:
    """Write ``image`` as PNG atomically, with ``info`` as the ``slidekit.infer.legend`` text chunk."""
    from PIL.PngImagePlugin import PngInfo


    meta = PngInfo()
    if info is not None:
        meta.add_text("slidekit.infer.legend", json.dumps(info))
    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG", pnginfo=meta)


def read_legend(path: Any) -> dict | None:
    """The legend facts stored in an overlay PNG (None when it has none)."""
    with Image.open(path) as im:
        text = im.text.get("slidekit.infer.legend") if hasattr(im, "text") else None
    return json.loads(text) if text else None
