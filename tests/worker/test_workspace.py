"""The work-folder mirror and the input downloads: what a retry on another machine starts from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.storage import LocalStorage, keys
from worker.tasks.workspace import INDEX, WorkMirror, fetch, safe_filename


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def store(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "objects")


def test_a_pushed_folder_is_pulled_back_on_another_machine(tmp_path: Path, store: LocalStorage):
    first = tmp_path / "machine-a"
    write(first / "soft_labels" / "train-00000.npz", b"shard")
    write(first / "soft_labels" / "manifest.json", b'{"shards": 1}')
    write(first / "checkpoints" / "baseline" / "epoch-0001.pt", b"weights")
    write(first / "checkpoints" / ".epoch-0002.pt.tmp", b"half")  # being written: not a checkpoint yet
    write(first / "inputs" / "dataset" / "train.npz", b"inputs come from the job's files")
    mirror = WorkMirror(store, "ten_1", "job_1", first)
    assert mirror.push() == 3
    assert mirror.push() == 0  # nothing changed, nothing sent

    second = tmp_path / "machine-b"
    assert WorkMirror(store, "ten_1", "job_1", second).pull() == 3
    assert (second / "soft_labels" / "train-00000.npz").read_bytes() == b"shard"
    assert (second / "checkpoints" / "baseline" / "epoch-0001.pt").read_bytes() == b"weights"
    assert not (second / "checkpoints" / ".epoch-0002.pt.tmp").exists()
    assert not (second / "inputs").exists()


def test_the_index_names_pointer_files_only_after_what_they_point_to(tmp_path: Path, store: LocalStorage):
    work = tmp_path / "work"
    write(work / "checkpoints" / "epoch-0001.pt", b"one")
    write(work / "checkpoints" / "latest.json", b'{"file": "epoch-0001.pt"}')
    uploads: list[str] = []
    original = store.upload_from

    def recording(path: Path, key: str) -> tuple[int, str]:
        uploads.append(Path(key).name)
        return original(path, key)

    store.upload_from = recording  # type: ignore[method-assign]
    WorkMirror(store, "ten_1", "job_1", work).push()
    assert uploads == ["epoch-0001.pt", "latest.json"]


def test_a_pruned_checkpoint_leaves_the_store_and_the_index(tmp_path: Path, store: LocalStorage):
    work = tmp_path / "work"
    old = write(work / "checkpoints" / "epoch-0001.pt", b"one")
    mirror = WorkMirror(store, "ten_1", "job_1", work)
    mirror.push()
    old.unlink()
    write(work / "checkpoints" / "epoch-0002.pt", b"two")
    mirror.push()
    index = json.loads(b"".join(store.open_read(keys.job_work_key("ten_1", "job_1", INDEX))))["files"]
    assert set(index) == {"checkpoints/epoch-0002.pt"}
    assert not store.exists(keys.job_work_key("ten_1", "job_1", "checkpoints/epoch-0001.pt"))


def test_a_corrupt_object_is_not_pulled(tmp_path: Path, store: LocalStorage):
    work = tmp_path / "work"
    write(work / "checkpoints" / "epoch-0001.pt", b"good")
    WorkMirror(store, "ten_1", "job_1", work).push()
    store.put_stream(keys.job_work_key("ten_1", "job_1", "checkpoints/epoch-0001.pt"), [b"torn"])
    other = tmp_path / "other"
    assert WorkMirror(store, "ten_1", "job_1", other).pull() == 0
    assert not (other / "checkpoints" / "epoch-0001.pt").exists()  # the core redoes the epoch instead


def test_fetch_keeps_an_identical_copy_and_refuses_a_wrong_one(tmp_path: Path, store: LocalStorage):
    import hashlib

    size, sha = store.put_stream("tenants/t/files/f", [b"teacher bytes"])
    dest = tmp_path / "inputs" / "teacher" / "model.pt"
    dest.parent.mkdir(parents=True)
    fetch(store, "tenants/t/files/f", dest, sha256=sha)
    assert dest.read_bytes() == b"teacher bytes"
    mtime = dest.stat().st_mtime_ns
    fetch(store, "tenants/t/files/f", dest, sha256=sha)
    assert dest.stat().st_mtime_ns == mtime  # not downloaded again
    with pytest.raises(OSError, match="sha256"):
        fetch(store, "tenants/t/files/f", tmp_path / "x.pt", sha256=hashlib.sha256(b"other").hexdigest())
    assert not (tmp_path / "x.pt").exists() and not list(tmp_path.glob(".x.pt*"))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.onnx", "model.onnx"),
        ("../../etc/passwd", "passwd"),
        ("..", "teacher"),
        ("a b;rm -rf.pt", "a_b_rm_-rf.pt"),
        ("C:\\Users\\x\\net.pt", "net.pt"),
        (".hidden", "hidden"),
    ],
)
def test_user_file_names_become_one_harmless_segment(name: str, expected: str):
    assert safe_filename(name, "teacher") == expected
