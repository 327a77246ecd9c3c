"""SimCLR end to end on a laptop CPU: pre-train an encoder on unlabelled patches, embed a slide,
cluster its tiles for QuPath, and hand the encoder to another network.

    python examples/simclr_pretrain.py [--out simclr_example] [--steps 60] [--data DIR]

Patches come from the embedded demo slide (always there) plus, when the real-data folder exists
(``--data``, else ``$SLIDEKIT_DATA``, else ``../shared/data`` beside the checkout), the small real
H&E slides and the MoNuSeg images: a few patches from each
source, balanced per batch. A real run would use many slides and many more steps (see
docs/trainers/simclr.md); this one takes a few minutes.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from slidekit.base.datapaths import add_data_argument, data_dir, data_missing_reason


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("simclr_example"))
    ap.add_argument("--steps", type=int, default=60)
    add_data_argument(ap)
    args = ap.parse_args()
    shared = data_dir(args.data)
    if data_missing_reason(args.data) is not None:
        print(f"{data_missing_reason(args.data)}: pre-training on the demo slide only")

    import torch

    torch.set_num_threads(2)
    from slidekit.models.checkpoint import transfer_encoder
    from slidekit.models.networks import ResNetUNet
    from slidekit.slidelevel.embed import embed_slide, open_embeddings
    from slidekit.slides.demo import write_demo_slide
    from trainers.simclr import SimCLRConfig, SimCLRTrainer

    out = args.out
    demo = out / "demo.tif"
    if not demo.exists():
        write_demo_slide(demo)

    # 1. Sources: the demo slide, plus real H&E when the shared data is there (capped per slide).
    sources = [{"slides": [str(demo)], "cap": 64, "min_tissue": 0.3}]
    if (shared / "wsi").is_dir():
        sources.append({"slides": [str(shared / "wsi" / "CMU-1-Small-Region.svs")], "cap": 64})
    if (shared / "nuclei_monuseg" / "images").is_dir():
        sources.append({"folder": str(shared / "nuclei_monuseg" / "images"), "image_mpp": 0.25, "cap": 4,
                        "weight": 0.5})

    # 2. Pre-train. The same run from the shell: `slidekit train simclr --config cfg.yaml --out DIR`.
    cfg = SimCLRConfig(sources=sources, mpp=1.0, tile_size=96, crop_size=48, batch_size=32, epochs=1,
                       steps_per_epoch=args.steps, optimizer="adam", warmup_epochs=0, seed=0)
    ckpt = SimCLRTrainer(cfg).fit(out / "simclr", device="auto")
    metrics = json.loads((out / "simclr" / "metrics.json").read_text())
    print(f"checkpoint: {ckpt} (loss {metrics[-1]['loss']:.3f} after {metrics[-1]['steps']} steps)")

    # 3. Embed the demo slide tile by tile and cluster the tiles; open clusters.geojson in QuPath.
    store = embed_slide(demo, out / "demo_embeddings.zarr", model=ckpt, clusters=4,
                        geojson=out / "clusters.geojson", min_tissue=0.3)
    emb = open_embeddings(store)
    print(f"embeddings: {emb.features.shape[0]} tiles x {emb.features.shape[1]} features -> {store}")
    print(f"QuPath tiles coloured by cluster: {out / 'clusters.geojson'}")

    # 4. The encoder initialises any other slidekit network (here a segmenter), i.e. `--init CKPT`.
    unet = ResNetUNet("resnet18", num_outputs=2)
    copied = transfer_encoder(ckpt, unet)
    print(f"copied {len(copied)} encoder tensors into a ResNet U-Net")


if __name__ == "__main__":
    main()
