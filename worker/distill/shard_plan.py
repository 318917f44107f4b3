"""How the soft-label stage of a large dataset splits into tasks for several workers, and the names of the
files it writes. Plain Python (no torch): the worker's parent process plans with it, the stage child writes.

A task is a row range of one split made of whole shards (`shard_size` rows each, the last one shorter), so a
task writes exactly the shard files, byte for byte, that one run of the whole stage writes for those rows,
and a part file vouching for them (`parts/<split>-<first shard>.json`, softlabels.py). The whole stage run
afterwards finds every shard vouched for, writes the manifest and removes the parts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SPLITS = ("train", "val")
PARTS = "parts"
MAX_TASKS = 1024  # past this, tasks grow instead: one row per task each in the database and the queue


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.npz"


def part_name(split: str, first: int) -> str:
    """The part file of the task whose first shard is `first`, relative to the soft-label folder."""
    return f"{PARTS}/{split}-{first:05d}.json"


def needs_tasks(rows: Mapping[str, int], task_rows: int) -> bool:
    """Whether a stage over `rows` (per split) is split into tasks of about `task_rows` rows; 0: never."""
    return task_rows > 0 and sum(rows.values()) > task_rows


def task_ranges(rows: Mapping[str, int], shard_size: int, task_rows: int) -> list[tuple[str, int, int]]:
    """`(split, start, end)` row ranges, train first, each of whole shards and at least one shard: about
    `task_rows` rows per task, never more than about MAX_TASKS tasks, never across two splits."""
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    shards = {split: math.ceil(rows[split] / shard_size) for split in SPLITS if rows.get(split, 0) > 0}
    per_task = max(1, task_rows // shard_size, math.ceil(sum(shards.values()) / MAX_TASKS))
    return [
        (split, first * shard_size, min(rows[split], (first + per_task) * shard_size))
        for split, count in shards.items()
        for first in range(0, count, per_task)
    ]


def shard_indices(start: int, end: int, shard_size: int) -> range:
    """The shards covering rows [start, end) of a range `task_ranges` made."""
    if start < 0 or end <= start or start % shard_size:
        raise ValueError(f"rows {start}-{end} are not a range of whole shards of {shard_size} rows")
    return range(start // shard_size, math.ceil(end / shard_size))


def read_parts(out_dir: Path, split: str) -> list[dict[str, Any]]:
    """The part files the tasks of a split stage wrote for `split`, in shard order; a damaged one vouches
    for nothing (its shards are labelled again)."""
    parts = []
    for path in sorted((Path(out_dir) / PARTS).glob(f"{split}-*.json")):
        try:
            part = json.loads(path.read_text())
        except ValueError:
            continue
        if isinstance(part, dict):
            parts.append(part)
    return parts


def drop_parts(out_dir: Path, split: str) -> None:
    """The manifest vouches for the whole split now: its parts go (and their folder, once empty)."""
    folder = Path(out_dir) / PARTS
    for path in folder.glob(f"{split}-*.json"):
        path.unlink()
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
