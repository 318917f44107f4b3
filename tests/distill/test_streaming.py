"""Image datasets read a batch at a time (image_stream.py): every layout indexes to the rows the in-memory
reader gives, a streamed job computes what the in-memory job computes (soft labels, weights, report), bad
members are named, and a streamed run stopped mid-epoch resumes to the same weights."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from worker.distill.config import DistillConfig
from worker.distill.data import load_dataset
from worker.distill.errors import DatasetError
from worker.distill.image_stream import ImageStream, open_image_stream, should_stream
from worker.distill.inputs import forget_loaded_inputs, load_inputs
from worker.distill.pipeline import distill, evaluate, soft_label
from worker.distill.workfolder import Work, prepare_inputs

SIDE = 12


def bars(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (rows, 12, 12) grey images and labels: class = which half holds a bright bar."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, rows)
    x = rng.integers(0, 60, (rows, SIDE, SIDE)).astype(np.uint8)
    for i, label in enumerate(y):
        x[i, 2:10, (1 if label == 0 else 7) : (5 if label == 0 else 11)] += 150
    return x, y


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def webdataset(path: Path, x: np.ndarray, y: np.ndarray, first: int = 0) -> Path:
    with tarfile.open(path, "w") as tar:
        for i, (pixels, label) in enumerate(zip(x, y, strict=True)):
            add(tar, f"{first + i:06d}.png", png(pixels))
            add(tar, f"{first + i:06d}.cls", str(int(label)).encode())
    return path


def class_folders(x: np.ndarray, y: np.ndarray, split: str = "") -> dict[str, bytes]:
    pairs = enumerate(zip(x, y, strict=True))
    return {f"{split}{'ab'[label]}/{i:04d}.png": png(p) for i, (p, label) in pairs}


def write_teacher(path: Path) -> Path:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 144, 2))
    torch.jit.save(torch.jit.script(teacher.eval()), str(path))
    return path


def layouts(tmp_path: Path) -> dict[str, Path]:
    """The same 40 images in every layout that streams."""
    x, y = bars(40)
    out: dict[str, Path] = {"webdataset": webdataset(tmp_path / "shard.tar", x, y)}
    shards = tmp_path / "shards"
    shards.mkdir()
    webdataset(shards / "a-000.tar", x[:25], y[:25])
    webdataset(shards / "a-001.tar", x[25:], y[25:], first=25)
    out["shard set"] = shards
    members = class_folders(x, y)
    with zipfile.ZipFile(tmp_path / "folders.zip", "w") as zf:
        for name, data in members.items():
            zf.writestr(f"wrapped/{name}", data)
    out["zip"] = tmp_path / "folders.zip"
    split = class_folders(x[:30], y[:30], "train/") | class_folders(x[30:], y[30:], "val/")
    with tarfile.open(tmp_path / "split.tar", "w") as tar:
        for name, data in split.items():
            add(tar, name, data)
    out["tar with a split"] = tmp_path / "split.tar"
    folder = tmp_path / "folder"
    for name, data in members.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    out["folder"] = folder
    return out


def test_every_layout_indexes_to_the_rows_the_in_memory_reader_decodes(tmp_path: Path) -> None:
    for kind, path in layouts(tmp_path).items():
        streamed = open_image_stream(path)
        assert streamed is not None, kind
        if kind == "shard set":  # not a format the in-memory path reads (a folder of archives)
            x, y = bars(40)
            want_x, want_y = x[:, None].astype(np.float32), y
        else:
            whole = load_dataset(path, DistillConfig())
            want_x, want_y = whole.x, whole.y
            if whole.x_val is not None:
                assert streamed.x_val is not None and streamed.y_val is not None
                assert torch.equal(streamed.x_val.decode(slice(0, None)), torch.from_numpy(whole.x_val))
                assert streamed.y_val.tolist() == whole.y_val.tolist()
            assert streamed.class_names == whole.class_names
        assert streamed.x.shape == want_x.shape, kind
        # Two batches through the loader's worker processes, in order.
        got = torch.cat(list(streamed.x.batches([range(0, 17), range(17, len(streamed.x))], workers=2)))
        assert torch.equal(got, torch.from_numpy(want_x)), kind
        assert streamed.y.tolist() == want_y.tolist(), kind


def test_only_image_layouts_stream_and_auto_keeps_small_ones_in_memory(tmp_path: Path) -> None:
    paths = layouts(tmp_path)
    np.savez(tmp_path / "rows.npz", x=np.zeros((4, 3), np.float32))
    assert open_image_stream(tmp_path / "rows.npz") is None
    assert not should_stream(tmp_path / "rows.npz", None, "always")
    assert should_stream(paths["zip"], None, "always") and not should_stream(paths["zip"], None, "never")
    assert not should_stream(paths["zip"], None, "auto")  # 40 small images: the in-memory path


def config(**overrides: Any) -> DistillConfig:
    settings = {
        "student": "cnn:channels=4", "epochs": 2, "batch_size": 16, "method": "hinton", "temperature": 2.0,
        "alpha": 0.5, "preprocess": {"scale": 1 / 255}, "soft_label_format": "topk", "topk": 2,
        "shard_size": 40, "augment": {"random_resized_crop": True, "hflip": True}, "views": 2,
        "export_formats": ["safetensors"],
    }  # fmt: skip
    return DistillConfig.from_dict(settings | overrides)


def run_job(work: Path, teacher: Path, dataset: Path, cfg: DistillConfig) -> dict[str, Any]:
    prepare_inputs(work, teachers=[teacher], dataset=dataset)
    soft_label(work, cfg)
    distill(work, cfg)
    report = evaluate(work, cfg)
    forget_loaded_inputs()
    return report


def test_a_streamed_job_computes_what_the_in_memory_job_computes(tmp_path: Path) -> None:
    x, y = bars(120)
    shard = webdataset(tmp_path / "shard.tar", x, y)
    teacher = write_teacher(tmp_path / "teacher.pt")
    streamed_cfg, whole_cfg = config(streaming="always"), config(streaming="never")
    loaded, _ = load_inputs(Work(_prepared(tmp_path / "probe", teacher, shard)), streamed_cfg)
    assert isinstance(loaded.x, ImageStream) and isinstance(loaded.x_val, ImageStream)
    forget_loaded_inputs()

    streamed = run_job(tmp_path / "streamed", teacher, shard, streamed_cfg)
    whole = run_job(tmp_path / "whole", teacher, shard, whole_cfg)
    soft = [Work(tmp_path / name).soft_labels for name in ("streamed", "whole")]
    names = sorted(p.name for p in soft[0].glob("*.npz"))
    assert names == sorted(p.name for p in soft[1].glob("*.npz")) and len(names) >= 4  # train, val, 2 views
    for name in names:
        assert (soft[0] / name).read_bytes() == (soft[1] / name).read_bytes(), name
    weights = [torch.load(Work(tmp_path / n).checkpoints / "student.pt") for n in ("streamed", "whole")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    for key in ("student", "baseline", "teacher"):
        assert streamed[key]["accuracy"] == whole[key]["accuracy"], key
    assert streamed["soft_labels"]["views"] == whole["soft_labels"]["views"]


def _prepared(work: Path, teacher: Path, dataset: Path) -> Path:
    prepare_inputs(work, teachers=[teacher], dataset=dataset)
    return work


@pytest.mark.parametrize("problem", ["corrupt", "size", "label"])
def test_a_bad_member_is_named_before_anything_trains(tmp_path: Path, problem: str) -> None:
    x, y = bars(6)
    shards = tmp_path / "shards"
    shards.mkdir()
    webdataset(shards / "ok-000.tar", x[:3], y[:3])
    with tarfile.open(shards / "ok-001.tar", "w") as tar:
        for i in range(3, 6):
            data = png(x[i])
            if i == 4 and problem == "corrupt":
                data = b"\x89PNG not really"
            if i == 4 and problem == "size":
                data = png(np.zeros((SIDE, SIDE + 1), np.uint8))
            add(tar, f"{i:06d}.png", data)
            add(tar, f"{i:06d}.cls", b"one" if i == 4 and problem == "label" else b"1")
    with pytest.raises(DatasetError) as info:
        open_image_stream(shards)
    assert "000004" in info.value.message
    assert info.value.code == {"corrupt": "bad_image", "size": "image_size_mismatch", "label": "bad_labels"}[
        problem
    ]


def test_a_link_in_a_streamed_tar_is_refused(tmp_path: Path) -> None:
    x, y = bars(2)
    shard = webdataset(tmp_path / "s.tar", x, y)
    with tarfile.open(shard, "a") as tar:
        link = tarfile.TarInfo("000009.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    with pytest.raises(DatasetError) as info:
        open_image_stream(shard)
    assert info.value.code == "bad_archive" and "000009.png" in info.value.message


def test_a_streamed_run_stopped_mid_epoch_resumes_to_the_same_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x, y = bars(96)
    shard = webdataset(tmp_path / "shard.tar", x, y)
    teacher = write_teacher(tmp_path / "teacher.pt")
    cfg = config(streaming="always", checkpoint_every_steps=2, baseline=False, epochs=2)
    unbroken = tmp_path / "unbroken"
    prepare_inputs(unbroken, teachers=[teacher], dataset=shard)
    soft_label(unbroken, cfg)
    distill(unbroken, cfg)
    forget_loaded_inputs()

    broken = tmp_path / "broken"
    prepare_inputs(broken, teachers=[teacher], dataset=shard)
    soft_label(broken, cfg)
    calls = {"n": 0}

    def stop() -> bool:  # polled after every step (and per epoch): stop inside epoch 2 (5 steps each)
        calls["n"] += 1
        return calls["n"] == 8

    from worker.distill import train as train_module

    monkeypatch.setattr(train_module, "STOP_CHECK_SECONDS", -1.0)
    with pytest.raises(train_module.Stopped):
        distill(broken, cfg, stop=stop)
    monkeypatch.setattr(train_module, "STOP_CHECK_SECONDS", 5.0)
    checkpoint = torch.load(Work(broken).checkpoints / json.loads(
        (Work(broken).checkpoints / "latest.json").read_text())["file"], weights_only=False)
    assert checkpoint["epoch"] == 1 and 0 < checkpoint["within"]["position"] < 5  # inside epoch 2
    distill(broken, cfg)
    forget_loaded_inputs()
    weights = [torch.load(Work(w).checkpoints / "student.pt") for w in (unbroken, broken)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


LIMITED_SIDE, LIMITED_ROWS, HEADROOM_MB = 128, 3800, 700


def test_a_dataset_larger_than_the_memory_given_distils_by_streaming(tmp_path: Path) -> None:
    """3,800 RGB 128x128 JPEGs: 747 MB as float32 rows, twice that once preprocessed beside them. The stages
    run in a child allowed 700 MB of address space beyond what it holds after its imports: the in-memory
    path runs out (the limit bites), the streamed one distils: soft labels, training, and the report (whose
    latency batch of 256 rows is a fixed cost, whatever the dataset's size)."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, LIMITED_ROWS)
    shard = tmp_path / "big.tar"
    ramp = np.linspace(0, 255, LIMITED_SIDE, dtype=np.float32)
    with tarfile.open(shard, "w") as tar:
        for i, label in enumerate(y):
            image = np.stack([np.add.outer(ramp, ramp) / 2] * 3, axis=-1)
            image[:, : LIMITED_SIDE // 2] *= 0.3 if label == 0 else 1.0
            out = io.BytesIO()
            Image.fromarray(image.astype(np.uint8)).save(out, format="JPEG", quality=70)
            add(tar, f"{i:06d}.jpg", out.getvalue())
            add(tar, f"{i:06d}.cls", str(int(label)).encode())
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                            nn.Linear(16, 2))  # fmt: skip
    torch.jit.save(torch.jit.script(teacher.eval()), str(tmp_path / "teacher.pt"))
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1"}
    results = {}
    for streaming in ("never", "always"):
        work = tmp_path / streaming
        prepare_inputs(work, teachers=[tmp_path / "teacher.pt"], dataset=shard)
        child = subprocess.run(
            [sys.executable, "-m", "tests.distill.memory_limited", str(work), streaming, str(HEADROOM_MB)],
            capture_output=True, text=True, timeout=300, env=env, cwd=Path(__file__).parents[2],
        )  # fmt: skip
        results[streaming] = child.stdout.strip().splitlines()[-1:] or [child.stderr[-2000:]]
    assert LIMITED_ROWS * 3 * LIMITED_SIDE**2 * 4 > HEADROOM_MB << 20  # the rows alone would not fit
    assert results["never"] == ["MemoryError"], results
    assert results["always"][0].startswith("done"), results


def test_an_unreadable_archive_is_a_dataset_error_on_either_path(tmp_path: Path) -> None:
    broken = tmp_path / "broken.zip"
    x, y = bars(3)
    with zipfile.ZipFile(broken, "w") as zf:
        for name, data in class_folders(x, y).items():
            zf.writestr(name, data)
    broken.write_bytes(broken.read_bytes()[:-30])  # the central directory's end is cut off
    assert not should_stream(broken, None, "auto")  # left to the in-memory reader, which names the problem
    with pytest.raises(DatasetError):
        load_dataset(broken, DistillConfig())
    assert open_image_stream(broken) is None  # not recognisable as a zip at all: not streamable


def test_a_parquet_table_streams_row_group_by_row_group_to_the_in_memory_result(tmp_path: Path) -> None:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.distill.tiny_job import PREPROCESS, clusters, write_job

    teacher, _ = write_job(tmp_path / "files")
    raw, y, _ = clusters(300, seed=3)
    frame = pd.DataFrame(raw, columns=[f"f{i}" for i in range(raw.shape[1])])
    frame["label"] = np.array(["cat", "dog", "emu"])[y]
    frame.loc[:9, "label"] = None  # unlabelled rows
    table = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pandas(frame), table, row_group_size=64)  # 5 row groups
    cfg = {
        "student": "mlp:hidden=16", "epochs": 2, "batch_size": 32, "method": "hinton", "temperature": 2.0,
        "alpha": 0.5, "preprocess": PREPROCESS, "soft_label_format": "topk", "topk": 2,
        "export_formats": ["safetensors"],
    }  # fmt: skip
    streamed_cfg = DistillConfig.from_dict(cfg | {"streaming": "always"})
    loaded, _ = load_inputs(Work(_prepared(tmp_path / "probe", teacher, table)), streamed_cfg)
    assert loaded.x.__class__.__name__ == "TableStream" and loaded.class_names == ["cat", "dog", "emu"]
    assert int((loaded.y < 0).sum()) + (0 if loaded.y_val is None else int((loaded.y_val < 0).sum())) == 10
    forget_loaded_inputs()
    streamed = run_job(tmp_path / "streamed", teacher, table, streamed_cfg)
    whole = run_job(tmp_path / "whole", teacher, table, DistillConfig.from_dict(cfg | {"streaming": "never"}))
    weights = [torch.load(Work(tmp_path / n).checkpoints / "student.pt") for n in ("streamed", "whole")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert streamed["student"]["accuracy"] == whole["student"]["accuracy"]

    frame.loc[20, "f3"] = np.nan
    pq.write_table(pa.Table.from_pandas(frame), tmp_path / "nan.parquet", row_group_size=64)
    with pytest.raises(DatasetError) as info:
        load_inputs(Work(_prepared(tmp_path / "nan", teacher, tmp_path / "nan.parquet")), streamed_cfg)
    assert info.value.code == "non_finite" and "row 20" in info.value.message
    forget_loaded_inputs()


def test_an_uncompressed_npz_is_mapped_in_place_and_trains_like_the_in_memory_one(tmp_path: Path) -> None:
    """uint8 images in an np.savez file: mapped where they lie (uint8 until the batch), the same student;
    a compressed NPZ is not mapped (it is read whole, under the decode cap)."""
    from worker.distill.table_stream import TableStream, npz_should_stream

    x, y = bars(120)
    data = tmp_path / "images.npz"
    np.savez(data, x=x[:, None], y=y, x_val=x[:20, None], y_val=y[:20])
    np.savez_compressed(tmp_path / "packed.npz", x=x[:, None], y=y)
    assert npz_should_stream(data, "always") and not npz_should_stream(data, "auto")  # 69 KB: in memory
    assert not npz_should_stream(tmp_path / "packed.npz", "always")
    teacher = write_teacher(tmp_path / "teacher.pt")
    loaded, _ = load_inputs(Work(_prepared(tmp_path / "probe", teacher, data)), config(streaming="always"))
    assert isinstance(loaded.x, TableStream) and loaded.x.dtype == "|u1" and loaded.x.offset
    forget_loaded_inputs()
    streamed = run_job(tmp_path / "streamed", teacher, data, config(streaming="always"))  # 2 stored views
    whole = run_job(tmp_path / "whole", teacher, data, config(streaming="never"))
    weights = [torch.load(Work(tmp_path / n).checkpoints / "student.pt") for n in ("streamed", "whole")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert streamed["student"]["accuracy"] == whole["student"]["accuracy"]
