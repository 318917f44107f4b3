"""The soft-label stage: run the teacher once, store its logits in shards, reload them as dense logits.

Two storage formats, one `.npz` shard per `shard_size` rows (`np.savez`, plain arrays, never pickle):

- `full`: `logits` (rows, C) fp16.
- `topk`: `values` (rows, k) fp16, `indices` (rows, k) int32, `tail_logit` (rows,) fp32. The classes outside
  the top k share the teacher's remaining probability mass uniformly:
  `tail_logit = logsumexp(logits[not top-k]) - log(C - k)`, i.e. `log((1 - sum_topk p) / (C - k)) + lse`,
  computed with a masked logsumexp instead of `1 - sum p` so it never cancels to log(0), and clamped to
  `lse - 80` so it stays finite (k = C leaves no tail). Reconstructed logits put `tail_logit` on every
  tail class: at T=1 the softmax of the reconstruction has exactly the teacher's top-k probabilities
  (up to fp16 rounding of the values) and a uniform tail with the right total mass; at other temperatures
  the tail is approximate because tempering a uniform tail is not tempering the true one.

`manifest.json` records the teacher and dataset hashes, format, k, class count and, per split, its shards
with their sha256. A shard is only reused when the manifest vouches for it, so an interrupted stage resumes
at shard granularity and a changed teacher, dataset or format starts over.

A stage split over workers (shard_plan.py) runs this with `shards=`: each task writes its shards and a part
file (`parts/<split>-<first>.json`: the same identity, its entries) instead of the manifest. Parts vouch
for shards as the manifest does, so the whole stage run afterwards reuses every shard, writes the manifest a
single run would have written, and removes the parts.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from worker.distill.errors import ConfigError, DatasetError, DistillError, MismatchError, describe_dim
from worker.distill.shard_plan import drop_parts, part_name, read_parts, shard_name

MANIFEST = "manifest.json"
_TAIL_FLOOR = 80.0  # exp(-80) ~ 1e-35: no probability mass, still a finite fp32 logit


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_files(paths: list[Path]) -> str:
    """One digest over several files (an ensemble teacher), order-sensitive like the ensemble."""
    if len(paths) == 1:
        return sha256_file(paths[0])
    return hashlib.sha256("".join(sha256_file(p) for p in paths).encode()).hexdigest()


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        return None
    manifest: dict[str, Any] = json.loads(path.read_text())  # written by this module: a JSON object
    return manifest


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, sort_keys=True)
    if path.is_file() and path.read_text() == text:
        return  # a resumed stage that changed nothing leaves the file (and its mirror) alone
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _encode(logits: torch.Tensor, fmt: str, k: int) -> dict[str, np.ndarray]:
    """logits (B, C) fp32 -> the arrays of one shard (see the module docstring)."""
    if fmt == "full":
        return {"logits": logits.to(torch.float16).cpu().numpy()}
    values, indices = logits.topk(k, dim=1)
    lse = torch.logsumexp(logits, dim=1)
    tail = logits.scatter(1, indices, float("-inf"))
    tail_lse = torch.logsumexp(tail, dim=1) - math.log(max(logits.shape[1] - k, 1))
    tail_logit = torch.maximum(tail_lse, lse - _TAIL_FLOOR)
    return {
        "values": values.to(torch.float16).cpu().numpy(),
        "indices": indices.to(torch.int32).cpu().numpy(),
        "tail_logit": tail_logit.to(torch.float32).cpu().numpy(),
    }


def _decode(arrays: Mapping[str, np.ndarray], num_classes: int) -> np.ndarray:
    if "logits" in arrays:
        return arrays["logits"].astype(np.float32)
    values, indices, tail = arrays["values"], arrays["indices"], arrays["tail_logit"]
    dense = np.repeat(tail.astype(np.float32)[:, None], num_classes, axis=1)
    np.put_along_axis(dense, indices.astype(np.int64), values.astype(np.float32), axis=1)
    return dense


@dataclass(frozen=True)
class SparseLogits:
    """Top-k soft labels kept as stored, for training: fp16 values and int32 class ids (N, k), the fp32 tail
    logit (N,). Indexing gives the rows' SparseLogits; `dense()` the (N, C) float32 logits, exactly what
    `load_soft_labels` reconstructs. A 1000-class teacher's labels at k 5 take 34 bytes a row, not 4,000."""

    values: torch.Tensor
    indices: torch.Tensor
    tail: torch.Tensor
    num_classes: int

    def __len__(self) -> int:
        return int(self.tail.shape[0])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.values, self.indices, self.tail))

    def __getitem__(self, index: torch.Tensor | slice) -> SparseLogits:
        return SparseLogits(self.values[index], self.indices[index], self.tail[index], self.num_classes)

    def to(self, device: torch.device | str) -> SparseLogits:
        return SparseLogits(
            self.values.to(device), self.indices.to(device), self.tail.to(device), self.num_classes
        )

    def dense(self) -> torch.Tensor:
        out = self.tail[:, None].expand(len(self), self.num_classes).clone()
        return out.scatter_(1, self.indices.long(), self.values.float())

    def argmax(self, dim: int = -1) -> torch.Tensor:
        return self.dense().argmax(dim)


def _shard_ok(out_dir: Path, entry: dict[str, Any], rows: int) -> bool:
    if entry.get("rows") != rows:
        return False
    path = out_dir / entry["name"]
    return path.exists() and sha256_file(path) == str(entry["sha256"])


LogitsFn = Callable[[torch.Tensor], torch.Tensor]


@runtime_checkable
class HasLogits(Protocol):
    """A `Teacher` (teachers.py), or anything else with its `logits` method."""

    def logits(self, x: torch.Tensor) -> torch.Tensor: ...


def _teacher_fn(teacher: HasLogits | LogitsFn) -> LogitsFn:
    """A `Teacher`'s checked path (a (batch, classes) output or a MismatchError), else its logits, else the
    callable as is."""
    checked: LogitsFn | None = getattr(teacher, "checked_logits", None)
    if checked is not None:
        return checked
    return teacher.logits if isinstance(teacher, HasLogits) else teacher


def _same_classes(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    # A teacher is the tenant's code and may change its output from batch to batch: say so in bounded words
    # instead of letting torch.cat quote both sizes.
    if logits.shape[1] != num_classes:
        raise MismatchError(
            f"the teacher returned {describe_dim(num_classes)} classes for the first row and "
            f"{describe_dim(logits.shape[1])} for a later batch; it must return the same classes for every "
            "row",
            field="teacher",
        )
    return logits


@runtime_checkable
class BatchSource(Protocol):
    """Rows read a batch at a time (image_stream.ImageStream): one tensor per list of rows, in order."""

    def __len__(self) -> int: ...

    def batches(self, lists: Sequence[range]) -> Iterator[torch.Tensor]: ...


def soft_label_stage(
    teacher: HasLogits | LogitsFn,
    x: np.ndarray | torch.Tensor | BatchSource,
    out_dir: Path,
    *,
    split: str = "train",
    fmt: str = "full",
    k: int = 5,
    shard_size: int = 8192,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
    y: np.ndarray | torch.Tensor | None = None,
    teacher_sha256: str | None = None,
    dataset_sha256: str | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    shards: range | None = None,
) -> dict[str, Any]:
    """Write `{split}-{i:05d}.npz` shards of the teacher's logits on `x` (N, *features); update the manifest.

    `teacher` is a `Teacher` (its `.logits`) or any callable (B, *features) -> (B, C) on the input as given
    (preprocessing is the caller's). `x` may also be a `BatchSource`: each shard's rows are then read as
    they are labelled, so the stage holds a few batches, never the split.
    `y` (N,) int with -1 for unlabelled rows gives the teacher's accuracy.
    Returns the whole manifest. `shards`: only these shards of the split (one task of a stage split over
    workers), vouched for by their part file, which is returned instead; the manifest is left alone.
    """
    if fmt not in ("full", "topk"):
        raise ConfigError(f"unknown soft-label format {fmt!r}; known: full, topk", field="soft_label_format")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    rows_of = _row_reader(x, batch_size)
    n = len(x)
    if n == 0:
        raise DatasetError(f"split {split!r} has no rows to label")
    logits_of = _teacher_fn(teacher)

    def run(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
            return logits_of(batch.to(device, non_blocking=True)).float()

    num_classes = int(run(next(rows_of(0, 1))).shape[1])
    k_eff = min(k, num_classes) if fmt == "topk" else None
    identity = {
        "teacher_sha256": teacher_sha256,
        "dataset_sha256": dataset_sha256,
        "format": fmt,
        "k": k_eff,
        "num_classes": num_classes,
        "shard_size": shard_size,
    }
    num_shards = max(1, math.ceil(n / shard_size))
    todo = range(num_shards) if shards is None else shards
    if not todo or todo.start < 0 or todo.stop > num_shards or todo.step != 1:
        raise DistillError(
            f"shards {todo.start}-{todo.stop} are not shards of split {split!r} ({num_shards} shards)",
            code="bad_shard_range",
        )
    vouched = _vouched(out_dir, identity, split, n)
    entries: list[dict[str, Any]] = []
    manifest: dict[str, Any] = {}
    if shards is None:
        manifest = read_manifest(out_dir) or {}
        if any(manifest.get(key) != value for key, value in identity.items()):
            manifest = {**identity, "splits": {}}  # different inputs: nothing on disk can be trusted
        manifest["splits"][split] = {"rows": n, "shards": entries, "complete": False}
        record, record_path = manifest, out_dir / MANIFEST
    else:
        record = {**identity, "split": split, "rows": n, "shards": entries}
        record_path = out_dir / part_name(split, todo.start)
        record_path.parent.mkdir(exist_ok=True)

    for done, i in enumerate(todo, 1):
        lo, hi = i * shard_size, min(n, (i + 1) * shard_size)
        name = shard_name(split, i)
        entry = vouched.get(name)
        reused = entry is not None and _shard_ok(out_dir, entry, hi - lo)
        if entry is None or not reused:
            parts = [_same_classes(run(batch), num_classes) for batch in rows_of(lo, hi)]
            entry = _write_shard(out_dir, name, _encode(torch.cat(parts), fmt, k_eff or 0), hi - lo)
            entries.append(entry)
            _write_json_atomic(record_path, record)  # the shard is vouched for once it is complete
        else:
            entries.append(entry)
        if on_progress:
            on_progress(
                {
                    "stage": "soft_label",
                    "progress": done / len(todo),
                    "epoch": None,
                    # `reused`: the shard was already there (a resumed stage, or another job's soft labels)
                    "metrics": {"split": split, "shard": i, "rows": hi, "reused": reused},
                }
            )
    if shards is not None:
        _write_json_atomic(record_path, record)
        return record

    info = manifest["splits"][split]
    info["complete"] = True
    kept = {e["name"] for e in entries}
    for stale in out_dir.glob(f"{split}-*.npz"):  # left by an earlier, longer run: never mirrored or read
        if stale.name not in kept:
            stale.unlink()
    if y is not None and bool((np.asarray(y) >= 0).any()):
        info["teacher_accuracy"] = _teacher_accuracy(out_dir, split, manifest, np.asarray(y))
    _write_json_atomic(out_dir / MANIFEST, manifest)
    drop_parts(out_dir, split)
    return manifest


def _row_reader(
    x: np.ndarray | torch.Tensor | BatchSource, batch_size: int
) -> Callable[[int, int], Iterator[torch.Tensor]]:
    """rows [lo, hi) of `x`, as batches of at most `batch_size`."""
    if isinstance(x, BatchSource) and not isinstance(x, (np.ndarray, torch.Tensor)):
        source = x

        def read(lo: int, hi: int) -> Iterator[torch.Tensor]:
            return source.batches([range(s, min(hi, s + batch_size)) for s in range(lo, hi, batch_size)])

        return read
    x_t = torch.as_tensor(x)
    x_t = x_t if x_t.dtype == torch.int64 else x_t.float()  # int64: token ids of a text classifier

    def cut(lo: int, hi: int) -> Iterator[torch.Tensor]:
        return (x_t[s : min(hi, s + batch_size)] for s in range(lo, hi, batch_size))

    return cut


def _vouched(out_dir: Path, identity: dict[str, Any], split: str, rows: int) -> dict[str, dict[str, Any]]:
    """Every shard of `split` that a record on disk vouches for, by name: the manifest's, and those of the
    parts that tasks of a split stage wrote; each record only if it was written for the same inputs and
    settings (`identity`) and as many rows. `_shard_ok` still checks each file against its sha256."""
    manifest = read_manifest(out_dir) or {}
    records = [{**manifest, **manifest.get("splits", {}).get(split, {})}, *read_parts(out_dir, split)]
    vouched: dict[str, dict[str, Any]] = {}
    for record in records:
        if record.get("rows") == rows and all(record.get(k) == v for k, v in identity.items()):
            vouched.update((entry["name"], entry) for entry in record.get("shards", []))
    return vouched



def _write_shard(out_dir: Path, name: str, arrays: dict[str, np.ndarray], rows: int) -> dict[str, Any]:
    """One shard file, written whole or not at all; its manifest entry."""
    tmp = out_dir / f".{name}.tmp"
    with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a path
        np.savez(f, allow_pickle=False, **arrays)
    os.replace(tmp, out_dir / name)
    return {"name": name, "rows": rows, "sha256": sha256_file(out_dir / name)}


def _teacher_accuracy(out_dir: Path, split: str, manifest: dict[str, Any], y: np.ndarray) -> float:
    """Top-1 accuracy of the stored logits on the labelled rows of `split` (label -1: unlabelled)."""
    labelled = y >= 0
    pred = load_soft_labels(out_dir, split, manifest=manifest).argmax(1).numpy()
    return float((pred[labelled] == y[labelled]).mean())


def load_sparse_soft_labels(
    out_dir: Path, split: str, *, manifest: dict[str, Any] | None = None
) -> SparseLogits | torch.Tensor:
    """The stored logits of `split` as stored: top-k shards as SparseLogits, full ones dense (N, C)."""
    out_dir = Path(out_dir)
    manifest = manifest or read_manifest(out_dir) or {}
    if manifest.get("format") != "topk":
        return load_soft_labels(out_dir, split, manifest=manifest)
    info = _complete_split(out_dir, split, manifest)
    parts: dict[str, list[np.ndarray]] = {"values": [], "indices": [], "tail_logit": []}
    for entry in info["shards"]:
        with np.load(out_dir / entry["name"], allow_pickle=False) as arrays:
            for key, found in parts.items():
                found.append(arrays[key])
    values, indices, tail = (np.concatenate(parts[key]) for key in ("values", "indices", "tail_logit"))
    if len(tail) != info["rows"]:
        raise DistillError(
            f"soft labels for {split!r} have {len(tail)} rows, manifest says {info['rows']}",
            code="corrupt_soft_labels",
        )
    return SparseLogits(
        torch.from_numpy(values),
        torch.from_numpy(indices),
        torch.from_numpy(tail.astype(np.float32)),
        int(manifest["num_classes"]),
    )


def _complete_split(out_dir: Path, split: str, manifest: dict[str, Any]) -> dict[str, Any]:
    info: dict[str, Any] | None = manifest.get("splits", {}).get(split)
    if info is None or not info.get("complete"):
        raise DistillError(
            f"no complete soft labels for split {split!r} in {out_dir}", code="missing_soft_labels"
        )
    return info


def load_soft_labels(out_dir: Path, split: str, *, manifest: dict[str, Any] | None = None) -> torch.Tensor:
    """The stored logits of `split` as a dense (N, C) float32 tensor (top-k shards reconstructed)."""
    out_dir = Path(out_dir)
    manifest = manifest or read_manifest(out_dir) or {}
    info = _complete_split(out_dir, split, manifest)
    parts = []
    for entry in info["shards"]:
        with np.load(out_dir / entry["name"], allow_pickle=False) as arrays:
            parts.append(_decode(arrays, manifest["num_classes"]))
    dense = np.concatenate(parts) if parts else np.zeros((0, manifest["num_classes"]), np.float32)
    if dense.shape[0] != info["rows"]:
        raise DistillError(
            f"soft labels for {split!r} have {dense.shape[0]} rows, manifest says {info['rows']}",
            code="corrupt_soft_labels",
        )
    return torch.from_numpy(dense)
