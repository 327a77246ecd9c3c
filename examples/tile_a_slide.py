"""Open a slide, find its tissue, tile it at 0.5 µm/px and save a contact sheet of tiles.

    python examples/tile_a_slide.py [SLIDE] [--out DIR]

Without SLIDE it uses the embedded demo slide. Runs in seconds on a laptop CPU.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import cv2
import numpy as np

import slidekit as sk
from slidekit.slides.demo import write_demo_slide


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("slide", nargs="?")
    ap.add_argument("--out", type=Path, default=Path("tiles_out"))
    args = ap.parse_args()
    path = args.slide or write_demo_slide(Path(tempfile.mkdtemp()) / "demo.tif")
    args.out.mkdir(parents=True, exist_ok=True)
    with sk.open_slide(path) as slide:
        print(slide)
        mask = sk.tissue_mask(slide)
        mask.to_png(args.out / "tissue.png")
        grid = sk.TileGrid.from_slide(slide, mpp=0.5, size=256, mask=mask, min_tissue=0.5)
        grid.save(args.out / "grid.npz")
        print(f"{len(grid)} tiles with >= 50% tissue, {mask.area_um2 / 1e6:.3f} mm² of tissue")
        tiles = [tile for _, tile in sk.read_tiles(slide, grid, workers=2)][:16]
    sheet = np.vstack([np.hstack(tiles[i:i + 4]) for i in range(0, len(tiles) - len(tiles) % 4, 4)])
    cv2.imwrite(str(args.out / "tiles.jpg"), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    print(f"wrote {args.out}/tissue.png, grid.npz, tiles.jpg")


if __name__ == "__main__":
    main()
