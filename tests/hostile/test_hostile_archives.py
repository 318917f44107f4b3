"""Dataset archives built to escape the work folder, link to host files or fill the disk fail the job in
preflight with a stable code, uploaded and submitted the way a user would."""

from __future__ import annotations

import io
import tarfile
import zipfile

import pytest

from tests.hostile.conftest import assert_failed_fast, run_until_verdict


def zip_with(name: str, data: bytes = b"x") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("cls_a/ok.png", b"not really a png")
        zf.writestr(name, data)
    return buffer.getvalue()


def tar_with_member(kind: bytes, linkname: str = "") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        ok = tarfile.TarInfo("cls_a/ok.png")
        tf.addfile(ok, io.BytesIO(b""))
        member = tarfile.TarInfo("cls_a/odd.png")
        member.type, member.linkname = kind, linkname
        tf.addfile(member)
    return buffer.getvalue()


ARCHIVES = {
    "dotdot.zip": (lambda: zip_with("../../escape.png"), "unsafe_member"),
    "absolute.zip": (lambda: zip_with("/tmp/escape.png"), "unsafe_member"),
    "bomb.zip": (lambda: zip_with("cls_b/bomb.png", b"\0" * (64 << 20)), "archive_bomb"),
    "symlink.tar.gz": (lambda: tar_with_member(tarfile.SYMTYPE, "/etc/passwd"), "unsafe_member"),
    "hardlink.tar.gz": (lambda: tar_with_member(tarfile.LNKTYPE, "cls_a/ok.png"), "unsafe_member"),
    "device.tar.gz": (lambda: tar_with_member(tarfile.CHRTYPE), "unsafe_member"),
}


@pytest.mark.parametrize("name", list(ARCHIVES))
def test_a_hostile_dataset_archive_is_refused(service, teacher_bytes, tmp_path, name):
    make, code = ARCHIVES[name]
    job, elapsed = run_until_verdict(service, teacher_bytes, (name, make()))
    assert_failed_fast(job, elapsed, code)
    assert not (tmp_path / "escape.png").exists() and not (tmp_path.parent / "escape.png").exists()
