"""What the bubblewrap sandbox costs a stage: the demo's job through the stage supervisor, with and without.

    python -m bench.sandbox              # the demo's data (Fashion-MNIST, 20k rows), teacher, student, config
    python -m bench.sandbox --repeats 5

Each repeat runs the two stages a job runs (preflight + soft labels; distill + evaluate + export) on a fresh
copy of the job's inputs, once confined (`Sandbox("bwrap")`) and once not (`Sandbox("off")`), interleaved so
both see the same machine load; plus an empty stage (interpreter start and the project's imports only), the
part the sandbox can slow. Target: under 1 s of overhead per stage (median of the repeats).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.commands.demo import load_demo_data, train_teacher
from worker.sandbox import Sandbox
from worker.supervisor import run_steps
from worker.tasks import steps

MODES = {"bwrap": Sandbox("bwrap"), "off": Sandbox("off")}
STAGES = {"empty": [], "soft_label": steps.SOFT_LABEL_STEPS, "distill": steps.DISTILL_STEPS}


def job_inputs(folder: Path) -> dict[str, Any]:
    data = load_demo_data(20000)
    torch.set_num_threads(1)
    teacher = train_teacher(data, 3)
    (folder / "inputs" / "teacher").mkdir(parents=True)
    (folder / "inputs" / "dataset").mkdir(parents=True)
    torch.jit.save(teacher, folder / "inputs" / "teacher" / "teacher.pt")
    np.savez(
        folder / "inputs" / "dataset" / "dataset.npz", x=data.x, y=data.y, x_val=data.x_val, y_val=data.y_val
    )
    # The demo's config with the method fixed, so every run does the same arithmetic (no search).
    return {
        **data.job_config,
        "preprocess": data.preprocess,
        "student": data.student,
        "method": "hinton",
        "temperature": 2.0,
        "alpha": 0.5,
    }


def timed(stage: str, work: Path, config: dict[str, Any], sandbox: Sandbox) -> float:
    started = time.perf_counter()
    run_steps(
        STAGES[stage], work, config, sandbox=sandbox, on_message=lambda _: None, should_stop=lambda: None
    )
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="distill-bench-sandbox-", dir="/var/tmp"))
    try:
        source = root / "source"
        config = job_inputs(source)
        seconds: dict[tuple[str, str], list[tuple[float, float]]] = {
            (s, m): [] for s in STAGES for m in MODES
        }
        for repeat in range(args.repeats):
            for mode, sandbox in MODES.items() if repeat % 2 == 0 else reversed(MODES.items()):
                work = root / f"work-{mode}-{repeat}"
                shutil.copytree(source, work)
                for stage in STAGES:  # soft labels before distill, as in a job
                    seconds[(stage, mode)].append(timed(stage, work, config, sandbox))
                shutil.rmtree(work)
        # Wall seconds, median of the repeats (CPU time cannot be read through bwrap's PID namespace: its
        # init reaps the child, so the child's usage never reaches this process's RUSAGE_CHILDREN).
        print(f"{'stage':<12}{'bwrap s':>10}{'off s':>10}{'overhead s':>12}  target < 1 s a stage")
        for stage in STAGES:
            confined = statistics.median(seconds[(stage, "bwrap")])
            unconfined = statistics.median(seconds[(stage, "off")])
            verdict = "PASS" if confined - unconfined < 1.0 else "FAIL"
            print(f"{stage:<12}{confined:>10.2f}{unconfined:>10.2f}{confined - unconfined:>12.2f}  {verdict}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
