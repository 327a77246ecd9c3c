"""The `scribble` trainer: partial cross-entropy, registry and plug-ins, training, transfer, CLI."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import install_trainer_plugin
from PIL import Image

import trainers
from slidekit.annotations.scribbles import IGNORE, foreground_iou, generate_scribbles
from trainers.scribble import ScribbleTrainer, partial_cross_entropy, predict_images


def synthetic_nuclei(size: int = 96, n: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A pink 'tissue' image with dark purple 'nuclei' (discs) and its instance map."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    inst = np.zeros((size, size), np.int32)
    for k in range(1, n + 1):
        cy, cx, r = rng.integers(6, size - 6), rng.integers(6, size - 6), rng.integers(3, 6)
        inst[((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (inst == 0)] = k
    img = np.empty((size, size, 3), np.float32)
    img[:] = (225, 160, 200)
    img[inst > 0] = (90, 40, 130)
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), inst


def make_nuclei_folder(root: Path, n_images: int = 2, size: int = 96, fraction: float = 1.0,
                       full: bool = False) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "scribbles").mkdir()
    (root / "masks").mkdir()
    for i in range(n_images):
        img, inst = synthetic_nuclei(size, seed=i)
        lab = (inst > 0).astype(np.uint8) if full else generate_scribbles(inst, fraction, seed=i, width=3)
        Image.fromarray(img).save(root / "images" / f"s{i}.png")
        Image.fromarray(lab).save(root / "scribbles" / f"s{i}.png")
        Image.fromarray((inst > 0).astype(np.uint8)).save(root / "masks" / f"s{i}.png")
    return root


def folder_iou(model, spec, root: Path) -> float:
    ious = []
    for p in sorted((root / "images").glob("*.png")):
        img = torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1)
        probs = predict_images(model, spec, [img])[0]
        gt = np.array(Image.open(root / "masks" / p.name))
        ious.append(foreground_iou(probs.argmax(0).numpy() == 1, gt))
    return float(np.mean(ious))


# -- the loss ------------------------------------------------------------------------------------

def test_partial_ce_ignores_unscribbled_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    target = torch.full((2, 8, 8), IGNORE, dtype=torch.long)
    target[0, 2, 3], target[1, 5, 5], target[1, 0, 7] = 1, 2, 0
    loss = partial_cross_entropy(logits, target)
    labelled = target != IGNORE
    expected = F.cross_entropy(logits.detach().permute(0, 2, 3, 1)[labelled], target[labelled])
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()
    g = logits.grad.abs().sum(1)
    assert (g[~labelled] == 0).all()
    assert (g[labelled] > 0).all()


def test_all_ignored_batch_gives_zero_not_nan():
    logits = torch.randn(2, 2, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), IGNORE, dtype=torch.long)
    assert torch.isnan(F.cross_entropy(logits, target, ignore_index=IGNORE))  # what we guard against
    loss = partial_cross_entropy(logits, target)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


# -- registry --------------------------------------------------------------------------------------

def test_builtin_trainers_registered():
    assert {"scribble", "s2l"} <= set(trainers.available())
    assert trainers.get("scribble") is ScribbleTrainer
    assert trainers.get("scribble").consumes == {"images", "scribbles"}
    cfg = trainers.load_config(ScribbleTrainer.Config, None, ["epochs=3", "classes=bg,fg", "crop=64"])
    assert cfg.epochs == 3 and cfg.classes == ["bg", "fg"] and cfg.crop == 64


def test_third_party_trainer_through_entry_point(tmp_path, monkeypatch):
    install_trainer_plugin(tmp_path, monkeypatch, "my_plugin", """
        from trainers.base import Trainer
        class MyTrainer(Trainer):
            name = "mine"
            consumes = frozenset({"pixel_masks"})
            def fit(self, out_dir, device="auto", progress=True):
                return out_dir
    """, "mine = my_plugin:MyTrainer")
    cls = trainers.get("mine")
    assert cls.__name__ == "MyTrainer" and cls.consumes == {"pixel_masks"}
    assert "mine" in trainers.available() and "scribble" in trainers.available()
    assert cls().fit("somewhere") == "somewhere"
    sys.modules.pop("my_plugin", None)


# -- training --------------------------------------------------------------------------------------

def _config(root: Path, **kw) -> object:
    opts = dict(data=str(root), labels="scribbles", classes=["background", "nucleus"], crop=64, epochs=4,
                batch_size=4, samples_per_image=8, lr=3e-3, seed=0, image_mpp=0.5)
    opts.update(kw)
    return trainers.make_config(ScribbleTrainer.Config, opts)


@pytest.mark.slow
def test_tiny_training_run_improves_iou(tmp_path):
    torch.set_num_threads(2)
    root = make_nuclei_folder(tmp_path / "d", fraction=1.0)
    trainer = ScribbleTrainer(_config(root, crop=48, batch_size=8, samples_per_image=16, epochs=10,
                                      lr_schedule="constant"))
    from slidekit.models.networks import build_model

    torch.manual_seed(0)
    before = folder_iou(build_model(trainer.build_spec()), trainer.build_spec(), root)
    ckpt = trainer.fit(tmp_path / "run", device="cpu", progress=False)
    from slidekit.models.checkpoint import load_checkpoint

    loaded = load_checkpoint(ckpt)
    after = folder_iou(loaded.model, loaded.spec, root)
    assert after > before + 0.15, (before, after)
    assert loaded.spec.task == "segmentation" and loaded.spec.trainer == "scribble"
    assert loaded.spec.classes == ["background", "nucleus"] and loaded.spec.mpp == 0.5
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 11 and rows[0].startswith("epoch,loss")
    # A rerun finds the finished run and does no work.
    assert trainer.fit(tmp_path / "run", device="cpu", progress=False) == ckpt


class _Interrupted(Exception):
    pass


class _StopsAtEpoch1(ScribbleTrainer):
    """Dies during epoch 1, after epoch 0 was saved (not registered)."""

    def after_epoch(self, epoch):
        if epoch == 1:
            raise _Interrupted
        return super().after_epoch(epoch)


@pytest.mark.slow
def test_resume_continues_where_it_stopped(tmp_path):
    root = make_nuclei_folder(tmp_path / "d", n_images=1, size=64)
    cfg = _config(root, epochs=2, samples_per_image=4, crop=32)
    straight = ScribbleTrainer(cfg).fit(tmp_path / "a", device="cpu", progress=False)
    with pytest.raises(_Interrupted):
        _StopsAtEpoch1(cfg).fit(tmp_path / "b", device="cpu", progress=False)
    assert len((tmp_path / "b" / "metrics.csv").read_text().splitlines()) == 2  # header + epoch 0
    resumed = ScribbleTrainer(cfg).fit(tmp_path / "b", device="cpu", progress=False)
    a = torch.load(straight, weights_only=True)["state_dict"]
    b = torch.load(resumed, weights_only=True)["state_dict"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


def test_bad_labels_are_reported(tmp_path):
    root = make_nuclei_folder(tmp_path / "d", n_images=1, size=32)
    Image.fromarray(np.full((32, 32), 7, np.uint8)).save(root / "scribbles" / "s0.png")
    from slidekit.base.errors import ConfigError

    with pytest.raises(ConfigError, match="outside"):
        ScribbleTrainer(_config(root)).fit(tmp_path / "run", device="cpu", progress=False)
    with pytest.raises(ConfigError, match="set `data`"):
        ScribbleTrainer(_config(root, data="")).fit(tmp_path / "run2", device="cpu", progress=False)


def test_encoder_transfer_to_patch_classifier(tmp_path):
    root = make_nuclei_folder(tmp_path / "d", n_images=1, size=64)
    ckpt = ScribbleTrainer(_config(root, epochs=1, samples_per_image=4, crop=32)).fit(
        tmp_path / "run", device="cpu", progress=False)
    from slidekit.models.checkpoint import load_checkpoint, transfer_encoder
    from slidekit.models.networks import ResNetClassifier, build_model
    from slidekit.models.spec import ModelSpec

    seg = load_checkpoint(ckpt).model
    clf = build_model(ModelSpec(arch="resnet-classifier", classes=["a", "b", "c"]))
    assert isinstance(clf, ResNetClassifier)
    head_before = clf.head.weight.clone()
    names = transfer_encoder(ckpt, clf)
    src, dst = seg.encoder.state_dict(), clf.encoder.state_dict()
    assert names and set(names) == set(src)
    assert all(torch.equal(src[k], dst[k]) for k in src)
    assert torch.equal(clf.head.weight, head_before)  # only the encoder moves


def test_slidekit_train_checkpoint_runs_in_heatmap(tmp_path):
    from click.testing import CliRunner
    from conftest import synthetic_slide

    from slidekit.cli import main

    root = make_nuclei_folder(tmp_path / "d", n_images=1, size=64)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"data: {root}\nlabels: scribbles\nclasses: [background, nucleus]\ncrop: 32\n"
                   f"epochs: 1\nbatch_size: 4\nsamples_per_image: 4\nimage_mpp: 2.0\n")
    runner = CliRunner()
    res = runner.invoke(main, ["train", "scribble", "--config", str(cfg), "--out", str(tmp_path / "run"),
                               "--set", "seed=1", "--device", "cpu", "--quiet"])
    assert res.exit_code == 0, res.output
    ckpt = Path(res.output.strip().splitlines()[-1])
    assert ckpt.exists()
    slide = synthetic_slide(tmp_path / "s.tif", width=768, height=512, mpp=0.5, tissue_box=(128, 128, 512, 256))
    res = runner.invoke(main, ["heatmap", str(slide), "--model", str(ckpt), "--out", str(tmp_path / "hm"),
                               "--workers", "0", "--quiet"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "hm" / "summary.json").exists()
    res = runner.invoke(main, ["train", "scribble", "--config", str(tmp_path / "missing.yaml"),
                               "--out", str(tmp_path / "x")])
    assert res.exit_code != 0 and "config file not found" in res.output


# -- silent label mistakes are refused (issue 13) -------------------------------------------------------

def _scribble_geojson(path: Path, labels: list[str]) -> Path:
    from shapely.geometry import LineString

    from slidekit.annotations.formats import write_geojson
    from slidekit.annotations.objects import Annotation

    anns = [Annotation(LineString([(600 + 40 * i, 300), (600 + 40 * i, 600)]), label=lab)
            for i, lab in enumerate(labels)]
    return write_geojson(anns, path)


def test_config_class_matching_no_annotation_is_an_error(tmp_path):
    from conftest import synthetic_slide

    from slidekit.base.errors import LabelError, TrainingWarning

    slide = synthetic_slide(tmp_path / "s.tif", width=1024, height=768, tissue_box=(512, 256, 400, 400))
    geo = _scribble_geojson(tmp_path / "s.geojson", ["Background", "Tumor", "Stroma"])
    cfg = trainers.make_config(ScribbleTrainer.Config, dict(
        slides=[str(slide)], annotations=[str(geo)], classes=["Background", "Tumour"], crop=32, epochs=1))
    with pytest.raises(LabelError, match=r"class\(es\) 'Tumour' of the config match no annotation in .*s.geojson; "
                                         r"annotation classes found: "
                                         r"'Background' \(1\), 'Stroma' \(1\), 'Tumor' \(1\)"):
        ScribbleTrainer(cfg).fit(tmp_path / "run", device="cpu", progress=False)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    # classes that are drawn but not in the config are ignored, and the user is told
    from trainers.scribble import check_class_names

    with pytest.warns(TrainingWarning, match="'Stroma' are not among"):
        check_class_names(["Background", "Tumor"], [geo])


def test_image_folder_class_without_pixels_is_an_error(tmp_path, one_torch_thread):
    from slidekit.base.errors import LabelError

    root = make_nuclei_folder(tmp_path / "d", n_images=1, size=48, full=True)
    cfg = _config(root, classes=["background", "nucleus", "mitosis"], crop=32, epochs=1)
    with pytest.raises(LabelError, match=r"'mitosis' \(index 2\) of the config have no labelled pixel"):
        ScribbleTrainer(cfg).fit(tmp_path / "run", device="cpu", progress=False)


def test_predict_images_accepts_numpy_hwc_as_read_region_returns(tmp_path, one_torch_thread):
    from slidekit.base.errors import ConfigError
    from slidekit.models.networks import build_model
    from slidekit.models.spec import ModelSpec

    spec = ModelSpec(arch="resnet-unet", task="segmentation", classes=["bg", "fg"], patch_size=32)
    torch.manual_seed(0)
    model = build_model(spec)
    img, _ = synthetic_nuclei(40, seed=1)                    # (H, W, 3) uint8, H != W below
    img = img[:, :36]
    ref = predict_images(model, spec, [torch.from_numpy(img).permute(2, 0, 1)])[0]
    rgba = np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])
    for form in ([img], img, [rgba], [Image.fromarray(img)]):
        out = predict_images(model, spec, form)
        assert len(out) == 1 and out[0].shape == (2, 40, 36)
        assert torch.allclose(out[0], ref, atol=1e-6)
    with pytest.raises(ConfigError, match="dtype"):
        predict_images(model, spec, [img.astype(np.float32) / 255])


def test_cli_rerun_continues_refuses_and_restarts(tmp_path, one_torch_thread):
    """Issue 13: `--set epochs=N` on a finished run trains on to N; a changed lr is refused; --restart."""
    from click.testing import CliRunner

    from slidekit.cli import main
    from slidekit.models.checkpoint import read_checkpoint

    root = make_nuclei_folder(tmp_path / "d", n_images=1, size=48)
    base = ["train", "scribble", "--out", str(tmp_path / "run"), "--device", "cpu", "--quiet",
            "--set", f"data={root}", "--set", "crop=32", "--set", "batch_size=4", "--set", "samples_per_image=4"]
    run = CliRunner().invoke
    assert run(main, base + ["--set", "epochs=1"]).exit_code == 0
    res = run(main, base + ["--set", "epochs=2"])
    assert res.exit_code == 0, res.output
    assert "continuing a finished 1-epoch scribble run to 2 epochs" in res.output
    assert read_checkpoint(tmp_path / "run" / "checkpoint.pt")["extra"]["epoch"] == 2
    res = run(main, base + ["--set", "epochs=2", "--set", "lr=0.01"])
    assert res.exit_code != 0 and "Traceback" not in res.output
    assert "lr: 0.001 -> 0.01" in res.output and "--restart" in res.output
    res = run(main, base + ["--set", "epochs=1", "--set", "lr=0.01", "--restart"])
    assert res.exit_code == 0, res.output
    ck = read_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ck["extra"]["epoch"] == 1 and ck["spec"]["trainer_config"]["lr"] == 0.01
