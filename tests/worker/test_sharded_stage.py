"""A soft-label stage split into shard tasks, the tasks called in-process as workers call them, on the
embedded service (SQLite): the split, duplicate deliveries, the last shard ending the stage once, and the
stored soft labels equal to those of one unsplit run of the stage."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from tests.support.api import events, submit, tiny_job
from worker.tasks.jobs import run_soft_label
from worker.tasks.shards import run_soft_label_shard

SHARD = "distill.soft_label_shard"


def stored_soft_labels(service, job_id: str) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
    """The job's mirrored `soft_labels/` as the distill stage on another machine would pull it."""
    root = next(Path(service.settings.storage_path).rglob(f"jobs/{job_id}/soft_labels"))
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_split_stage_labels_like_one_task_and_hands_on_once(service, tiny_inputs, tmp_path):
    # 270 training and 30 validation rows, past 200: one task for each split (shards of 300 rows).
    settings = service.ctx.settings.model_copy(update={"soft_label_task_rows": 200})
    ctx, other = (
        replace(service.ctx, settings=settings),
        replace(service.ctx, settings=settings, worker_id="w2"),
    )
    job_id = submit(service.http, *tiny_inputs, **tiny_job(shard_size=300))
    run_soft_label(ctx, job_id)
    job = service.http.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "soft_labeling" and job["metrics"]["shards"] == {
        "total": 2, "done": 0, "running": 0, "waiting": 2, "held_by": {}
    }, job  # fmt: skip
    assert [m for m in service.queued_messages() if m[0] == SHARD] == [(SHARD, [job_id, n]) for n in (0, 1)]
    run_soft_label(ctx, job_id)  # a duplicate of the stage's own task while its shards wait: a no-op

    run_soft_label_shard(other, job_id, 1)
    run_soft_label_shard(ctx, job_id, 1)  # a duplicate delivery of a finished shard: a no-op
    assert service.http.get(f"/v1/jobs/{job_id}").json()["metrics"]["shards"] == {
        "total": 2, "done": 1, "running": 0, "waiting": 1, "held_by": {}
    }  # fmt: skip
    assert ("distill.distill", [job_id]) not in service.queued_messages()
    run_soft_label_shard(ctx, job_id, 0)  # the last one: this worker ends the stage
    job = service.http.get(f"/v1/jobs/{job_id}").json()
    assert (job["status"], job["progress"], job["metrics"]["shards"]["done"]) == ("soft_labeling", 1.0, 2)
    assert service.queued_messages().count(("distill.distill", [job_id])) == 1
    run_soft_label_shard(other, job_id, 0)
    run_soft_label(other, job_id)  # late duplicates: nothing runs twice, nothing is handed on twice
    assert service.queued_messages().count(("distill.distill", [job_id])) == 1

    seen = events(service.http, job_id)
    kinds = [e["kind"] for e in seen]
    assert kinds.count("shards_planned") == 1 and kinds.count("shard_started") == 2, kinds
    assert {e["data"]["shard"]: e["data"]["worker_id"] for e in seen if e["kind"] == "shard_done"} == {
        0: "test-worker",
        1: "w2",
    }
    assert "resumed" not in kinds and "attempt_failed" not in kinds

    # The same soft labels, byte for byte, as the stage run whole in one process (no parts left).
    from worker.distill.pipeline import prepare_inputs, soft_label
    from worker.tasks.steps import _config

    teacher, dataset = tiny_inputs
    prepare_inputs(tmp_path / "one", teachers=[teacher], dataset=dataset)
    soft_label(tmp_path / "one", _config(job["config"]))
    want = {p.name: p.read_bytes() for p in sorted((tmp_path / "one" / "soft_labels").iterdir())}
    assert stored_soft_labels(service, job_id) == want
