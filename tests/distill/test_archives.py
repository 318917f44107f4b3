"""safe_extract against honest archives and the classic attacks, each built by hand in tmp_path."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from worker.distill.archives import _Budget, safe_extract
from worker.distill.errors import ArchiveError


def _zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


@pytest.mark.parametrize(
    "mode,suffix", [("w", ".tar"), ("w:gz", ".tar.gz"), ("w:bz2", ".tar.bz2"), ("w:xz", ".tar.xz")]
)
def test_tar_of_every_compression_extracts(tmp_path: Path, mode: str, suffix: str) -> None:
    archive = _tar(
        tmp_path / f"a{suffix}", [(_info("cats/1.txt"), b"meow"), (_info("dogs/2.txt"), b"woof")], mode
    )
    files = safe_extract(archive, tmp_path / "out")
    assert [f.relative_to(tmp_path / "out").as_posix() for f in files] == ["cats/1.txt", "dogs/2.txt"]
    assert (tmp_path / "out/dogs/2.txt").read_bytes() == b"woof"


def test_zip_extracts_files_and_directories(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "a.zip", {"data/": b"", "data/x.bin": bytes(range(256)), "./y.txt": b"y"})
    files = safe_extract(archive, tmp_path / "out")
    assert sorted(f.name for f in files) == ["x.bin", "y.txt"]
    assert (tmp_path / "out/data/x.bin").read_bytes() == bytes(range(256))


@pytest.mark.parametrize("name", ["../evil.txt", "a/../../evil.txt", "a/../b.txt", "..\\evil.txt"])
def test_dotdot_members_are_refused(tmp_path: Path, name: str) -> None:
    for archive in (_zip(tmp_path / "a.zip", {name: b"x"}), _tar(tmp_path / "a.tgz", [(_info(name), b"x")])):
        with pytest.raises(ArchiveError, match=r"\.\.") as err:
            safe_extract(archive, tmp_path / "out")
        assert err.value.code == "unsafe_member"
    assert not (tmp_path / "evil.txt").exists()


@pytest.mark.parametrize("name", ["/tmp/evil.txt", "C:/evil.txt", "\\evil.txt"])
def test_absolute_members_are_refused(tmp_path: Path, name: str) -> None:
    for archive in (_zip(tmp_path / "a.zip", {name: b"x"}), _tar(tmp_path / "a.tgz", [(_info(name), b"x")])):
        with pytest.raises(ArchiveError, match="absolute") as err:
            safe_extract(archive, tmp_path / "out")
        assert err.value.code == "unsafe_member"


def test_tar_symlink_and_hardlink_are_refused(tmp_path: Path) -> None:
    for kind, word in ((tarfile.SYMTYPE, "symlink"), (tarfile.LNKTYPE, "hardlink")):
        archive = _tar(tmp_path / f"{word}.tar", [(_info("link", kind, "/etc/passwd"), None)], "w")
        with pytest.raises(ArchiveError, match=word):
            safe_extract(archive, tmp_path / "out")
        assert not (tmp_path / "out/link").exists()


def test_zip_symlink_is_refused(tmp_path: Path) -> None:
    info = zipfile.ZipInfo("link")
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(ArchiveError, match="symlink"):
        safe_extract(tmp_path / "a.zip", tmp_path / "out")


@pytest.mark.parametrize("kind", [tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE])
def test_tar_devices_and_fifos_are_refused(tmp_path: Path, kind: bytes) -> None:
    archive = _tar(tmp_path / "a.tar", [(_info("ok.txt"), b"fine"), (_info("dev", kind), None)], "w")
    with pytest.raises(ArchiveError, match="device or special"):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "out/ok.txt").exists(), "members are vetted before anything is written"


def test_zip_device_is_refused(tmp_path: Path) -> None:
    info = zipfile.ZipInfo("dev")
    info.external_attr = (stat.S_IFCHR | 0o666) << 16
    with zipfile.ZipFile(tmp_path / "a.zip", "w") as zf:
        zf.writestr(info, "")
    with pytest.raises(ArchiveError, match="device"):
        safe_extract(tmp_path / "a.zip", tmp_path / "out")


def test_zip_bomb_by_ratio_is_refused(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "bomb.zip", {"zeros.bin": bytes(8 << 20)})  # 8 MiB of zeros -> ~8 KiB
    with pytest.raises(ArchiveError, match="decompression bomb") as err:
        safe_extract(archive, tmp_path / "out")
    assert err.value.code == "archive_bomb"
    assert not (tmp_path / "out/zeros.bin").exists()


def test_tar_bomb_by_ratio_is_refused(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "bomb.tar.gz", [(_info("zeros.bin"), bytes(8 << 20))])
    with pytest.raises(ArchiveError, match="decompression bomb"):
        safe_extract(archive, tmp_path / "out")


def test_total_size_cap_is_enforced(tmp_path: Path) -> None:
    members = {f"f{i}.bin": bytes([i]) * 1000 for i in range(5)}
    archive = _zip(tmp_path / "a.zip", members, zipfile.ZIP_STORED)
    with pytest.raises(ArchiveError, match="too large") as err:
        safe_extract(archive, tmp_path / "out", max_total_bytes=4000)
    assert err.value.code == "archive_too_large"
    assert len(safe_extract(archive, tmp_path / "ok", max_total_bytes=5000)) == 5


def test_member_count_cap_is_enforced(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "a.zip", {f"f{i}": b"" for i in range(11)})
    with pytest.raises(ArchiveError, match="cap is 10"):
        safe_extract(archive, tmp_path / "out", max_members=10)
    tar = _tar(tmp_path / "a.tar", [(_info(f"f{i}"), b"") for i in range(11)], "w")
    with pytest.raises(ArchiveError, match="more than 10"):
        safe_extract(tar, tmp_path / "out", max_members=10)


def test_lying_declared_size_is_refused_without_leaving_the_file(tmp_path: Path) -> None:
    """A header that under-declares its member passes the pre-check; extraction must still fail cleanly."""
    payload = bytes(range(256)) * 40  # 10240 bytes, incompressible enough to stay under the ratio cap
    archive = _zip(tmp_path / "a.zip", {"big.bin": payload}, zipfile.ZIP_STORED)
    raw = bytearray(archive.read_bytes())
    size = len(payload).to_bytes(4, "little")
    lie = (100).to_bytes(4, "little")
    # local header: uncompressed size at offset 22; central directory entry: at offset 24 from its signature
    assert raw[22:26] == size
    raw[22:26] = lie
    central = raw.find(b"PK\x01\x02")
    assert raw[central + 24 : central + 28] == size
    raw[central + 24 : central + 28] = lie
    archive.write_bytes(bytes(raw))
    with zipfile.ZipFile(archive) as zf:
        assert zf.getinfo("big.bin").file_size == 100  # the declared-size check alone would let it through
    with pytest.raises(ArchiveError) as err:
        safe_extract(archive, tmp_path / "out", max_total_bytes=5000)
    assert err.value.code in {"archive_too_large", "bad_archive"}
    assert not (tmp_path / "out/big.bin").exists()


def test_bytes_written_are_counted_against_both_caps() -> None:
    """The running count is the backstop when a reader yields more than its header declared."""
    budget = _Budget(max_total=10 << 20, max_ratio=200, archive_size=10_000)
    budget.consume("a", 1 << 20)
    with pytest.raises(ArchiveError, match="extracted size .* bomb|bomb"):
        budget.consume("a", 1 << 20)  # 2 MiB > 200 x 10 kB
    budget = _Budget(max_total=1000, max_ratio=200, archive_size=10_000)
    with pytest.raises(ArchiveError, match="extracted size"):
        budget.consume("a", 1001)


def test_not_an_archive(tmp_path: Path) -> None:
    (tmp_path / "plain.txt").write_text("hello")
    with pytest.raises(ArchiveError, match="not a zip or tar") as err:
        safe_extract(tmp_path / "plain.txt", tmp_path / "out")
    assert err.value.code == "bad_archive"
