"""Per-tile embeddings of a slide, chunked on disk, with optional k-means clusters for QuPath.

``embed_slide`` tiles a slide at the checkpoint's patch size and MPP (tissue tiles only), runs the
encoder over every tile with the batched ``Predictor`` and stores a zarr group::

    features  (N, D) float32, chunked by rows    the pooled encoder output of each tile
    coords    (N, 2) int64                       level-0 (x, y) top-left corners, same row order
    clusters  (N,)   int32 (optional)            k-means cluster of each tile

The attributes hold the slide identity, the grid geometry and the model's identity (``encoder``:
which tokens make the feature, and the registry name of a named encoder). Work is
resumable: rows are written chunk by chunk into ``OUT.partial`` (its ``rows_done`` attribute
counts finished rows) and the store is renamed to ``OUT`` only when complete, so a rerun
continues where an interrupted one stopped and a finished store is never recomputed. Ciga et al.
use such clusters to find artefacts and tissue regions without labels; ``write_cluster_geojson``
turns them into QuPath ``tile`` objects coloured by cluster.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from slidekit.annotations.formats import write_geojson
from slidekit.annotations.objects import Annotation
from slidekit.base.errors import ConfigError, GridError, TissueError
from slidekit.base.io import file_identity
from slidekit.base.locks import OutputLock
from slidekit.base.outputs import claim_path
from slidekit.base.resources import configure_threads
from slidekit.infer.predictor import Predictor, check_slide_stains, resolve_stain
from slidekit.models.encoders import load_embedding_encoder
from slidekit.models.spec import ModelSpec
from slidekit.regions.job import JobContext, SlideJob
from slidekit.regions.masks import Tissue, build_region
from slidekit.regions.options import OptionGroups, ReadOptions, RunOptions, StainNormOptions, TileOptions, TissueOptions
from slidekit.regions.qc_tiles import TileQc, qc_figures
from slidekit.regions.tiling import TileGrid
from slidekit.slidelevel.feature_store import write_feature_store

if TYPE_CHECKING:
    import zarr

EMBED_FORMAT = "slidekit.embeddings/1"
# Distinct colours for clusters (tab20-like), repeated when k is larger.
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
           (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210),
           (199, 199, 199), (219, 219, 141), (158, 218, 229)]


@dataclass
class Embeddings:
    """An opened embeddings store: features (zarr, lazy), coords, clusters (or None), attrs."""

    path: Path
    features: zarr.Array
    coords: np.ndarray
    clusters: np.ndarray | None
    attrs: dict

    @property
    def tile_extent(self) -> tuple[float, float]:
        """Tile width and height in level-0 pixels."""
        return tuple(self.attrs["grid"]["extent"])


def open_embeddings(path: str | os.PathLike) -> Embeddings:
    """Open a finished store written by ``embed_slide``."""
    import zarr

    path = Path(path)
    try:
        root = zarr.open_group(str(path), mode="r")
        attrs = dict(root.attrs)
    except Exception as e:
        raise GridError(f"not an embeddings store ({type(e).__name__}: {e})", path) from None
    if attrs.get("format") != EMBED_FORMAT or not attrs.get("complete"):
        raise GridError("not a complete slidekit embeddings store", path)
    # the store's members are arrays (zarr types a member as Array | Group)
    features, coords = cast(zarr.Array, root["features"]), cast(zarr.Array, root["coords"])
    clusters = np.asarray(cast(zarr.Array, root["clusters"])[:]) if "clusters" in root else None
    return Embeddings(path, features, np.asarray(coords[:]), clusters, attrs)


@dataclass(frozen=True)
class EmbedOutput:
    """What ``slidekit embed`` writes besides the store.

    Parameters
    ----------
    chunk_rows
        Feature rows per stored chunk (the unit of resume).
    clusters
        Add k-means clusters with this many centres (None: none).
    seed
        The clustering's seed.
    geojson
        Also write the clusters as QuPath tiles to this file (needs ``clusters``).
    features_h5
        Also write the HDF5 feature file TRIDENT and CLAM read to this file (``feature_store``).
    weights
        The encoder's weights file, for a registry name, ``timm:NAME`` or a torchvision ResNet.
    tokens
        Which tokens of a ``timm:NAME`` ViT make the feature: ``cls``, ``mean`` (of the patch tokens) or
        ``cls+mean`` (recorded in the store's and feature file's ``encoder.tokens``); None: the global
        average of the last block's patch grid (recorded as ``pooled``).
    """

    chunk_rows: int = 4096
    clusters: int | None = None
    seed: int = 0
    geojson: str | os.PathLike | None = None
    features_h5: str | os.PathLike | None = None
    weights: str | os.PathLike | None = None
    tokens: str | None = None


@dataclass(frozen=True)
class EmbedOptions(OptionGroups):
    """Every option of ``slidekit embed``, in groups (flat field names work too: ``OptionGroups``;
    the older spellings ``tile_mpp`` and ``patch_size`` mean ``mpp`` and ``size``)."""

    tiles: TileOptions = TileOptions(min_tissue=0.5)
    reading: ReadOptions = ReadOptions()
    tissue: TissueOptions = TissueOptions()
    output: EmbedOutput = EmbedOutput()
    run: RunOptions = RunOptions(batch_size=64, workers=0)
    stain: StainNormOptions = StainNormOptions()

    @classmethod
    def of(cls, options: "OptionGroups | None" = None, **flat: Any) -> Any:
        for old, new in (("tile_mpp", "mpp"), ("patch_size", "size")):
            if old in flat:
                if flat.get(new) is not None and flat[old] is not None and flat[new] != flat[old]:
                    raise ConfigError(f"{old}={flat[old]!r} and {new}={flat[new]!r} given; they are one option")
                value = flat.pop(old)
                if flat.get(new) is None:
                    flat[new] = value
        return super().of(options, **flat)


def embed_slide(slide_path: str | os.PathLike, out: str | os.PathLike, *, model: str | os.PathLike,
                grid: TileGrid | str | os.PathLike | None = None, options: EmbedOptions | None = None,
                exclude_qc: str | os.PathLike | None = None, qc_max: Any = None,
                progress: bool = True, **flat: Any) -> Path:
    """Embed every tissue tile of a slide with ``model``; write the store ``out``.

    The grid is the model's patch size at its µm/px over tissue (``min_tissue``), unless ``grid``
    (a TileGrid or a saved grid file) is given. Returns the store path.

    Parameters
    ----------
    slide_path
        The slide file.
    out
        The embeddings store (zarr) to write.
    model
        A slidekit checkpoint, a registry name (``uni``, ``virchow2``, ...; weights from a local
        file), a torchvision ResNet state dict, or ``timm:NAME`` with ``weights`` (then ``mpp`` is
        required and ``size`` defaults to 224): ``slidekit.models.encoders.load_embedding_encoder``.
    grid
        A TileGrid or saved grid file to embed instead of the tissue's grid.
    exclude_qc, qc_max
        A ``slidekit qc`` folder of the slide: tiles with more of an artefact class than ``qc_max``
        (``regions.qc_tiles.TileQc``; default 0.5 per class) are not embedded. The kept tiles'
        fractions are the store's ``qc_fractions`` (N, classes; names in its ``qc`` attribute with the
        counts removed per class) and the feature file's ``qc_fractions`` dataset.
    options
        :class:`EmbedOptions`: tiles, reading, ``tissue``, outputs (:class:`EmbedOutput`: clusters,
        GeoJSON, the HDF5 feature file, weights), running, stain normalisation (as for
        ``heatmap_slide``: default the checkpoint's, "none" turns it off; the store records it).
    progress
        Show a progress bar.
    **flat
        Any single field of those groups by its own name (``device="cpu"``, ``clusters=4``).
    """
    o = EmbedOptions.of(options, **flat)
    t, r, eo, run, st = o.tiles, o.reading, o.output, o.run, o.stain
    weights, patch_size, tile_mpp, min_tissue = eo.weights, t.size, t.mpp, t.min_tissue
    tissue = o.tissue.as_dict() or None
    batch_size, chunk_rows, workers = run.batch_size, eo.chunk_rows, run.workers
    device, threads = run.device, run.threads
    clusters, seed, geojson, features_h5 = eo.clusters, eo.seed, eo.geojson, eo.features_h5
    stain_norm, stain_ref = st.stain_norm, st.stain_ref
    out = Path(out)
    # a named encoder (any case) keeps its own tile geometry and normalisation unless given
    net, spec, model = load_embedding_encoder(model, weights, patch_size, tile_mpp, tokens=eo.tokens)
    stain, stain_info = resolve_stain(spec, stain_norm, stain_ref)
    with r.open(slide_path) as slide:
        if isinstance(grid, (str, os.PathLike)):
            grid = TileGrid.load(grid)
        if grid is None:
            # tissue: tissue_mask options
            mask = build_region(Tissue(TissueOptions.of(tissue)), slide) if min_tissue > 0 else None
            grid = TileGrid.from_slide(slide, mpp=spec.mpp, size=spec.patch_size, mask=mask,
                                       min_tissue=min_tissue)
        else:
            grid.check_slide(slide)
        if len(grid) == 0:
            raise TissueError(f"no tile has {min_tissue:.0%} tissue at {grid.mpp} µm/px", slide.path)
        qc, qc_fractions, qc_counts = TileQc.of(exclude_qc, qc_max), None, None
        if qc is not None:
            # --exclude-qc auto: the slide's QC beside the store (STORE.qc/; a job's runner made OUT/qc/ already)
            qc = qc.ready(slide, out.parent / f"{out.stem}.qc", r, progress)
            qc.check(slide)
            grid, qc_fractions, qc_counts = qc.filter(slide, grid)  # TissueError when no tile is left
        meta: dict[str, Any] = {"format": EMBED_FORMAT, "model": file_identity(model),
                "slide": {"name": grid.slide_name, "id": grid.slide_id,
                          "dimensions": list(grid.slide_dimensions), "mpp": list(grid.slide_mpp)},
                "grid": {"mpp": grid.mpp, "size": grid.size, "overlap": grid.overlap, "tiles": len(grid),
                         "extent": list(grid.extent), "min_tissue": grid.min_tissue},
                "spec": {"backbone": spec.backbone, "patch_size": spec.patch_size, "mpp": spec.mpp,
                         "mean": list(spec.mean), "std": list(spec.std), "trainer": spec.trainer}}
        if tissue and grid.tissue is not None:  # recorded only when set: stores without it stay complete
            meta["grid"]["tissue"] = dict(tissue)
        if qc is not None:  # likewise: a store of other QC limits (or another QC run) is recomputed
            meta["grid"]["qc"] = qc.config()
        if eo.tokens is not None:  # likewise: features of another token rule are recomputed
            meta["spec"]["tokens"] = eo.tokens
        if stain_info["key"] is not None:  # likewise: a store made with other tiles is recomputed
            meta["stain"] = {"method": stain_info["method"], "source": stain_info["source"],
                             "key": stain_info["key"]}
        with OutputLock(out.parent, name=f".{out.name}.lock"):
            if not _is_complete(out, meta):
                check_slide_stains(slide, stain)  # a StainWarning when H&E normalisation meets an IHC slide
                configure_threads(threads, workers)  # main process: the CPUs the workers leave
                _compute(slide, grid, (net, spec, stain), out, meta, RunOptions(batch_size, workers, device, threads),
                         chunk_rows=chunk_rows, progress=progress)
            _record_encoder(out, _encoder_record(spec))
            if qc_fractions is not None:
                _record_qc(out, qc_fractions, qc_counts)
            if clusters:
                _add_clusters(out, clusters, seed)
            if features_h5 is not None:
                write_feature_store(open_embeddings(out), features_h5)
    if geojson is not None:
        if not clusters:
            raise GridError("writing cluster GeoJSON needs clusters=k")
        write_cluster_geojson(out, geojson)
    return out


def _encoder_record(spec: ModelSpec) -> dict:
    """How the encoder makes a tile's feature: a registry entry's token rule (``cls``, ``cls+mean``;
    ``pooled`` for its ResNets) and name; ``pooled`` (global average of the last feature map: for a
    timm ViT the mean of its patch tokens) for checkpoints, torchvision files and ``timm:NAME``."""
    extra = spec.extra or {}
    rec = {"tokens": str(extra.get("tokens") or "pooled")}
    if extra.get("encoder"):
        rec["registry"] = str(extra["encoder"])
    return rec


def _record_encoder(out: Path, record: dict) -> None:
    """Write the store's ``encoder`` attribute (not part of its identity, so stores made before it
    existed are completed in place rather than recomputed)."""
    import zarr

    root = zarr.open_group(str(out), mode="r+")
    if dict(root.attrs).get("encoder") != record:
        root.attrs["encoder"] = record


def _record_qc(out: Path, fractions: np.ndarray, counts: dict | None) -> None:
    """The kept tiles' artefact fractions (``qc_fractions``, rows as ``coords``) and the QC counts
    (``qc`` attribute) in the store; the QC's identity is in the grid's, so a store of other limits is
    never completed with these."""
    import zarr

    root = zarr.open_group(str(out), mode="r+")
    if "qc_fractions" not in root or dict(root.attrs).get("qc") != counts:
        root.create_array("qc_fractions", data=np.asarray(fractions, np.float32), overwrite=True)
        root.attrs["qc"] = counts


def _is_embeddings_store(path: Path) -> bool:
    """Whether ``path`` is a store slidekit's embed wrote (finished or not)."""
    import zarr

    try:
        return zarr.open_group(str(path), mode="r").attrs.get("format") == EMBED_FORMAT
    except Exception:
        return False


def _is_complete(out: Path, meta: dict) -> bool:
    if not out.exists():
        return False
    # Only a store slidekit wrote may be replaced: a user's folder or file is never deleted.
    claim_path(out, _is_embeddings_store(out), "a slidekit embeddings store")
    try:
        emb = open_embeddings(out)
    except GridError:
        shutil.rmtree(out)  # our own unfinished store: recompute
        return False
    same = {k: emb.attrs.get(k) for k in meta} == json.loads(json.dumps(meta))
    if not same:
        shutil.rmtree(out)  # our store of another slide, grid or model: recompute
    return same


def _compute(slide: Any, grid: TileGrid, encoder: tuple, out: Path, meta: dict, run: RunOptions, *,
             chunk_rows: int, progress: bool) -> None:
    """Embed ``grid`` into the store ``out`` (resuming its finished chunks); ``encoder`` is
    ``(net, spec, stain normaliser or None)``."""
    net, spec, stain = encoder
    batch_size, workers, device = run.batch_size, run.workers, run.device
    import zarr


    partial = out.with_name(out.name + ".partial")
    root = None
    claim_path(partial, _is_embeddings_store(partial), "a slidekit embeddings store")
    if partial.exists():
        try:
            root = zarr.open_group(str(partial), mode="r+")
            if {k: root.attrs.get(k) for k in meta} != json.loads(json.dumps(meta)):
                root = None
        except Exception:
            root = None
        if root is None:
            shutil.rmtree(partial)
    n = len(grid)
    dim = net.encoder.out_features
    chunk_rows = max(1, min(chunk_rows, max(n, 1)))
    if root is None:
        root = zarr.open_group(str(partial), mode="w")
        root.create_array("features", shape=(n, dim), chunks=(chunk_rows, dim), dtype="float32")
        root.create_array("coords", shape=(n, 2), chunks=(max(1, min(n, 65536)), 2), dtype="int64")
        if n:
            cast(zarr.Array, root["coords"])[:] = grid.coords
        root.attrs.update({**json.loads(json.dumps(meta)), "rows_done": 0, "complete": False})
    done = int(cast(int, root.attrs.get("rows_done", 0)))
    feats = cast(zarr.Array, root["features"])
    predictor = Predictor(net, spec, device=device, batch_size=batch_size, workers=workers, progress=progress,
                          stain=stain)
    timer = predictor.timer
    t_loop = time.perf_counter()
    # Rows are flushed one zarr chunk at a time, so rows_done always marks whole, written chunks.
    for begin in range(done, n, chunk_rows):
        stop = min(n, begin + chunk_rows)
        parts = []
        for idx, y in predictor.predict(slide, grid, np.arange(begin, stop)):
            with timer.stage("stitch"):
                parts.append(y.reshape(len(idx), -1))
        with timer.stage("write"):
            feats[begin:stop] = np.concatenate(parts).astype(np.float32)
            root.attrs["rows_done"] = stop
    root.attrs["timing"] = timer.as_dict(time.perf_counter() - t_loop)  # this run's tiles
    root.attrs["decode"] = predictor.decode
    if predictor.stain is not None:  # this run's tiles left as read (too little stain to estimate)
        root.attrs["stain_unchanged_tiles"] = predictor.stain_unchanged
    root.attrs["complete"] = True
    if out.exists():
        shutil.rmtree(out)
    os.replace(partial, out)


def _add_clusters(out: Path, k: int, seed: int) -> None:
    """k-means over the stored features (mini-batch, chunk by chunk); skipped when already there."""
    import zarr
    from sklearn.cluster import KMeans, MiniBatchKMeans

    root = zarr.open_group(str(out), mode="r+")
    if root.attrs.get("clusters_k") == k and "clusters" in root:
        return
    feats = cast(zarr.Array, root["features"])
    n = feats.shape[0]
    if n < k:
        raise GridError(f"cannot make {k} clusters from {n} tiles", out)
    step = feats.chunks[0]
    if n <= 50_000:
        x = np.asarray(feats[:])
        labels = KMeans(k, n_init=4, random_state=seed).fit_predict(x)
    else:  # never hold a huge slide's features at once
        km = MiniBatchKMeans(k, random_state=seed, batch_size=4096, n_init=3)
        for s in range(0, n, step):
            km.partial_fit(np.asarray(feats[s:s + step]))
        labels = np.concatenate([km.predict(np.asarray(feats[s:s + step])) for s in range(0, n, step)])
    if "clusters" in root:
        del root["clusters"]
    root.attrs["clusters_k"] = None
    root.create_array("clusters", shape=(n,), chunks=(max(1, min(n, 65536)),), dtype="int32")
    cast(zarr.Array, root["clusters"])[:] = labels.astype(np.int32)
    root.attrs["clusters_k"] = int(k)  # written last: marks the clusters as complete


def cluster_annotations(emb: Embeddings) -> list:
    """One QuPath ``tile`` object per tile, classified ``cluster N`` and coloured by cluster."""
    from shapely.geometry import box


    if emb.clusters is None:
        raise GridError("the embeddings store has no clusters", emb.path)
    w, h = emb.tile_extent
    out = []
    for (x, y), c in zip(emb.coords.tolist(), emb.clusters.tolist()):
        out.append(Annotation(box(x, y, x + w, y + h), label=f"cluster {c}", kind="tile",
                              color=PALETTE[c % len(PALETTE)], measurements={"cluster": c}))
    return out


def write_cluster_geojson(store: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Write the clusters of an embeddings store as QuPath tiles (GeoJSON, atomically)."""
    emb = open_embeddings(store)
    # Edge tiles reach past the slide: clip them to its level-0 size.
    return write_geojson(cluster_annotations(emb), path, bounds=tuple(emb.attrs["slide"]["dimensions"]))


EMBED_OUTPUTS = ("embeddings.zarr", "features.h5", "clusters.geojson")
_RUNTIME = frozenset({"workers", "batch_size", "device", "threads", "chunk_rows"})


class EmbedJob(SlideJob):
    """``slidekit embed`` into a slide's folder (a cohort's ``OUT/<id>/``): ``embeddings.zarr``,
    ``features.h5`` (TRIDENT/CLAM's HDF5) and, with clusters, ``clusters.geojson``; run by the shared
    runner, so a rerun redoes a slide whose store or feature file no longer verifies.

    ``options`` are :func:`embed_slide`'s keyword arguments (``model`` required).
    """

    name = "embed"
    outputs = EMBED_OUTPUTS

    def __init__(self, *, reading: ReadOptions | None = None, geojson: bool = False, **options: Any) -> None:
        if not options.get("model"):
            raise ConfigError("embed needs a model (a checkpoint, an encoder file, timm:NAME or a registry name)")
        self.reading, self.geojson, self.options = reading or ReadOptions(), bool(geojson), options
        # checked against the slide and part of the configuration by the runner; applied by embed_slide
        self.qc = TileQc.of(options.get("exclude_qc"), options.get("qc_max"))

    def config(self) -> dict:
        cfg = {k: v for k, v in self.options.items() if k not in _RUNTIME and v is not None}
        for k in ("model", "weights", "stain_ref"):  # files stand for their contents (path, size, time)
            if k in cfg and Path(str(cfg[k])).is_file():
                cfg[k] = file_identity(cfg[k])
        return {**cfg, "geojson": self.geojson, "slide_mpp": self.reading.slide_mpp,
                "override_mpp": self.reading.override_mpp}

    def figures(self, summary: dict) -> dict:
        return {"tiles": summary["tiles"], "dim": summary["dim"], **qc_figures(summary)}

    def run(self, ctx: JobContext) -> dict:
        out = ctx.out
        opts = dict(self.options)
        model = opts.pop("model")
        if isinstance(self.qc, TileQc):  # the QC folder the runner checked (made first for --exclude-qc auto)
            opts["exclude_qc"] = str(self.qc.path)
        store = embed_slide(ctx.slide.path, out / "embeddings.zarr", model=model, progress=ctx.progress,
                            geojson=out / "clusters.geojson" if self.geojson else None,
                            features_h5=out / "features.h5", slide_mpp=self.reading.slide_mpp,
                            override_mpp=self.reading.override_mpp, **opts)
        emb = open_embeddings(store)
        fields: dict[str, Any] = {"tiles": int(emb.coords.shape[0]), "dim": int(emb.features.shape[1])}
        if self.qc is not None:
            fields["qc"] = emb.attrs.get("qc")
        return fields
