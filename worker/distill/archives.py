"""Extract user-supplied zip and tar archives without trusting a single byte of them.

Every member is checked before anything is written: no absolute paths, no `..`, no links, no devices or
fifos, no encrypted zip entries. The declared sizes are summed against the caps first (cheap refusal of an
obvious bomb), and the bytes actually written are counted again while streaming, because a crafted header
can under-declare what the decompressor will produce.
"""

from __future__ import annotations

import stat
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO

from worker.distill.errors import ArchiveError

GiB = 1 << 30
CHUNK = 1 << 20
# An archive whose whole content is under this size cannot hurt anyone, whatever its compression ratio
# (tiny CSVs of zeros compress more than 200:1).
RATIO_FLOOR_BYTES = 1 << 20
MAX_RATIO = 200.0  # content over this many times the compressed size is treated as a decompression bomb


def safe_extract(
    archive_path: Path,
    dest_dir: Path,
    *,
    max_total_bytes: int = 2 * GiB,
    max_ratio: float = MAX_RATIO,
    max_members: int = 1_000_000,
) -> list[Path]:
    """Extract a zip or tar(.gz/.bz2/.xz) into `dest_dir`; return the regular files written, in archive order.

    Raises `ArchiveError` (nothing is left behind in `dest_dir` that this call wrote) when the archive is
    unreadable or any member is unsafe or the content exceeds `max_total_bytes`, `max_ratio` times the
    archive's own size, or `max_members` entries.
    """
    archive_path, dest_dir = Path(archive_path), Path(dest_dir)
    archive_size = max(archive_path.stat().st_size, 1)
    budget = _Budget(max_total_bytes, max_ratio, archive_size)
    dest_dir.mkdir(parents=True, exist_ok=True)
    root = dest_dir.resolve()
    written: list[Path] = []
    try:
        if zipfile.is_zipfile(archive_path):
            _extract_zip(archive_path, root, budget, max_members, written)
        elif _is_tar(archive_path):
            _extract_tar(archive_path, root, budget, max_members, written)
        else:
            raise ArchiveError(f"{archive_path.name} is not a zip or tar archive", code="bad_archive")
    except ArchiveError:
        _remove(written)
        raise
    except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError, ValueError) as exc:
        _remove(written)
        raise ArchiveError(f"cannot read archive {archive_path.name}: {exc}", code="bad_archive") from exc
    return [p for p in written if p.is_file()]


class _Budget:
    def __init__(self, max_total: int, max_ratio: float, archive_size: int) -> None:
        self.max_total, self.max_ratio, self.archive_size = max_total, max_ratio, archive_size
        self.declared = 0
        self.actual = 0

    def declare(self, name: str, size: int) -> None:
        self.declared += max(size, 0)
        self._check(self.declared, f"declared size (at member {name!r})")

    def consume(self, name: str, size: int) -> None:
        self.actual += size
        self._check(self.actual, f"extracted size (at member {name!r})")

    def _check(self, total: int, what: str) -> None:
        if total > self.max_total:
            raise ArchiveError(
                f"archive too large: {what} exceeds the cap of {self.max_total} bytes",
                code="archive_too_large",
            )
        if total > RATIO_FLOOR_BYTES and total > self.max_ratio * self.archive_size:
            raise ArchiveError(
                f"archive looks like a decompression bomb: {what} is over {self.max_ratio:g} times "
                f"the archive's {self.archive_size} bytes",
                code="archive_bomb",
            )


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except (OSError, EOFError, tarfile.TarError):
        return False


def _target(root: Path, name: str) -> Path:
    """The member's destination inside `root`, or ArchiveError for a name that could land anywhere else."""
    if not name or "\x00" in name:
        raise ArchiveError(f"archive member with an empty or invalid name {name!r}", code="unsafe_member")
    posix = name.replace("\\", "/")
    if posix.startswith("/") or (len(posix) > 1 and posix[1] == ":"):
        raise ArchiveError(f"archive member {name!r} has an absolute path", code="unsafe_member")
    parts = PurePosixPath(posix).parts
    if ".." in parts:
        raise ArchiveError(f"archive member {name!r} points outside the archive ('..')", code="unsafe_member")
    target = root.joinpath(*[p for p in parts if p not in ("", ".")]).resolve()
    if target != root and root not in target.parents:
        raise ArchiveError(f"archive member {name!r} resolves outside the destination", code="unsafe_member")
    return target


def _copy(src: IO[bytes], target: Path, name: str, budget: _Budget) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as out:
        for chunk in iter(lambda: src.read(CHUNK), b""):
            budget.consume(name, len(chunk))
            out.write(chunk)


def _extract_zip(path: Path, root: Path, budget: _Budget, max_members: int, written: list[Path]) -> None:
    with zipfile.ZipFile(path) as zf:
        infos = zf.infolist()
        if len(infos) > max_members:
            raise ArchiveError(
                f"archive has {len(infos)} members; the cap is {max_members}", code="archive_too_large"
            )
        for info in infos:  # every member is vetted before the first byte is written
            _target(root, info.filename)
            mode = info.external_attr >> 16
            kind = stat.S_IFMT(mode)
            if kind == stat.S_IFLNK:
                raise ArchiveError(f"archive member {info.filename!r} is a symlink", code="unsafe_member")
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise ArchiveError(
                    f"archive member {info.filename!r} is a device or special file", code="unsafe_member"
                )
            if info.flag_bits & 0x1:
                raise ArchiveError(f"archive member {info.filename!r} is encrypted", code="bad_archive")
            budget.declare(info.filename, info.file_size)
        for info in infos:
            target = _target(root, info.filename)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            written.append(target)
            with zf.open(info) as src:
                _copy(src, target, info.filename, budget)


def _tar_members(tf: tarfile.TarFile, max_members: int) -> Iterator[tarfile.TarInfo]:
    count = 0
    while (member := tf.next()) is not None:
        count += 1
        if count > max_members:
            raise ArchiveError(f"archive has more than {max_members} members", code="archive_too_large")
        yield member


def _extract_tar(path: Path, root: Path, budget: _Budget, max_members: int, written: list[Path]) -> None:
    with tarfile.open(path, mode="r:*") as tf:
        members = []
        for member in _tar_members(tf, max_members):
            _target(root, member.name)
            if member.issym() or member.islnk():
                what = "symlink" if member.issym() else "hardlink"
                raise ArchiveError(f"archive member {member.name!r} is a {what}", code="unsafe_member")
            if not (member.isreg() or member.isdir()):
                raise ArchiveError(
                    f"archive member {member.name!r} is a device or special file", code="unsafe_member"
                )
            budget.declare(member.name, member.size)
            members.append(member)
        for member in members:
            target = _target(root, member.name)
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            written.append(target)
            src = tf.extractfile(member)
            if src is None:
                raise ArchiveError(f"archive member {member.name!r} cannot be read", code="bad_archive")
            with src:
                _copy(src, target, member.name, budget)


def _remove(written: list[Path]) -> None:
    for path in written:
        if path.is_file():
            path.unlink()
