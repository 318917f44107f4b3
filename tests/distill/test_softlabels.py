"""The soft-label stage: storage formats, reconstruction, manifest, resume at shard granularity."""

import json

import numpy as np
import pytest
import torch

from worker.distill.softlabels import (
    SparseLogits,
    load_soft_labels,
    load_sparse_soft_labels,
    read_manifest,
    soft_label_stage,
)

torch.set_num_threads(1)
C = 7


class CountingTeacher:
    """A fixed random linear teacher that counts the rows it labels."""

    def __init__(self, features: int = 5, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(features, C, generator=g) * 3
        self.rows = 0

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        self.rows += x.shape[0]
        return x @ self.w


@pytest.fixture
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 5)).astype(np.float32)
    y = rng.integers(0, C, size=50)
    y[:5] = -1  # unlabelled rows do not count towards accuracy
    return x, y


def run(teacher, x, out, **kw):
    args = dict(split="train", fmt="full", k=3, shard_size=16, batch_size=6, device="cpu")
    return soft_label_stage(teacher, x, out, **(args | kw))


def test_full_stores_the_teacher_logits_in_fp16_shards(tmp_path, data):
    x, y = data
    teacher = CountingTeacher()
    manifest = run(teacher, x, tmp_path, y=y, teacher_sha256="t", dataset_sha256="d")
    split = manifest["splits"]["train"]
    assert [s["name"] for s in split["shards"]] == [f"train-{i:05d}.npz" for i in range(4)]
    assert [s["rows"] for s in split["shards"]] == [16, 16, 16, 2]
    expected = torch.from_numpy(x) @ teacher.w
    torch.testing.assert_close(load_soft_labels(tmp_path, "train"), expected, atol=1e-2, rtol=1e-3)
    on_disk = read_manifest(tmp_path)
    assert on_disk == manifest and on_disk["num_classes"] == C and on_disk["teacher_sha256"] == "t"
    labelled = y >= 0
    want = float((expected.argmax(1).numpy()[labelled] == y[labelled]).mean())
    assert split["teacher_accuracy"] == pytest.approx(want)


def test_topk_with_k_equal_classes_equals_full(tmp_path, data):
    x, _ = data
    run(CountingTeacher(), x, tmp_path / "full")
    run(CountingTeacher(), x, tmp_path / "topk", fmt="topk", k=C)
    full = load_soft_labels(tmp_path / "full", "train")
    topk = load_soft_labels(tmp_path / "topk", "train")
    torch.testing.assert_close(topk, full, atol=0, rtol=0)


def test_topk_keeps_top_probabilities_exact_and_spreads_the_tail(tmp_path, data):
    x, _ = data
    teacher = CountingTeacher()
    manifest = run(teacher, x, tmp_path, fmt="topk", k=3)
    assert manifest["k"] == 3
    p_true = torch.softmax((torch.from_numpy(x) @ teacher.w).double(), 1)
    p_rec = torch.softmax(load_soft_labels(tmp_path, "train").double(), 1)
    top = p_true.topk(3, dim=1).indices
    # fp16 storage of the top values limits the match to ~1e-3 relative
    torch.testing.assert_close(p_rec.gather(1, top), p_true.gather(1, top), atol=2e-3, rtol=5e-3)
    tail = torch.ones_like(p_rec, dtype=torch.bool).scatter(1, top, False)
    rec_tail = p_rec[tail].view(len(x), C - 3)
    torch.testing.assert_close(rec_tail.sum(1), p_true[tail].view(len(x), C - 3).sum(1), atol=2e-3, rtol=5e-3)
    assert torch.allclose(rec_tail, rec_tail[:, :1].expand_as(rec_tail))  # uniform tail


def test_resume_after_losing_the_last_shard_recomputes_only_it(tmp_path, data):
    x, y = data
    fresh_dir, resumed_dir = tmp_path / "fresh", tmp_path / "resumed"
    run(CountingTeacher(), x, fresh_dir, fmt="topk", y=y)
    run(CountingTeacher(), x, resumed_dir, fmt="topk", y=y)
    (resumed_dir / "train-00003.npz").unlink()
    teacher = CountingTeacher()
    manifest = run(teacher, x, resumed_dir, fmt="topk", y=y)
    assert teacher.rows == 1 + 2  # the shape probe and the missing shard
    assert manifest == read_manifest(fresh_dir)
    torch.testing.assert_close(load_soft_labels(resumed_dir, "train"), load_soft_labels(fresh_dir, "train"))


def test_a_tampered_shard_or_a_different_teacher_is_recomputed(tmp_path, data):
    x, _ = data
    run(CountingTeacher(), x, tmp_path, teacher_sha256="a")
    np.savez(tmp_path / "train-00001.npz", logits=np.zeros((16, C), np.float16))
    teacher = CountingTeacher()
    run(teacher, x, tmp_path, teacher_sha256="a")
    assert teacher.rows == 1 + 16
    other = CountingTeacher(seed=1)
    run(other, x, tmp_path, teacher_sha256="b")
    assert other.rows == 1 + 50
    torch.testing.assert_close(
        load_soft_labels(tmp_path, "train"), torch.from_numpy(x) @ other.w, atol=1e-2, rtol=1e-3
    )


def test_splits_share_one_manifest(tmp_path, data):
    x, y = data
    run(CountingTeacher(), x, tmp_path, y=y)
    run(CountingTeacher(), x[:10], tmp_path, split="val", y=y[:10])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows"] == 50 and manifest["splits"]["val"]["rows"] == 10
    assert load_soft_labels(tmp_path, "val").shape == (10, C)


def test_shards_of_an_earlier_longer_run_are_removed(tmp_path, data):
    x, _ = data
    run(CountingTeacher(), x, tmp_path)
    run(CountingTeacher(), x[:20], tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == ["train-00000.npz", "train-00001.npz"]
    assert load_soft_labels(tmp_path, "train").shape == (20, C)


def test_a_stage_split_into_tasks_writes_the_files_of_one_run_and_then_labels_nothing(tmp_path, data):
    """Each task writes its shards and a part; the whole stage after them reuses every shard (no teacher
    row), writes the same manifest as one uninterrupted run and removes the parts."""
    from worker.distill.shard_plan import shard_indices, task_ranges

    x, y = data
    ids = dict(teacher_sha256="t", dataset_sha256="d")
    whole = run(CountingTeacher(), x, tmp_path / "one", y=y, **ids)
    split = tmp_path / "split"
    ranges = task_ranges({"train": len(x)}, 16, 32)
    assert ranges == [("train", 0, 32), ("train", 32, 50)]
    for _, start, end in reversed(ranges):  # any order, as workers finish them
        part = run(CountingTeacher(), x, split, shards=shard_indices(start, end, 16), **ids)
        assert [e["name"] for e in part["shards"]] == [
            f"train-{i:05d}.npz" for i in shard_indices(start, end, 16)
        ]
    assert read_manifest(split) is None and len(list((split / "parts").iterdir())) == 2

    teacher = CountingTeacher()
    assert run(teacher, x, split, y=y, **ids) == whole
    assert teacher.rows == 1  # the probe for the class count, no shard
    assert sorted(p.name for p in split.iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())
    for path in (tmp_path / "one").iterdir():
        assert (split / path.name).read_bytes() == path.read_bytes(), path.name


def test_a_task_resumes_from_its_part_and_a_part_for_other_inputs_vouches_for_nothing(tmp_path, data):
    x, _ = data
    run(CountingTeacher(), x, tmp_path, shards=range(0, 3), teacher_sha256="t")
    (tmp_path / "train-00002.npz").unlink()
    teacher = CountingTeacher()
    run(teacher, x, tmp_path, shards=range(0, 3), teacher_sha256="t")
    assert teacher.rows == 1 + 16  # the probe and the lost shard
    other = CountingTeacher()
    run(other, x, tmp_path, shards=range(0, 3), teacher_sha256="another teacher")
    assert other.rows == 1 + 3 * 16


def test_sparse_topk_labels_are_the_dense_ones_row_for_row(tmp_path, data):
    x, _ = data
    run(CountingTeacher(), x, tmp_path, fmt="topk", k=3)
    sparse = load_sparse_soft_labels(tmp_path, "train")
    dense = load_soft_labels(tmp_path, "train")
    assert isinstance(sparse, SparseLogits) and len(sparse) == len(x)
    # (2 + 4) bytes for each of the top 3 and a 4-byte tail: 22 bytes a row, against 7 * 4 dense
    assert sparse.nbytes == len(x) * 22 < dense.numel() * dense.element_size()
    assert torch.equal(sparse.dense(), dense)  # bit for bit: training sees the same targets
    rows = torch.tensor([3, 0, 41])
    assert torch.equal(sparse[rows].dense(), dense[rows])
    assert torch.equal(sparse[rows].argmax(1), dense[rows].argmax(1))
    run(CountingTeacher(), x, tmp_path / "full", fmt="full")
    assert isinstance(load_sparse_soft_labels(tmp_path / "full", "train"), torch.Tensor)  # full stays dense
