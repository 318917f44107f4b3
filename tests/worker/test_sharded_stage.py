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


def test_a_causal_lm_stage_split_over_two_workers_labels_like_one_task(service, tmp_path):
    """The same over token windows: a tiny Llama teacher folder and a JSONL corpus, `shard_rows` windows per
    shard file; the job then distils from the assembled labels and succeeds."""
    import json

    from tests.distill.tiny_lm import CORPUS, pack, save_folder
    from worker.distill.lm_pipeline import lm_soft_label
    from worker.distill.workfolder import prepare_inputs
    from worker.tasks.jobs import run_distill
    from worker.tasks.steps import _lm_config

    save_folder(tmp_path / "teacher")
    teacher = pack(tmp_path / "teacher", tmp_path / "teacher.tar.gz")
    dataset = tmp_path / "corpus.jsonl"
    docs = [f"{a} {b}" for a in CORPUS[:4] for b in CORPUS[:4]]
    dataset.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    # 61 windows of 16 tokens, no held-out split, 16 per shard file: two tasks of two shards each.
    settings = service.ctx.settings.model_copy(update={"soft_label_task_rows": 32})
    ctx, other = (
        replace(service.ctx, settings=settings),
        replace(service.ctx, settings=settings, worker_id="w2"),
    )
    lm = {"epochs": 1, "batch_size": 8, "max_length": 16, "topk": 8, "shard_rows": 16, "val_fraction": 0.0}
    lm |= {"max_new_tokens": 4}
    job_id = submit(
        service.http, teacher, dataset, task="causal_lm", student="causal_lm:layers=1;hidden=32;heads=2",
        config=lm,
    )  # fmt: skip
    run_soft_label(ctx, job_id)
    shards = service.http.get(f"/v1/jobs/{job_id}").json()["metrics"]["shards"]
    assert (shards["total"], shards["waiting"]) == (2, 2), shards
    for number in range(shards["total"]):
        run_soft_label_shard(other if number % 2 else ctx, job_id, number)
        run_soft_label_shard(ctx, job_id, number)  # a duplicate delivery: a no-op
    assert service.queued_messages().count(("distill.distill", [job_id])) == 1
    run_distill(ctx, job_id)
    job = service.http.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job
    held = {e["data"]["worker_id"] for e in events(service.http, job_id) if e["kind"] == "shard_done"}
    assert held == {"test-worker", "w2"}

    # Shards and manifest, byte for byte, as the stage run whole in one process (no parts left).
    prepare_inputs(tmp_path / "one", teachers=[teacher], dataset=dataset)
    lm_soft_label(tmp_path / "one", _lm_config(job["config"]))
    folder = tmp_path / "one" / "soft_labels"
    names = [p.name for p in sorted(folder.iterdir()) if p.name == "manifest.json" or "-0" in p.name]
    want = {name: (folder / name).read_bytes() for name in names}
    got = stored_soft_labels(service, job_id)
    assert len(want) > 3 and {name: got.get(name) for name in want} == want
    assert not any(name.startswith("parts/") for name in got)
