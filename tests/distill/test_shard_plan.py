"""How a large soft-label stage is cut into tasks: whole shards, every row once, never across splits, a
bounded number of tasks."""

from __future__ import annotations

import pytest

from worker.distill.shard_plan import MAX_TASKS, needs_tasks, shard_indices, task_ranges


def test_tasks_are_whole_shards_covering_every_row_once_and_never_two_splits():
    rows = {"train": 1030, "val": 120}
    ranges = task_ranges(rows, shard_size=100, task_rows=350)
    assert ranges == [
        ("train", 0, 300), ("train", 300, 600), ("train", 600, 900), ("train", 900, 1030), ("val", 0, 120)
    ]  # fmt: skip
    train = [i for split, start, end in ranges if split == "train" for i in shard_indices(start, end, 100)]
    assert train == list(range(11))  # the 11 shards of a single run, each in exactly one task
    assert needs_tasks(rows, 350) and not needs_tasks(rows, 1150) and not needs_tasks(rows, 0)


def test_a_task_is_at_least_one_shard_and_the_number_of_tasks_stays_bounded():
    assert task_ranges({"train": 250}, shard_size=100, task_rows=10) == [
        ("train", 0, 100), ("train", 100, 200), ("train", 200, 250)
    ]  # fmt: skip
    huge = task_ranges({"train": 10**9, "val": 10**7}, shard_size=1000, task_rows=1000)
    assert len(huge) <= MAX_TASKS + 1 and sum(end - start for _, start, end in huge) == 10**9 + 10**7


def test_a_range_that_is_not_whole_shards_is_refused():
    with pytest.raises(ValueError):
        shard_indices(50, 200, 100)
