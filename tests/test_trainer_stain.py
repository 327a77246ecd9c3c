"""Stain normalisation and augmentation in the trainers (issue 11 item 3): options validated in one
line and listed by --show-config; the training batch is normalised on the device, then augmented
(training only); the normaliser is recorded in ModelSpec.stain and applied by every prediction
made inside the trainers; a changed stain option or reference is a different run."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import trainers
from slidekit.base.errors import ConfigError, TrainingError, TrainingWarning
from tests.test_scribble_trainer import make_nuclei_folder, synthetic_nuclei
from trainers.scribble import ScribbleTrainer, predict_images

STAIN_TRAINERS = ["scribble", "s2l", "mixed-em", "topk-mean"]
STAIN_FIELDS = ("stain_norm", "stain_ref", "stain_aug", "stain_aug_strength")


@pytest.fixture
def stain(tmp_path):
    """(slidekit.stain.normalize, slidekit.stain.augment, a reference image of another lab's colours)."""
    import slidekit.stain.augment as aug
    import slidekit.stain.normalize as mod
    ref, _ = synthetic_nuclei(64, seed=7)
    ref = np.clip(ref.astype(int) + [-40, 10, -30], 0, 255).astype(np.uint8)
    path = tmp_path / "ref.png"
    Image.fromarray(ref).save(path)
    yield mod, aug, path


def scribble_config(root, **kw):
    opts = dict(data=str(root), classes=["bg", "nucleus"], crop=32, epochs=1, batch_size=4, samples_per_image=4)
    return trainers.make_config(ScribbleTrainer.Config, {**opts, **kw})


# -- options ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", STAIN_TRAINERS)
@pytest.mark.parametrize("override, words", [
    ("stain_norm=vahadane", "'stain_norm' must be one of none, macenko, reinhard"),
    ("stain_norm=macenko", "'stain_ref' must be a reference image or JSON"),
    ("stain_ref=ref.png", "'stain_ref' must be empty while stain_norm is 'none'"),
    ("stain_aug=jitter", "'stain_aug' must be one of none, hed, randstainna"),
    ("stain_aug_strength=0", "'stain_aug_strength' must be a number in (0, 1)"),
    ("stain_aug_strength=1", "'stain_aug_strength' must be a number in (0, 1)"),
])
def test_invalid_stain_options_are_one_line_config_errors(name, override, words):
    with pytest.raises(ConfigError) as e:
        trainers.load_config(trainers.get(name).Config, None, [override])
    assert words in str(e.value) and "\n" not in str(e.value)


def test_simclr_has_stain_augmentation_only():
    cfg = trainers.load_config(trainers.get("simclr").Config, None, ["stain_aug=hed", "stain_aug_strength=0.1"])
    assert cfg.stain_aug == "hed" and cfg.stain_aug_strength == 0.1
    with pytest.raises(ConfigError, match="'stain_aug' must be one of"):
        trainers.load_config(trainers.get("simclr").Config, None, ["stain_aug=macenko"])
    with pytest.raises(ConfigError, match="unknown option"):
        trainers.load_config(trainers.get("simclr").Config, None, ["stain_norm=macenko"])


def test_show_config_lists_the_stain_options():
    from slidekit.cli import main

    for name in [*STAIN_TRAINERS, "simclr"]:
        res = CliRunner().invoke(main, ["train", name, "--show-config"])
        assert res.exit_code == 0, res.output
        shown = {ln.split(":", 1)[0] for ln in res.output.splitlines() if not ln.startswith("#")}
        want = STAIN_FIELDS if name != "simclr" else ("stain_aug", "stain_aug_strength")
        assert set(want) <= shown, name
        assert name != "simclr" or "stain_norm" not in shown
    assert "stain_norm: none" in CliRunner().invoke(main, ["train", "scribble", "--show-config"]).output


def test_cli_bad_stain_option_and_missing_reference_are_one_line(tmp_path, stain):
    from slidekit.cli import main

    root = make_nuclei_folder(tmp_path / "d", n_images=1, size=64)
    base = ["train", "scribble", "--out", str(tmp_path / "run"), "--device", "cpu", "-q",
            "--set", f"data={root}", "--set", "crop=32", "--set", "classes=bg,nucleus"]
    res = CliRunner().invoke(main, [*base, "--set", "stain_norm=reinhard"])
    assert res.exit_code != 0 and res.output.strip().count("\n") == 0 and "stain_ref" in res.output
    res = CliRunner().invoke(main, [*base, "--set", "stain_norm=reinhard", "--set",
                                    f"stain_ref={tmp_path / 'missing.png'}"])
    assert res.exit_code != 0 and res.output.strip().count("\n") == 0 and "missing.png" in res.output


# -- training --------------------------------------------------------------------------------------

def test_training_with_stain_norm_feeds_normalised_batches_and_records_spec_stain(tmp_path, stain,
                                                                                monkeypatch):
    mod, _, ref = stain
    outputs: list[torch.Tensor] = []
    real_call = mod.StainNormalizer.__call__

    def spy(self, batch):
        out = real_call(self, batch)
        outputs.append(out.clone())
        return out

    monkeypatch.setattr(mod.StainNormalizer, "__call__", spy)
    seen: list[torch.Tensor] = []
    import trainers.scribble as scribble_mod

    real_build = scribble_mod.build_model

    def build(spec):
        model = real_build(spec)
        model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
        return model

    monkeypatch.setattr(scribble_mod, "build_model", build)
    root = make_nuclei_folder(tmp_path / "d", n_images=2, size=64)
    cfg = scribble_config(root, stain_norm="reinhard", stain_ref=str(ref), augment=False)
    ckpt = ScribbleTrainer(cfg).fit(tmp_path / "run", device="cpu", progress=False)
    assert len(seen) == 2 and len(outputs) == 2  # 8 crops in batches of 4: every batch normalised
    row = json.loads((tmp_path / "run" / "metrics.json").read_text())[0]
    assert 0 <= row["stain_unchanged"] <= 8  # the crops the normaliser left as they were, reported
    from slidekit.models.checkpoint import read_checkpoint
    from slidekit.models.spec import ModelSpec

    spec = ModelSpec.from_dict(read_checkpoint(ckpt)["spec"])
    want = mod.normalizer_from_options("reinhard", ref).to_dict()
    assert spec.stain == want
    for x, normalised in zip(seen, outputs):  # the network saw the normalised batch, not the raw one
        torch.testing.assert_close(x, spec.normalize(normalised))


def test_stain_augmentation_runs_in_training_steps_only(tmp_path, stain, monkeypatch):
    _, aug, _ = stain
    calls: list[int] = []
    make = aug.augmenter_from_options

    def counting(kind, strength=0.05, images=None):
        inner = make(kind, strength, images)
        return lambda batch, generator=None: calls.append(len(batch)) or inner(batch, generator)

    monkeypatch.setattr(aug, "augmenter_from_options", counting)
    root = make_nuclei_folder(tmp_path / "d", n_images=2, size=64)
    cfg = scribble_config(root, stain_aug="hed", stain_aug_strength=0.1)
    trainer = ScribbleTrainer(cfg)
    ckpt = trainer.fit(tmp_path / "run", device="cpu", progress=False)
    assert calls == [4, 4]  # each training batch once
    from slidekit.models.checkpoint import load_checkpoint

    ck = load_checkpoint(ckpt)
    assert ck.spec.stain is None  # augmentation is not part of the model
    img, _ = synthetic_nuclei(64, seed=3)
    predict_images(ck.model, ck.spec, [img])
    assert calls == [4, 4]  # predictions are never augmented


def test_randstainna_is_fitted_on_normalised_training_images(tmp_path, stain, monkeypatch):
    mod, aug, ref = stain
    given = {}
    make = aug.augmenter_from_options

    def recording(kind, strength=0.05, images=None):
        given["images"] = images
        return make(kind, strength, images)

    monkeypatch.setattr(aug, "augmenter_from_options", recording)
    root = make_nuclei_folder(tmp_path / "d", n_images=2, size=64)
    cfg = scribble_config(root, stain_aug="randstainna", stain_norm="reinhard", stain_ref=str(ref))
    ScribbleTrainer(cfg).fit(tmp_path / "run", device="cpu", progress=False)
    images = given["images"]
    assert len(images) == 2 and all(i.shape == (64, 64, 3) and i.dtype == np.uint8 for i in images)
    norm = mod.normalizer_from_options("reinhard", ref)
    raw = np.array(Image.open(root / "images" / "s0.png").convert("RGB"))
    np.testing.assert_array_equal(images[0], norm(torch.from_numpy(raw)[None])[0].numpy())


# -- predictions inside trainers ----------------------------------------------------------------

def test_predict_images_applies_the_spec_stain(stain):
    mod, _, ref = stain
    from slidekit.models.networks import build_model
    from slidekit.models.spec import ModelSpec

    torch.manual_seed(0)
    spec = ModelSpec(arch="resnet-unet", task="segmentation", classes=["bg", "fg"], patch_size=64)
    model = build_model(spec).eval()
    img, _ = synthetic_nuclei(64, seed=1)
    raw = predict_images(model, spec, [img])[0]
    norm = mod.normalizer_from_options("reinhard", ref)
    spec.stain = norm.to_dict()
    got = predict_images(model, spec, [img])[0]
    with torch.no_grad():
        x = spec.normalize(norm(torch.from_numpy(img).permute(2, 0, 1)[None]))
        want = spec.activate(model(x))[0]
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, raw)


def test_topk_mean_trains_normalised_and_its_probabilities_apply_spec_stain(tmp_path, stain):
    mod, _, ref = stain
    from slidekit.models.checkpoint import load_checkpoint
    from trainers.stage2 import TopKMeanConfig, TopKMeanTrainer, fit_topk_mean, topk_mean_probs

    bags = np.random.default_rng(0).integers(100, 255, size=(4, 2, 32, 32, 3)).astype(np.uint8)
    labels = torch.tensor([1, 0, 1, 0], dtype=torch.float32)
    cfg = TopKMeanConfig(k=2, mpp=8.0, patch_size=32, epochs=1, batch_slides=2, stain_norm="macenko",
                         stain_ref=str(ref))
    ck = load_checkpoint(fit_topk_mean(TopKMeanTrainer(cfg), tmp_path / "tk", torch.from_numpy(bags), labels,
                                       device="cpu", progress=False))
    norm = mod.normalizer_from_options("macenko", ref)
    assert ck.spec.stain == norm.to_dict()
    flat = torch.from_numpy(bags.reshape(8, 32, 32, 3))
    assert not torch.equal(norm(flat), flat)  # the normalisation changes these patches
    probs = topk_mean_probs(ck.model, ck.spec, bags)
    with torch.inference_mode():
        x = ck.spec.normalize(norm(torch.from_numpy(bags.reshape(8, 32, 32, 3))))
        want = torch.sigmoid(ck.model(x)[:, 0]).reshape(4, 2).mean(1).numpy()
    np.testing.assert_allclose(probs, want, rtol=1e-5)


# -- reruns --------------------------------------------------------------------------------------

def test_a_changed_stain_option_or_reference_is_another_run(tmp_path, stain):
    _, _, ref = stain
    root = make_nuclei_folder(tmp_path / "d", n_images=1, size=64)
    ScribbleTrainer(scribble_config(root)).fit(tmp_path / "a", device="cpu", progress=False)
    with pytest.raises(TrainingError, match="stain_aug: 'none' -> 'hed'"):
        ScribbleTrainer(scribble_config(root, stain_aug="hed")).fit(tmp_path / "a", device="cpu", progress=False)
    # same options, but the reference file now holds other colours: resuming would mix two normalisations
    ScribbleTrainer(scribble_config(root, stain_norm="reinhard", stain_ref=str(ref))).fit(
        tmp_path / "b", device="cpu", progress=False)
    img = np.array(Image.open(ref))
    Image.fromarray(255 - img).save(ref)
    with pytest.raises(TrainingError, match="stain normalisation differs"), pytest.warns(TrainingWarning):
        ScribbleTrainer(scribble_config(root, stain_norm="reinhard", stain_ref=str(ref), epochs=2)).fit(
            tmp_path / "b", device="cpu", progress=False)


def test_simclr_stain_augments_each_uint8_view_before_its_colour_jitter(tmp_path, stain, monkeypatch):
    _, aug, _ = stain
    from trainers.simclr import SimCLRConfig, SimCLRTrainer
    from trainers.simclr_core import HistologyAugment

    folder = tmp_path / "tiles"
    folder.mkdir()
    for i in range(8):
        img, _ = synthetic_nuclei(32, n=3, seed=i)
        Image.fromarray(img).save(folder / f"t{i}.png")
    augmented, jittered = [], []
    make = aug.augmenter_from_options

    def recording(kind, strength=0.05, images=None):
        inner = make(kind, strength, images)

        def call(batch, generator=None):
            assert batch.dtype == torch.uint8  # the stain is changed on uint8 views
            out = inner(batch, generator)
            augmented.append(out.clone())
            return out
        return call

    monkeypatch.setattr(aug, "augmenter_from_options", recording)
    real = HistologyAugment.photometric
    monkeypatch.setattr(HistologyAugment, "photometric",
                        lambda self, x, generator=None: jittered.append(x.clone()) or real(self, x, generator))
    cfg = SimCLRConfig(folders=[str(folder)], tile_size=32, crop_size=32, mpp=1.0, batch_size=4, epochs=1,
                       steps_per_epoch=2, optimizer="adam", warmup_epochs=0, stain_aug="hed")
    SimCLRTrainer(cfg).fit(tmp_path / "run", device="cpu", progress=False)
    assert len(augmented) == 2 and len(jittered) == 2  # two steps, 2 x 4 views each
    for a, j in zip(augmented, jittered):
        assert a.shape[0] == 8
        torch.testing.assert_close(j, a.float() / 255)  # the colour jitter gets the stain-augmented views
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert rows[0]["samples_per_s"] > 0 and rows[0]["model"] > 0  # simclr's epochs are timed too


def test_mixed_em_round_heatmaps_are_predicted_through_spec_stain(tmp_path, stain, monkeypatch):
    mod, _, ref = stain
    from conftest import synthetic_slide

    from slidekit.base.timing import StageTimer
    from slidekit.infer.heatmap import Heatmap
    from slidekit.models.networks import build_model
    from slidekit.models.spec import ModelSpec
    from slidekit.regions.options import RunOptions
    from slidekit.slides.slide import open_slide
    from trainers.mixed_em import HeatmapTiling, predict_heatmap

    calls: list[int] = []
    real_call = mod.StainNormalizer.__call__
    monkeypatch.setattr(mod.StainNormalizer, "__call__",
                        lambda self, batch: calls.append(len(batch)) or real_call(self, batch))
    spec = ModelSpec(arch="resnet-unet", task="segmentation", classes=["tumour"], patch_size=64, mpp=2.0,
                     activation="sigmoid")
    spec.stain = mod.normalizer_from_options("reinhard", ref).to_dict()
    model = build_model(spec)
    path = synthetic_slide(tmp_path / "s.tif", width=1024, height=768, tissue_box=(256, 256, 512, 256))
    with open_slide(path) as slide:
        timer = StageTimer()
        store = predict_heatmap(model, spec, slide, tmp_path / "hm.zarr",
                                tiling=HeatmapTiling(tile=64, tissue_mpp=8.0, min_tissue=0.1),
                                run=RunOptions(batch_size=4, device="cpu"), timer=timer)
    assert Heatmap(store) is not None
    assert sum(calls) > 0  # every tile of the E-step heatmap went through the model's normalisation
    assert timer.seconds["model"] > 0  # and the prediction's time is counted in the round's stages


def test_train_cli_stain_flags_are_the_config_options(tmp_path, stain):
    from slidekit.cli import main
    from slidekit.models.checkpoint import load_checkpoint

    _, _, ref = stain
    root = make_nuclei_folder(tmp_path / "d", n_images=1, size=64)
    res = CliRunner().invoke(main, ["train", "scribble", "--out", str(tmp_path / "run"), "--device", "cpu", "-q",
                                    "--set", f"data={root}", "--set", "crop=32", "--set", "classes=bg,nucleus",
                                    "--set", "epochs=1", "--set", "samples_per_image=4", "--set", "batch_size=4",
                                    "--stain-norm", "reinhard", "--stain-ref", str(ref), "--stain-aug", "hed"])
    assert res.exit_code == 0, res.output
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (recorded["stain_norm"], recorded["stain_ref"], recorded["stain_aug"]) == ("reinhard", str(ref), "hed")
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt").spec.stain["method"] == "reinhard"
    res = CliRunner().invoke(main, ["train", "simclr", "--out", str(tmp_path / "s"), "--stain-norm", "macenko",
                                    "--stain-ref", str(ref)])
    assert res.exit_code != 0 and res.output.strip().count("\n") == 0 and "stain_norm" in res.output


def test_a_missing_reference_fails_before_any_slide_is_read(tmp_path):
    from trainers.mixed_em import MixedEMConfig, MixedEMTrainer
    from trainers.stage2 import TopKMeanConfig, TopKMeanTrainer

    (tmp_path / "slides.csv").write_text("slide,label\nnot_there.svs,negative\nalso_not.svs,macro\n")
    missing = str(tmp_path / "lab_b.png")
    for trainer in (TopKMeanTrainer(TopKMeanConfig(slides=str(tmp_path / "slides.csv"), stain_norm="macenko",
                                                   stain_ref=missing)),
                    MixedEMTrainer(MixedEMConfig(slides=str(tmp_path / "slides.csv"), stain_norm="macenko",
                                                 stain_ref=missing))):
        with pytest.raises(ConfigError, match="lab_b.png") as e:  # not an error about the slides
            trainer.fit(tmp_path / trainer.name, device="cpu", progress=False)
        assert "\n" not in str(e.value)


def test_glass_tiles_left_unnormalised_are_counted_per_epoch(stain):
    _, _, ref = stain
    from slidekit.models.spec import ModelSpec
    from trainers.batches import BatchInputs, StainOptions

    spec = ModelSpec(patch_size=32)
    inputs = BatchInputs(spec, "cpu", StainOptions(stain_norm="reinhard", stain_ref=str(ref)))
    tissue = np.stack([synthetic_nuclei(32, n=4, seed=i)[0] for i in range(2)])
    glass = np.full((2, 32, 32, 3), 246, np.uint8)
    batch = torch.from_numpy(np.concatenate([tissue, glass]))
    inputs.begin_epoch()
    for b in inputs.batches([batch]):
        x = inputs(b)
    torch.testing.assert_close(x[2:], spec.normalize(batch[2:]))  # glass as it was
    assert inputs.epoch_metrics(1.0)["stain_unchanged"] == 2
    inputs.begin_epoch()
    assert inputs.epoch_metrics(1.0)["stain_unchanged"] == 0  # per epoch


def test_randstainna_sample_of_slides_is_the_patches_as_read_not_colour_jittered(tmp_path):
    from conftest import synthetic_slide
    from shapely.geometry import LineString

    from slidekit.annotations.formats import write_geojson
    from slidekit.annotations.objects import Annotation
    from trainers.scribble import ScribbleTrainer

    slide = synthetic_slide(tmp_path / "s.tif", width=1024, height=768, tissue_box=(256, 128, 640, 512))
    geo = write_geojson([Annotation(LineString([(400, 200), (400, 600)]), label="Tumour"),
                         Annotation(LineString([(700, 200), (700, 600)]), label="Background")], tmp_path / "s.geojson")
    cfg = trainers.make_config(ScribbleTrainer.Config, dict(
        slides=[str(slide), str(slide)], annotations=[str(geo), str(geo)], classes=["Background", "Tumour"],
        crop=64, epochs=1))
    t = ScribbleTrainer(cfg)
    t.dataset = t.build_dataset()  # augment=True: flips, rotations and colour jitter on training samples
    parts = t.dataset.datasets
    raw = {p.reader.read(j).tobytes() for p in parts for j in range(len(p))}
    sample = t._fit_sample()
    assert len(sample) == min(len(t.dataset), 32) >= 2
    assert all(img.tobytes() in raw for img in sample)  # every sampled patch exactly as the slide gives it
