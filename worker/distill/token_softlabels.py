"""The soft-label stage for causal LMs: the teacher runs once over token windows; sparse targets go to shards.

Per window position, `SparseTargets` (token_targets.py) for the next token: `topk` (k ids, fp16 log-probs,
fp16 tail) or `sampled` (k draws with their count / k). Only one batch's logits (B, L, V) exist at a time:
each batch is turned into its (B, L, k) targets and its teacher statistics inside one function call, so the
logits are freed before the next batch runs. Every row position is stored (pads and prompts included, with
whatever the teacher said there) so a shard is rectangular and a batch of rows is one slice; `loss_mask`
says which count.

Shards are `{split}-{i:05d}.npz`, `shard_rows` rows each: the arrays of `SparseTargets.to_arrays()` plus
`row_start` / `row_end`, written as a zip with fixed timestamps, so the same targets give the same bytes.
`manifest.json` follows the classification stage (softlabels.py): an identity (teacher and dataset hashes,
format, k, temperature, seed, max_length, shard_rows) that, when changed, discards everything; per split the
rows, a digest of the windows themselves, and each shard with its sha256, so an interrupted stage resumes at
shard granularity and a tampered shard is recomputed. `sampled` seeds a generator per shard (seed + shard
index), so a recomputed shard is byte-identical to the first.

A stage split over workers (shard_plan.py, as for classification in softlabels.py) runs this with `shards=`:
each task writes its shards and a part file (`parts/<split>-<first>.json`: the identity, the split's rows
and windows digest, the vocabulary, its entries) instead of the manifest. The whole stage run afterwards
finds every shard vouched for by a part, runs no teacher, writes the manifest a single run would have
written, and removes the parts.

The manifest also records, per split, the teacher's own next-token statistics over the `loss_mask`
positions, taken from the full logits (T = 1) as they pass: mean NLL, perplexity, top-1 accuracy, and for
`topk` the mean teacher mass the stored ids cover (at the stored temperature); plus bytes per stored token.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from worker.distill.errors import ConfigError, DatasetError, DistillError, MismatchError, describe_shape
from worker.distill.shard_plan import drop_parts, part_name, read_parts, shard_name
from worker.distill.text_data import TokenData
from worker.distill.token_targets import KINDS, SparseTargets, sampled_targets, topk_targets

MANIFEST = "manifest.json"
KIND = "causal_lm_token_targets"
LogitsFn = Callable[[Tensor, Tensor], Tensor]  # (input_ids (B, L), attention_mask (B, L)) -> (B, L, V)
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed, so a shard's bytes depend on its arrays alone


def token_soft_label_stage(
    teacher_logits_fn: LogitsFn,
    data: TokenData,
    out_dir: Path,
    *,
    split: str = "train",
    fmt: str = "topk",
    k: int = 64,
    temperature: float = 1.0,
    shard_rows: int = 256,
    batch_size: int = 8,
    seed: int = 0,
    teacher_sha256: str | None = None,
    dataset_sha256: str | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    shards: range | None = None,
) -> dict[str, Any]:
    """Write the shards of `split` (see the module docstring); update and return the whole manifest.

    `teacher_logits_fn`: `LMTeacher.logits` or any callable (input_ids int64 (B, L), attention_mask bool
    (B, L)) -> logits (B, L, V) on any device. Rows are passed `batch_size` at a time. `shards`: only these
    shards of the split (one task of a stage split over workers), vouched for by their part file, which is
    returned instead; the manifest is left alone.
    """
    if fmt not in KINDS:
        raise ConfigError(
            f"unknown soft-label format {fmt!r}; known: {', '.join(KINDS)}", field="soft_label_format"
        )
    if shard_rows < 1 or batch_size < 1:
        raise ConfigError(f"shard_rows and batch_size must be positive, got {shard_rows}, {batch_size}")
    windows = data.split(split)
    ids, attn, loss = windows.input_ids, windows.attention_mask, windows.loss_mask
    n = int(ids.shape[0])
    if n == 0:
        raise DatasetError(f"split {split!r} has no rows to label", code="empty_dataset", field="dataset")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    identity = {
        "kind": KIND,
        "teacher_sha256": teacher_sha256,
        "dataset_sha256": dataset_sha256,
        "format": fmt,
        "k": k,
        "temperature": float(temperature),
        "seed": seed,
        "max_length": data.max_length,
        "shard_rows": shard_rows,
    }
    digest = _windows_digest(ids, attn, loss)
    num_shards = math.ceil(n / shard_rows)
    todo = range(num_shards) if shards is None else shards
    if not todo or todo.start < 0 or todo.stop > num_shards or todo.step != 1:
        raise DistillError(
            f"shards {todo.start}-{todo.stop} are not shards of split {split!r} ({num_shards} shards)",
            code="bad_shard_range",
        )
    manifest = read_manifest(out_dir)
    if manifest is None or any(manifest.get(key) != value for key, value in identity.items()):
        manifest = {**identity, "vocab_size": None, "splits": {}}  # different inputs: nothing on disk counts
    vouched, vocab_seen = _vouched(out_dir, manifest, identity, split, n, digest)
    entries: list[dict[str, Any]] = []
    info: dict[str, Any] = {"rows": n, "data_sha256": digest, "shards": entries, "complete": False}
    if shards is None:
        manifest["splits"][split] = info
        manifest["vocab_size"] = manifest["vocab_size"] or vocab_seen
        record, record_path = manifest, out_dir / MANIFEST
    else:
        record = {**identity, "vocab_size": vocab_seen, "split": split, "rows": n, "data_sha256": digest}
        record["shards"] = entries
        record_path = out_dir / part_name(split, todo.start)
        record_path.parent.mkdir(exist_ok=True)

    for done, i in enumerate(todo, 1):
        lo, hi = i * shard_rows, min(n, (i + 1) * shard_rows)
        name = shard_name(split, i)
        entry = vouched.get(name)
        if entry is None or not _shard_ok(out_dir, entry, lo, hi):
            targets, stats, vocab = _label_rows(
                teacher_logits_fn, ids, attn, loss, lo, hi, batch_size, fmt, k, temperature, seed + i
            )
            if record["vocab_size"] not in (None, vocab):
                raise MismatchError(
                    f"the teacher returned {vocab} logits per token; the stored soft labels have "
                    f"{record['vocab_size']}: pass teacher_sha256 so a changed teacher starts over",
                    field="teacher",
                )
            record["vocab_size"] = vocab
            entry = _write_shard(out_dir, name, targets, lo, hi) | {"stats": stats}
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
                    "metrics": {"split": split, "shard": i, "rows": hi},
                }
            )
    if shards is not None:
        _write_json_atomic(record_path, record)
        return record

    shards_done = entries
    info.update(_summary(shards_done, fmt))
    info["complete"] = True
    kept = {e["name"] for e in shards_done}
    for stale in out_dir.glob(f"{split}-*.npz"):  # left by an earlier, longer run: never read
        if stale.name not in kept:
            stale.unlink()
    _write_json_atomic(out_dir / MANIFEST, manifest)
    drop_parts(out_dir, split)
    return manifest


def _vouched(
    out_dir: Path, manifest: dict[str, Any], identity: dict[str, Any], split: str, rows: int, digest: str
) -> tuple[dict[str, dict[str, Any]], int | None]:
    """Every shard of `split` a record on disk vouches for, by name, and the vocabulary they were made with:
    the manifest's (already checked against `identity`) and the parts that tasks of a split stage wrote,
    each only if made for the same inputs, settings and windows. `_shard_ok` still checks each file."""
    records = [{**manifest, **manifest.get("splits", {}).get(split, {})}, *read_parts(out_dir, split)]
    vouched: dict[str, dict[str, Any]] = {}
    vocab: int | None = None
    for record in records:
        same = all(record.get(key) == value for key, value in identity.items())
        if same and record.get("rows") == rows and record.get("data_sha256") == digest:
            vouched.update((entry["name"], entry) for entry in record.get("shards", []))
            vocab = vocab or record.get("vocab_size")
    return vouched, vocab



def _label_rows(
    fn: LogitsFn,
    ids: Tensor,
    attn: Tensor,
    loss: Tensor,
    lo: int,
    hi: int,
    batch_size: int,
    fmt: str,
    k: int,
    temperature: float,
    generator_seed: int,
) -> tuple[SparseTargets, dict[str, Any], int]:
    """One shard's targets (rows lo..hi), its teacher statistics and the vocabulary size."""
    parts: list[SparseTargets] = []
    totals: dict[str, Any] = {"nll_sum": 0.0, "correct": 0, "tokens": 0}
    if fmt == "topk":
        totals["covered_mass_sum"] = 0.0
    generators: dict[torch.device, torch.Generator] = {}
    vocab = 0
    for start in range(lo, hi, batch_size):
        end = min(hi, start + batch_size)
        targets, stats, vocab = _label_batch(
            fn,
            ids[start:end],
            attn[start:end],
            loss[start:end],
            fmt,
            k,
            temperature,
            generators,
            generator_seed,
        )
        parts.append(targets)
        for key, value in stats.items():
            totals[key] += value
    return _concat(parts), totals, vocab


def _label_batch(
    fn: LogitsFn,
    ids: Tensor,
    attn: Tensor,
    loss: Tensor,
    fmt: str,
    k: int,
    temperature: float,
    generators: dict[torch.device, torch.Generator],
    generator_seed: int,
) -> tuple[SparseTargets, dict[str, Any], int]:
    """Targets on the CPU and statistics of one batch; its logits die when this returns."""
    logits = fn(ids.long(), attn)
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(ids.shape):
        raise MismatchError(
            f"the teacher returned logits {describe_shape(logits)} for input_ids {describe_shape(ids)}; "
            "expected (batch, length, vocabulary)",
            field="teacher",
        )
    if fmt == "topk":
        targets = topk_targets(logits, k, temperature)
    else:
        if logits.device not in generators:  # one stream per shard, on the logits' device
            generators[logits.device] = torch.Generator(logits.device).manual_seed(generator_seed)
        targets = sampled_targets(logits, k, generators[logits.device], temperature)
    with torch.no_grad():
        mask = loss[:, :-1].to(logits.device)
        following = ids[:, 1:].to(logits.device, torch.long)
        shifted = logits[:, :-1]
        lse = torch.logsumexp(shifted.float(), dim=-1)
        picked = shifted.gather(-1, following.unsqueeze(-1)).squeeze(-1).float()
        stats: dict[str, Any] = {
            "nll_sum": float((lse - picked)[mask].double().sum()),
            "correct": int((shifted.argmax(-1) == following)[mask].sum()),
            "tokens": int(mask.sum()),
        }
        if targets.tail is not None:
            stats["covered_mass_sum"] = float(targets.covered_mass()[:, :-1][mask].double().sum())
    return targets.to("cpu"), stats, int(logits.shape[-1])


def _concat(parts: list[SparseTargets]) -> SparseTargets:
    tail = None if parts[0].tail is None else torch.cat([p.tail for p in parts if p.tail is not None])
    return SparseTargets(
        torch.cat([p.ids for p in parts]),
        torch.cat([p.values for p in parts]),
        parts[0].kind,
        tail,
        parts[0].temperature,
    )


def _summary(shards: list[dict[str, Any]], fmt: str) -> dict[str, Any]:
    """The split's teacher statistics and storage cost, from its shards' entries (resumed or not)."""
    tokens = sum(e["stats"]["tokens"] for e in shards)
    stored = sum(e["bytes"] for e in shards)
    summary: dict[str, Any] = {
        "loss_tokens": tokens,
        "stored_bytes": stored,
        "bytes_per_token": shards[0]["bytes_per_token"],
        "teacher_nll": None,
        "teacher_perplexity": None,
        "teacher_accuracy": None,
        "covered_mass": None,
    }
    if tokens:
        nll = sum(e["stats"]["nll_sum"] for e in shards) / tokens
        summary["teacher_nll"] = nll
        summary["teacher_perplexity"] = math.exp(min(nll, 700.0))
        summary["teacher_accuracy"] = sum(e["stats"]["correct"] for e in shards) / tokens
        if fmt == "topk":
            summary["covered_mass"] = sum(e["stats"]["covered_mass_sum"] for e in shards) / tokens
    return summary


def _windows_digest(ids: Tensor, attn: Tensor, loss: Tensor) -> str:
    h = hashlib.sha256(repr(tuple(ids.shape)).encode())
    for t in (ids, attn, loss):
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def _write_shard(out_dir: Path, name: str, targets: SparseTargets, lo: int, hi: int) -> dict[str, Any]:
    """One shard file, written whole or not at all, with fixed zip timestamps; its manifest entry."""
    arrays = targets.to_arrays() | {"row_start": np.array(lo, np.int64), "row_end": np.array(hi, np.int64)}
    tmp = out_dir / f".{name}.tmp"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for key in sorted(arrays):
            with zf.open(zipfile.ZipInfo(f"{key}.npy", _ZIP_TIME), "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asarray(arrays[key], order="C"), allow_pickle=False)
    os.replace(tmp, out_dir / name)
    path = out_dir / name
    return {
        "name": name,
        "rows": hi - lo,
        "row_start": lo,
        "row_end": hi,
        "sha256": _sha256(path),
        "bytes": path.stat().st_size,
        "bytes_per_token": targets.nbytes_per_token(),
    }


def _shard_ok(out_dir: Path, entry: dict[str, Any], lo: int, hi: int) -> bool:
    if (entry.get("row_start"), entry.get("row_end")) != (lo, hi) or "stats" not in entry:
        return False
    path = out_dir / entry["name"]
    return path.is_file() and _sha256(path) == entry.get("sha256")


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except ValueError:
        return None  # a damaged manifest vouches for nothing: the stage starts over
    return manifest if isinstance(manifest, dict) else None


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    text = json.dumps(data, indent=2, sort_keys=True)
    if path.is_file() and path.read_text() == text:
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class TokenTargetReader:
    """Rows of a complete split's stored targets, read from the shards they lie in; the `cache_shards` most
    recently read shards stay in memory, so batches of nearby (or, with a large enough cache, any) rows do
    not read a shard twice."""

    def __init__(self, out_dir: Path, split: str, *, cache_shards: int = 4) -> None:
        self.out_dir = Path(out_dir)
        manifest = read_manifest(self.out_dir) or {}
        info = manifest.get("splits", {}).get(split)
        if manifest.get("kind") != KIND or info is None or not info.get("complete"):
            raise DistillError(
                f"no complete token soft labels for split {split!r} in {self.out_dir.name}",
                code="missing_soft_labels",
            )
        self.vocab_size: int = manifest["vocab_size"]
        self.rows: int = info["rows"]
        self.shard_rows: int = manifest["shard_rows"]
        self.shards: list[dict[str, Any]] = info["shards"]
        self.cache_shards = max(1, cache_shards)
        self._cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()

    def __len__(self) -> int:
        return self.rows

    def get(self, rows: slice | None = None) -> SparseTargets:
        """Targets (R, L, k) for `rows` (a step-1 slice, clipped like a list's; None: all rows)."""
        start, stop, step = (rows or slice(None)).indices(self.rows)
        if step != 1:
            raise ValueError(f"rows must be a contiguous slice, got step {step}")
        return self.take(torch.arange(start, max(start, stop)))

    def take(self, indices: Tensor) -> SparseTargets:
        """Targets (B, L, k) of the rows `indices` (B,) int, in that order (a shuffled batch)."""
        index = indices.to("cpu", torch.long).numpy()
        if index.size and (index.min() < 0 or index.max() >= self.rows):
            raise IndexError(f"rows must lie in [0, {self.rows})")
        shard_of = index // self.shard_rows
        order = np.argsort(shard_of, kind="stable")
        parts, positions = [], []
        for shard in np.unique(shard_of) if index.size else np.zeros(1, np.int64):
            chosen = order[shard_of[order] == shard]
            arrays = self._arrays(int(shard))
            local = index[chosen] - int(shard) * self.shard_rows
            parts.append({key: v[local] if v.ndim else v for key, v in arrays.items()})
            positions.append(chosen)
        merged = {
            key: np.concatenate([p[key] for p in parts]) if parts[0][key].ndim else parts[0][key]
            for key in parts[0]
        }
        restore = np.argsort(np.concatenate(positions), kind="stable")  # back to the order asked for
        merged = {key: v[restore] if v.ndim else v for key, v in merged.items()}
        try:
            return SparseTargets.from_arrays(merged, self.vocab_size)
        except ValueError as exc:
            raise DistillError(
                f"stored token soft labels are damaged: {exc}", code="corrupt_soft_labels"
            ) from None

    def _arrays(self, shard: int) -> dict[str, np.ndarray]:
        if shard in self._cache:
            self._cache.move_to_end(shard)
            return self._cache[shard]
        entry = self.shards[shard]
        with np.load(self.out_dir / entry["name"], allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
        lo, hi = int(arrays.pop("row_start")), int(arrays.pop("row_end"))
        if (lo, hi) != (entry["row_start"], entry["row_end"]) or len(arrays["ids"]) != hi - lo:
            raise DistillError(f"shard {entry['name']} does not hold its rows", code="corrupt_soft_labels")
        self._cache[shard] = arrays
        while len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return arrays


def load_token_targets(out_dir: Path, split: str, rows: slice | None = None) -> SparseTargets:
    """The stored targets of `rows` of `split` (all rows when None), reading only the shards they span."""
    return TokenTargetReader(out_dir, split).get(rows)
