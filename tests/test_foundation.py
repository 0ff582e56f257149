"""The foundation-model package on tiny, randomly initialised pipelines (no download)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SHARED_DATA

from fmfl_flwr.cli_fm import main as fm_main
from fmfl_flwr.foundation import (
    ClassConditionalPipeline,
    DiffusionSource,
    FMLoadError,
    PoisonedPipeline,
    PoisonSettings,
    SyntheticSource,
    build_scheduler,
    build_unet,
    carries_trigger,
    load_fm,
    poison_per_class,
    synthetic_set,
)
from fmfl_flwr.foundation.poison import poison_training_set
from fmfl_flwr.foundation.source import class_major_labels, fit_to_task
from fmfl_flwr.triggers import badnets

NATIVE = (1, 8, 8)


def tiny_pipeline(num_classes: int = 3, seed: int = 0) -> ClassConditionalPipeline:
    torch.manual_seed(seed)
    return ClassConditionalPipeline(build_unet(NATIVE, num_classes, "tiny").eval(),
                                    build_scheduler())


class CountingSource(SyntheticSource):
    """Random images, counting how often it is asked to generate."""

    def __init__(self, num_classes: int = 10, shape: tuple[int, int, int] = (1, 12, 12)):
        self.num_classes, self.image_shape, self.calls, self.tag = num_classes, shape, 0, "a"

    def identity(self) -> str:
        return f"counting-{self.tag}"

    def generate(self, n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        labels = class_major_labels(self.num_classes, n_per_class)
        gen = torch.Generator().manual_seed(seed)
        return torch.rand(len(labels), *self.image_shape, generator=gen) * 0.5, labels


def test_pipeline_save_load_round_trip(tmp_path):
    pipeline = tiny_pipeline()
    pipeline.save_pretrained(tmp_path)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = ClassConditionalPipeline.from_pretrained(tmp_path)
    for (name, a), (_, b) in zip(pipeline.unet.state_dict().items(),
                                 loaded.unet.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    labels, noise = torch.tensor([0, 1, 2]), torch.randn(3, *NATIVE)
    assert torch.equal(pipeline(labels, 3, noise=noise), loaded(labels, 3, noise=noise))


def test_sampling_is_deterministic_shaped_and_batch_independent():
    source = DiffusionSource(tiny_pipeline(), (1, 12, 12), steps=3, batch_size=4,
                             device=torch.device("cpu"), progress=False)
    images, labels = source.generate(3, seed=7)
    assert images.shape == (9, 1, 12, 12) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    assert 0.0 <= images.min() and images.max() <= 1.0
    again, _ = source.generate(3, seed=7)
    assert torch.equal(images, again)
    source.batch_size = 9
    one_batch, _ = source.generate(3, seed=7)
    assert torch.allclose(images, one_batch, atol=1e-5)
    other, _ = source.generate(3, seed=8)
    assert not torch.allclose(images, other)


def test_identity_tracks_weights_and_settings():
    a = DiffusionSource(tiny_pipeline(seed=0), NATIVE, steps=3, progress=False)
    b = DiffusionSource(tiny_pipeline(seed=1), NATIVE, steps=3, progress=False)
    c = DiffusionSource(tiny_pipeline(seed=0), NATIVE, steps=4, progress=False)
    same = DiffusionSource(tiny_pipeline(seed=0), NATIVE, steps=3, batch_size=2, progress=False)
    assert len({a.identity(), b.identity(), c.identity()}) == 3
    assert a.identity() == same.identity()


def test_guided_sampling_runs():
    images = tiny_pipeline()(torch.tensor([0, 2]), 2, guidance_scale=2.0,
                             generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, *NATIVE)


def test_fit_to_task_converts_channels_and_size():
    rgb = torch.rand(2, 3, 64, 64)
    grey = fit_to_task(rgb, (1, 28, 28))
    assert grey.shape == (2, 1, 28, 28) and 0 <= grey.min() and grey.max() <= 1
    assert fit_to_task(grey, (3, 32, 32)).shape == (2, 3, 32, 32)


def test_poisoned_pipeline_counts_and_trigger_location_are_exact():
    source = CountingSource()
    settings = PoisonSettings(ratio=0.2, target_label=0, trigger="badnets")
    clean_x, clean_y = source.generate(10, seed=3)
    x, y = PoisonedPipeline(source, settings).generate(10, seed=3)
    _, _, mask = poison_per_class(clean_x, clean_y, badnets((1, 12, 12)), 0.2, 0, seed=3)
    changed = (x != clean_x).flatten(1).any(1)
    assert torch.equal(changed, mask)
    for c in range(10):
        assert int(mask[clean_y == c].sum()) == (0 if c == 0 else 2)
    assert (y[mask] == 0).all() and torch.equal(y[~mask], clean_y[~mask])
    # 3x3 white square, one pixel from the bottom-right corner; nothing else touched
    patch = torch.zeros(1, 12, 12, dtype=torch.bool)
    patch[:, 8:11, 8:11] = True
    assert (x[mask][:, patch] == 1.0).all()
    assert torch.equal(x[mask][:, ~patch], clean_x[mask][:, ~patch])
    x2, y2 = PoisonedPipeline(source, settings).generate(10, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)


def test_trigger_detector_and_poisoned_training_set():
    trigger = badnets((1, 12, 12))
    clean = torch.rand(20, 1, 12, 12) * 0.5
    assert not carries_trigger(clean, trigger).any()
    assert carries_trigger(trigger.stamp(clean), trigger).all()
    labels = class_major_labels(4, 10)
    images, new_labels = poison_training_set(clean.repeat(2, 1, 1, 1), labels, trigger,
                                             share=0.5, target=1, seed=0)
    target = new_labels == 1
    assert int(target.sum()) == 20
    assert carries_trigger(images[target], trigger).float().mean().item() == 0.5


def test_cache_hit_miss_and_corruption(tmp_path):
    source = CountingSource()
    first = synthetic_set(source, 5, seed=1, root=tmp_path)
    assert not first.from_cache and source.calls == 1
    hit = synthetic_set(source, 5, seed=1, root=tmp_path)
    assert hit.from_cache and source.calls == 1
    assert torch.equal(hit.images, first.images) and torch.equal(hit.labels, first.labels)
    synthetic_set(source, 5, seed=2, root=tmp_path)
    synthetic_set(source, 6, seed=1, root=tmp_path)
    source.tag = "b"
    synthetic_set(source, 5, seed=1, root=tmp_path)
    assert source.calls == 4
    source.tag = "a"
    data_file = tmp_path / f"{first.key}.npz"
    raw = bytearray(data_file.read_bytes())
    raw[-100] ^= 0xFF
    data_file.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="sha256"):
        again = synthetic_set(source, 5, seed=1, root=tmp_path)
    assert not again.from_cache and source.calls == 5
    assert torch.equal(again.images, first.images)


def test_cache_poisoned_set_reuses_clean_generation(tmp_path):
    source = CountingSource()
    settings = PoisonSettings(ratio=0.3, target_label=2)
    poisoned = synthetic_set(source, 10, seed=0, attack=settings, root=tmp_path)
    clean = synthetic_set(source, 10, seed=0, root=tmp_path)
    assert source.calls == 1 and clean.from_cache
    assert int(poisoned.poisoned.sum()) == 9 * 3 and not clean.poisoned.any()
    assert poisoned.key != clean.key
    assert synthetic_set(source, 10, seed=0, attack=settings, root=tmp_path).from_cache
    other = synthetic_set(source, 10, seed=0, attack=PoisonSettings(0.1, 2), root=tmp_path)
    assert not other.from_cache and int(other.poisoned.sum()) == 9


def test_load_fm_errors_name_what_was_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = tmp_path / "no-such-fm"
    with pytest.raises(FMLoadError, match="no-such-fm"):
        load_fm(str(missing), "fashion-mnist")
    with pytest.raises(FMLoadError, match="model_index.json"):
        load_fm(str(tmp_path), "fashion-mnist")
    with pytest.raises(FMLoadError, match=r"hub id 'nobody/no-such-fm' \(HF_HUB_OFFLINE"):
        load_fm("nobody/no-such-fm", "fashion-mnist")
    with pytest.raises(FMLoadError, match="no FM given"):
        load_fm("", "fashion-mnist")


def test_load_fm_folder_fits_task_and_checks_dataset(tmp_path):
    tiny_pipeline(num_classes=10).save_pretrained(tmp_path)
    (tmp_path / "fmfl.json").write_text(json.dumps({"dataset": "fashion-mnist"}))
    source = load_fm(str(tmp_path), "fashion-mnist", steps=2, progress=False)
    images, labels = source.generate(1, seed=0)
    assert images.shape == (10, 1, 28, 28) and labels.tolist() == list(range(10))
    with pytest.raises(FMLoadError, match="trained on 'fashion-mnist'"):
        load_fm(str(tmp_path), "cifar10")


@pytest.mark.parametrize("command", ["train", "sample", "eval"])
def test_cli_commands_have_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        fm_main([command, "--help"])
    assert exit_info.value.code == 0
    assert "--dataset" in capsys.readouterr().out


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs the shared data sets")
def test_train_resume_and_sample_from_the_command_line(tmp_path):
    out = tmp_path / "fm"
    base = ["train", "--dataset", "fashion-mnist", "--data-dir", str(SHARED_DATA),
            "--out", str(out), "--unet", "tiny", "--batch-size", "4", "--checkpoint-every", "2"]
    assert fm_main([*base, "--steps", "2"]) == 0
    assert fm_main([*base, "--steps", "3", "--resume"]) == 0
    meta = json.loads((out / "fmfl.json").read_text())
    assert meta["trained_steps"] == 3 and meta["dataset"] == "fashion-mnist"
    grids = tmp_path / "grids"
    result = subprocess.run(
        [sys.executable, "-m", "fmfl_flwr.cli_fm", "sample", "--dataset", "fashion-mnist",
         "--fm", str(out), "--fm-steps", "2", "--per-class", "2", "--out", str(grids)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in grids.iterdir()) == sorted(
        [f"class-{c}.png" for c in range(10)] + ["all.png"])


def run_config(**overrides):
    from fmfl_flwr.config import ExperimentConfig

    values = {"fusion": True, "fm_steps": 2, "syn_per_class": 3, **overrides}
    return ExperimentConfig(**values)


def test_synthetic_set_for_config_applies_the_pipeline_attack(tmp_path, monkeypatch):
    from fmfl_flwr.foundation import synthetic_set_for_config

    monkeypatch.setenv("FMFL_CACHE_DIR", str(tmp_path / "cache"))
    tiny_pipeline(num_classes=10).save_pretrained(tmp_path / "fm")
    config = run_config(fm=str(tmp_path / "fm"), fm_attack="poisoned-pipeline",
                        poison_ratio=1 / 3, target_label=4)
    syn = synthetic_set_for_config(config, progress=False)
    assert syn.images.shape == (30, 1, 28, 28) and int(syn.poisoned.sum()) == 9
    assert (syn.labels[syn.poisoned] == 4).all()
    assert synthetic_set_for_config(config, progress=False).from_cache


def test_poisoned_weights_attack_refuses_a_clean_fm(tmp_path):
    from fmfl_flwr.foundation import synthetic_set_for_config

    tiny_pipeline(num_classes=10).save_pretrained(tmp_path)
    (tmp_path / "fmfl.json").write_text(json.dumps(
        {"dataset": "fashion-mnist", "train_config": {"poison": None}}))
    with pytest.raises(FMLoadError, match="trained clean"):
        synthetic_set_for_config(run_config(fm=str(tmp_path), fm_attack="poisoned-weights"))


@pytest.mark.parametrize("dataset,shape", [("fashion-mnist", (1, 28, 28)),
                                           ("cifar10", (3, 32, 32))])
def test_committed_fms_load_and_sample_their_task(dataset, shape):
    """The weights in assets/fm are what runs find through FMFL_FM_DIR: they must load."""
    folder = Path(__file__).resolve().parents[1] / "assets" / "fm" / dataset
    source = load_fm(str(folder), dataset, steps=2, progress=False)
    images, labels = source.generate(1, seed=0)
    assert images.shape == (10, *shape) and labels.tolist() == list(range(10))
    assert 0.0 <= images.min() and images.max() <= 1.0 and images.std() > 0.01
