"""Image augmentation and multi-view soft labels (FKD): the view geometry, the settings' checks, the stored
views and their teacher logits, training that replays them, and an augmented job resumed mid-run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from worker.distill.augment import Augment, apply_views, view_params_name, view_split
from worker.distill.config import DistillConfig
from worker.distill.errors import ConfigError
from worker.distill.inputs import forget_loaded_inputs, load_inputs
from worker.distill.pipeline import distill, evaluate, soft_label
from worker.distill.train import Stopped, TensorData, Views, train
from worker.distill.workfolder import Work, prepare_inputs

CROP_FLIP = {"random_resized_crop": True, "hflip": True}


def test_a_view_crops_its_box_and_resizes_it_back_mirrored_where_flagged() -> None:
    # A ramp along the width: value = column. The box [left, left + w) resized to W columns samples, at
    # output column j, the continuous position left + (j + 0.5) * w / W (pixel centres at i + 0.5).
    ramp = torch.arange(16, dtype=torch.float32).expand(2, 1, 16, 16).clone()
    params = torch.tensor([[4, 2, 8, 8, 0], [4, 2, 8, 8, 1]])
    out = apply_views(ramp, params)
    want = 2 + (torch.arange(16) + 0.5) * 8 / 16 - 0.5
    assert torch.allclose(out[0, 0, 5], want, atol=1e-5)
    assert torch.allclose(out[1, 0, 5], want.flip(0), atol=1e-5)
    whole = torch.tensor([[0, 0, 16, 16, 0], [0, 0, 16, 16, 1]])
    same = apply_views(ramp, whole)
    assert torch.allclose(same[0], ramp[0], atol=1e-5)
    assert torch.allclose(same[1], ramp[1].flip(-1), atol=1e-5)
    assert apply_views(torch.zeros(1, 3, 5, 7, dtype=torch.uint8), whole[:1]).dtype == torch.float32


def test_views_are_drawn_inside_the_image_the_same_way_every_time() -> None:
    augment = Augment.from_config({"random_resized_crop": {"scale": [0.25, 0.5]}, "hflip": True, "seed": 3})
    assert augment is not None
    params = augment.sample(2000, 24, 32, view=1)
    top, left, h, w, flip = params.long().unbind(1)
    assert ((top >= 0) & (left >= 0) & (top + h <= 24) & (left + w <= 32)).all()
    area = (h * w).float() / (24 * 32)
    assert 0.2 < float(area.min()) and float(area.max()) < 0.55  # rounding moves a box a little
    assert 0.45 < float(flip.float().mean()) < 0.55
    assert torch.equal(params, augment.sample(2000, 24, 32, view=1))
    assert not torch.equal(params, augment.sample(2000, 24, 32, view=2))
    flip_only = Augment.from_config({"hflip": True})
    assert flip_only is not None
    assert (flip_only.sample(10, 8, 8, 0)[:, :4] == torch.tensor([0, 0, 8, 8])).all()


@pytest.mark.parametrize(
    "settings",
    [
        {"hflip": "yes"},
        {"random_resized_crop": {"scale": [0.9, 0.1]}},
        {"random_resized_crop": {"size": 3}},
        {"rotate": 10},
        {},
        {"hflip": False},
        {"hflip": True, "seed": -1},
    ],
)
def test_bad_augment_settings_name_the_field(settings: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as info:
        DistillConfig.from_dict({"augment": settings})
    assert info.value.field == "augment"


def test_more_than_one_view_needs_augment() -> None:
    with pytest.raises(ConfigError) as info:
        DistillConfig.from_dict({"views": 2})
    assert info.value.field == "views"


def write_images(folder: Path, rows: int = 160) -> tuple[Path, Path]:
    """A TorchScript conv teacher and an NPZ of 1 x 12 x 12 images: class = which half holds a bright bar."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, rows)
    x = rng.integers(0, 60, (rows, 1, 12, 12)).astype(np.uint8)
    for i, label in enumerate(y):
        x[i, 0, 2:10, (1 if label == 0 else 7) : (5 if label == 0 else 11)] += 150
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 144, 2))
    torch.jit.save(torch.jit.script(teacher.eval()), str(folder / "teacher.pt"))
    np.savez(folder / "images.npz", x=x, y=y.astype(np.int64))
    return folder / "teacher.pt", folder / "images.npz"


def config(**overrides: Any) -> DistillConfig:
    settings = {
        "student": "mlp:hidden=16", "epochs": 3, "batch_size": 32, "method": "hinton", "temperature": 2.0,
        "alpha": 0.5, "preprocess": {"scale": 1 / 255}, "augment": CROP_FLIP, "views": 2,
        "export_formats": ["safetensors"],
    }  # fmt: skip
    return DistillConfig.from_dict(settings | overrides)


def test_an_augmented_job_stores_each_view_with_the_teachers_logits_on_it(tmp_path: Path) -> None:
    teacher_file, data = write_images(tmp_path / "files")
    work = tmp_path / "work"
    prepare_inputs(work, teachers=[teacher_file], dataset=data)
    cfg = config()
    manifest = soft_label(work, cfg)
    assert {"train", "val", view_split(0), view_split(1)} <= set(manifest["splits"])
    loaded, _ = load_inputs(Work(work), cfg)
    soft = Work(work).soft_labels
    for view in (0, 1):
        params = torch.from_numpy(np.load(soft / view_params_name(view)))
        assert params.shape == (len(loaded.y), 5)
        # The stored logits are the teacher's on that view of each row: the stage ran it on the views.
        stored = json.loads((soft / "manifest.json").read_text())["splits"][view_split(view)]
        assert stored["rows"] == len(loaded.y) and stored["complete"]
        with torch.no_grad():
            want = loaded.teacher.logits(apply_views(loaded.x[:8], params[:8]))
        from worker.distill.softlabels import load_soft_labels

        got = load_soft_labels(soft, view_split(view))[:8]
        assert torch.allclose(got, want, atol=1e-2)  # stored as fp16
    first = np.load(soft / view_params_name(0))
    assert not np.array_equal(first, np.load(soft / view_params_name(1)))

    result = distill(work, cfg)
    report = evaluate(work, cfg)
    views = report["soft_labels"]["views"]
    assert views["count"] == 2 and views["augment"] == CROP_FLIP
    assert 0.0 <= views["teacher_accuracy"] <= 1.0 and views["bytes_per_image"] > 0
    assert result["phases"]["distill"]["epochs"] == 3 and report["baseline"]["accuracy"] is not None
    forget_loaded_inputs()


def test_an_image_setting_on_rows_that_are_not_images_is_refused(tmp_path: Path) -> None:
    from tests.distill.tiny_job import write_job

    teacher_file, data = write_job(tmp_path / "files", rows=100, unlabelled=0)
    prepare_inputs(tmp_path / "work", teachers=[teacher_file], dataset=data)
    with pytest.raises(ConfigError) as info:
        load_inputs(Work(tmp_path / "work"), DistillConfig.from_dict({"augment": {"hflip": True}}))
    assert info.value.field == "augment" and "images" in info.value.message


def test_training_on_views_resumes_to_the_same_weights(tmp_path: Path) -> None:
    """Each epoch replays its view; stopped after epoch 1 and resumed, a run ends as an unbroken one does."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 6, 6), torch.randint(0, 3, (64,))
    augment = Augment.from_config(CROP_FLIP)
    assert augment is not None
    params = torch.stack([augment.sample(64, 6, 6, v) for v in range(2)])
    views = Views(params, torch.randn(2, 64, 3))
    data = TensorData(x, y, torch.randn(64, 3), views)
    kd = {"method": "hinton", "temperature": 2.0, "alpha": 0.5}
    cfg = DistillConfig.from_dict({"epochs": 3, "batch_size": 16, **kd, "augment": CROP_FLIP, "views": 2})

    def student() -> nn.Module:
        torch.manual_seed(1)
        return nn.Sequential(nn.Flatten(), nn.Linear(36, 3))

    whole = student()
    train(whole, data, None, "hinton", cfg, ckpt_dir=tmp_path / "a")
    broken, asked = student(), []

    def stop() -> bool:
        asked.append(1)
        return len(asked) == 1

    with pytest.raises(Stopped):
        train(broken, data, None, "hinton", cfg, ckpt_dir=tmp_path / "b", stop=stop)
    resumed = student()
    result = train(resumed, data, None, "hinton", cfg, ckpt_dir=tmp_path / "b")
    assert result.resumed_from == 1
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    # The views are what it trained on: without them the same run ends elsewhere.
    plain = student()
    train(plain, TensorData(x, y, data.teacher_logits), None, "hinton", cfg, ckpt_dir=tmp_path / "c")
    assert not torch.equal(plain[1].weight, whole[1].weight)
