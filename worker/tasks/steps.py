"""The steps a task runs in its child process: the core's pipeline stages, called with a plain config dict.

Module-level functions, because the spawned child imports them by name. Imports of the core happen inside,
so the worker's parent process never loads torch. Results go back as JSON.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

OnProgress = Callable[[dict[str, Any]], None]


# What the task adds to a job's config for the steps of a soft-label stage that may be split over workers
# (never part of the job's settings): the rows past which it is split, and one task's rows.
SHARD_TASK_ROWS = "_shard_task_rows"
SHARD_ROWS = "_shard_rows"  # {"split": str, "start": int, "end": int}
SPLIT_ROWS = "split_rows"  # the soft_label step's answer when the stage is to be split: rows per split


def _settings(config: dict[str, Any]) -> dict[str, Any]:
    """The job's settings, without what a task adds for its steps."""
    return {k: v for k, v in config.items() if k not in (SHARD_TASK_ROWS, SHARD_ROWS)}


def _config(config: dict[str, Any]) -> Any:
    from worker.distill.config import DistillConfig

    return DistillConfig.from_dict(_settings(config))


def preflight_step(work: Path, config: dict[str, Any], on_progress: OnProgress) -> Any:
    from worker.distill import pipeline

    return pipeline.preflight(work, _config(config))


def soft_label_step(work: Path, config: dict[str, Any], on_progress: OnProgress) -> Any:
    """The whole stage; or, past `SHARD_TASK_ROWS` rows, no labels but `{SPLIT_ROWS: rows per split}`, for
    the task to split the stage over workers (`worker.tasks.shards`)."""
    from worker.distill import pipeline
    from worker.distill.shard_plan import needs_tasks

    distill_config = _config(config)
    task_rows = int(config.get(SHARD_TASK_ROWS) or 0)
    if task_rows:
        rows = pipeline.split_rows(work, distill_config)
        if needs_tasks(rows, task_rows):
            return {SPLIT_ROWS: rows}
    return pipeline.soft_label(work, distill_config, on_progress)


def assemble_soft_labels_step(work: Path, config: dict[str, Any], on_progress: OnProgress) -> Any:
    """The end of a split stage: every shard is vouched for by a part, so the whole stage runs no teacher
    and writes the manifest. No progress: the job's shows its shards, all done."""
    from worker.distill import pipeline

    return pipeline.soft_label(work, _config(config))


def soft_label_rows_step(work: Path, config: dict[str, Any], on_progress: OnProgress) -> Any:
    """One shard task of a split stage: the shards of the rows `config[SHARD_ROWS]` names, and their part."""
    from worker.distill import pipeline

    rows = config[SHARD_ROWS]
    start, end = int(rows["start"]), int(rows["end"])
    return pipeline.soft_label_rows(work, _config(config), str(rows["split"]), start, end, on_progress)


def distill_step(work: Path, config: dict[str, Any], on_progress: OnProgress) -> Any:
    from worker.distill import pipeline
    from worker.distill.train import Stopped
    from worker.stage_child import granted_procs

    # The parent stops a child with SIGTERM (cancel, timeout, shutdown). While training, that becomes the
    # train loop's `stop`: the run ends at its next check with the last epoch checkpointed, instead of dying
    # at a random instruction. The parent still SIGKILLs after its grace; checkpoints are written atomically.
    # Data-parallel (the worker's --procs): this process is rank 0, which polls `stop` for every rank.
    requested: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: requested.append(signum))
    try:
        return pipeline.distill(
            work, _config(config), on_progress, stop=lambda: bool(requested), procs=granted_procs()
        )
    except Stopped:
        raise SystemExit(0) from None  # no result and no "done": the parent already knows why it stopped
    finally:
        signal.signal(signal.SIGTERM, previous)


def evaluate_step(work: Path, config: dict[str, Any], on_progress: OnProgress) -> Any:
    from worker.distill import pipeline

    return pipeline.evaluate(work, _config(config))


def export_step(work: Path, config: dict[str, Any], on_progress: OnProgress) -> list[str]:
    from worker.distill import pipeline

    return [Path(p).name for p in pipeline.export(work, _config(config))]


def partial_student_step(work: Path, config: dict[str, Any], on_progress: OnProgress) -> str | None:
    """Write the newest verified student weights to partial/partial_student.pt; its name, or None if the
    run never finished an epoch. Prefers the finished distilled student, then fine-tuning, then distilling.
    A causal LM's is a Hugging Face folder, partial/partial_student_hf.tar.gz."""
    if config.get("task") == "causal_lm":
        from worker.distill import lm_pipeline

        archive = lm_pipeline.lm_partial_student(work, _lm_config(config))
        return None if archive is None else archive.name
    import torch

    from worker.distill.checkpoints import load_latest_checkpoint

    ckpt = Path(work) / "checkpoints"
    state = None
    if (ckpt / "student.pt").is_file():
        state = torch.load(ckpt / "student.pt", map_location="cpu", weights_only=True)
    else:
        for folder in (ckpt / "finetune", ckpt):
            checkpoint = load_latest_checkpoint(folder)
            if checkpoint is not None:
                state = checkpoint["model"]
                break
    if state is None:
        return None
    out = Path(work) / "partial"
    out.mkdir(exist_ok=True)
    torch.save(state, out / PARTIAL_STUDENT)
    return PARTIAL_STUDENT


# ---- causal language models (task `causal_lm`): the same steps over token windows ---------------------


def _lm_config(config: dict[str, Any]) -> Any:
    from worker.distill.lm_config import LMConfig

    return LMConfig.from_dict(_settings(config))


def lm_preflight_step(work: Path, config: dict[str, Any], on_progress: OnProgress) -> Any:
    from worker.distill import lm_pipeline

    return lm_pipeline.lm_preflight(work, _lm_config(config))


def lm_generate_step(work: Path, config: dict[str, Any], on_progress: OnProgress) -> Any:
    from worker.distill import lm_pipeline

    return lm_pipeline.lm_generate(work, _lm_config(config), on_progress)


def lm_soft_label_step(work: Path, config: dict[str, Any], on_progress: OnProgress) -> Any:
    """As `soft_label_step`, over token windows: past `SHARD_TASK_ROWS` windows, `{SPLIT_ROWS: ...}`."""
    from worker.distill import lm_pipeline
    from worker.distill.shard_plan import needs_tasks

    lm_config = _lm_config(config)
    task_rows = int(config.get(SHARD_TASK_ROWS) or 0)
    if task_rows:
        rows = lm_pipeline.lm_split_rows(work, lm_config)
        if rows is not None and needs_tasks(rows, task_rows):
            return {SPLIT_ROWS: rows}
    return lm_pipeline.lm_soft_label(work, lm_config, on_progress)


def lm_assemble_soft_labels_step(work: Path, config: dict[str, Any], on_progress: OnProgress) -> Any:
    from worker.distill import lm_pipeline

    return lm_pipeline.lm_soft_label(work, _lm_config(config))


def lm_soft_label_rows_step(work: Path, config: dict[str, Any], on_progress: OnProgress) -> Any:
    from worker.distill import lm_pipeline

    rows = config[SHARD_ROWS]
    start, end, split = int(rows["start"]), int(rows["end"]), str(rows["split"])
    return lm_pipeline.lm_soft_label_rows(work, _lm_config(config), split, start, end, on_progress)


def lm_distill_step(work: Path, config: dict[str, Any], on_progress: OnProgress) -> Any:
    from worker.distill import lm_pipeline
    from worker.distill.lm_train import Stopped

    # As distill_step: SIGTERM from the parent becomes the training loop's `stop`.
    requested: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: requested.append(signum))
    try:
        return lm_pipeline.lm_distill(work, _lm_config(config), on_progress, stop=lambda: bool(requested))
    except Stopped:
        raise SystemExit(0) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def lm_evaluate_step(work: Path, config: dict[str, Any], on_progress: OnProgress) -> Any:
    from worker.distill import lm_pipeline

    return lm_pipeline.lm_evaluate(work, _lm_config(config))


def lm_export_step(work: Path, config: dict[str, Any], on_progress: OnProgress) -> list[str]:
    from worker.distill import lm_pipeline

    return [Path(p).name for p in lm_pipeline.lm_export(work, _lm_config(config))]


PARTIAL_STUDENT = "partial_student.pt"
SOFT_LABEL_STEPS = [("preflight", preflight_step), ("soft_label", soft_label_step)]
SOFT_LABEL_ROWS_STEPS = [("soft_label_rows", soft_label_rows_step)]
ASSEMBLE_STEPS = [("soft_label", assemble_soft_labels_step)]
DISTILL_STEPS = [("distill", distill_step), ("evaluate", evaluate_step), ("export", export_step)]
LM_SOFT_LABEL_STEPS = [("preflight", lm_preflight_step), ("soft_label", lm_soft_label_step)]
# A prompt-only dataset (`generate` set): the teacher writes the completions between the two.
LM_GENERATE_STEPS = [LM_SOFT_LABEL_STEPS[0], ("generate", lm_generate_step), LM_SOFT_LABEL_STEPS[1]]
LM_DISTILL_STEPS = [("distill", lm_distill_step), ("evaluate", lm_evaluate_step), ("export", lm_export_step)]
# The steps of each stage, by the job's task (its config carries it; classification jobs never had one).
STAGE_STEPS = {
    ("soft_label", "classification"): SOFT_LABEL_STEPS,
    ("distill", "classification"): DISTILL_STEPS,
    ("soft_label", "causal_lm"): LM_SOFT_LABEL_STEPS,
    ("distill", "causal_lm"): LM_DISTILL_STEPS,
}


LM_SOFT_LABEL_ROWS_STEPS = [("soft_label_rows", lm_soft_label_rows_step)]
LM_ASSEMBLE_STEPS = [("soft_label", lm_assemble_soft_labels_step)]
# A soft-label stage split over workers: one shard task's steps, and the end of the stage, by task.
SHARD_STEPS = {"classification": SOFT_LABEL_ROWS_STEPS, "causal_lm": LM_SOFT_LABEL_ROWS_STEPS}
ASSEMBLE = {"classification": ASSEMBLE_STEPS, "causal_lm": LM_ASSEMBLE_STEPS}


def shard_size(config: dict[str, Any]) -> int:
    """Rows (classification) or token windows (causal_lm) per soft-label shard file of a job."""
    return int(config["shard_rows"] if config.get("task") == "causal_lm" else config["shard_size"])


def stage_steps(stage: str, config: dict[str, Any]) -> list[tuple[str, Any]]:
    task = str(config.get("task", "classification"))
    if (stage, task) == ("soft_label", "causal_lm") and config.get("generate") is not None:
        return LM_GENERATE_STEPS
    return STAGE_STEPS[(stage, task)]
