"""`distill submit | status | list | logs | cancel | download`: the HTTP client from the shell.

Every command takes `--url`, `--api-key` (else env, config file, embedded default: app/client/config.py) and
`--json` (one JSON document on stdout; `logs --follow --json` writes one JSON object per line).
Exit codes scripts can rely on: 0 success, 1 API or usage error, 3 job failed, 4 job cancelled,
5 server unreachable, 6 `--timeout` passed; the error code is printed (`error: <code>: <message>`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from app.client import Client, ConnectionFailed, DistillClientError, JobCancelled, JobFailed, WaitTimeout
from app.client.config import resolve
from app.client.render import event_line, job_dict, job_line, job_summary

EXIT_CODES: dict[type[DistillClientError], int] = {
    JobFailed: 3, JobCancelled: 4, ConnectionFailed: 5, WaitTimeout: 6,
}

UrlOpt = Annotated[str | None, typer.Option("--url", help="server URL (env DISTILL_URL)")]
KeyOpt = Annotated[str | None, typer.Option("--api-key", help="API key (env DISTILL_API_KEY)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON document for scripts")]


def _emit(as_json: bool, data: Any, text: str) -> None:
    if as_json:
        typer.echo(json.dumps(data, default=str))
    elif text:
        typer.echo(text)


@contextmanager
def _session(url: str | None, api_key: str | None, as_json: bool) -> Iterator[Client]:
    """Opens a client and turns any client error into the printed code and the documented exit status."""
    try:
        conn = resolve(url, api_key)
        with Client(conn.url, conn.api_key) as client:
            yield client
    except DistillClientError as exc:
        status = next((c for t, c in EXIT_CODES.items() if isinstance(exc, t)), 1)
        error: dict[str, Any] = {"code": exc.code, "message": exc.message}
        job = getattr(exc, "job", None)
        if as_json:
            typer.echo(json.dumps({"error": error, "job": job_dict(job) if job else None}, default=str))
        typer.echo(f"error: {exc.code}: {exc.message}", err=True)
        raise typer.Exit(status) from None


def _pairs(items: list[str], what: str) -> dict[str, Any]:
    """`key=value` pairs; values parse as JSON when they can (`epochs=3`, `preprocess={"scale":1}`)."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise typer.BadParameter(f"{item!r}: expected key=value", param_hint=what)
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _file_id(client: Client, ref: str, purpose: str, quiet: bool) -> str:
    """A `file_…` id is used as is; anything else is a local path to upload."""
    if ref.startswith("file_") and not Path(ref).exists():
        return ref
    if not Path(ref).is_file():
        raise DistillClientError(f"{purpose}: no such file {ref!r}", code="file_not_found")
    info = client.upload(ref, purpose)
    if not quiet:
        typer.echo(f"uploaded {ref} -> {info.id} ({info.size} bytes)", err=True)
    return info.id


def _target(out: Path, name: str, *, single: bool) -> Path:
    """`--out` names the file for a single artifact with a suffix (`model.pt`); otherwise it is a folder."""
    return out if single and out.suffix and not out.is_dir() else out / name


def submit(
    teacher: Annotated[list[str], typer.Option(help="teacher file (repeat for an ensemble) or file id")],
    dataset: Annotated[str, typer.Option(help="training data file or file id")],
    student: Annotated[
        str | None, typer.Option(help="student spec: mlp:hidden=128, causal_lm:layers=4 (task default)")
    ] = None,
    task: Annotated[str, typer.Option(help="classification or causal_lm")] = "classification",
    validation: Annotated[str | None, typer.Option(help="validation data file or file id")] = None,
    student_init: Annotated[str | None, typer.Option(help="initial student weights file or id")] = None,
    method: Annotated[str | None, typer.Option(help="auto (default), hinton, dist, dkd, ...")] = None,
    epochs: Annotated[int | None, typer.Option(min=1)] = None,
    temperature: Annotated[str | None, typer.Option(help="number or auto")] = None,
    alpha: Annotated[str | None, typer.Option(help="number in [0,1] or auto")] = None,
    text_column: Annotated[str | None, typer.Option(help="text datasets: the column of texts")] = None,
    max_length: Annotated[int | None, typer.Option(min=1, help="text: tokens per text or window")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="other setting, key=value (JSON value)")] = [],  # noqa: B006
    meta: Annotated[list[str], typer.Option("--meta", help="metadata key=value")] = [],  # noqa: B006
    webhook_url: Annotated[str | None, typer.Option(help="POST each state change here")] = None,
    idempotency_key: Annotated[str | None, typer.Option(help="reuse to make a retried submit safe")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="follow the job until it ends")] = False,
    out: Annotated[Path | None, typer.Option(help="with --wait: save the student (file or folder)")] = None,
    artifact: Annotated[str, typer.Option(help="artifact --out downloads")] = "student.pt",
    timeout: Annotated[float | None, typer.Option(help="with --wait: give up after N seconds")] = None,
    url: UrlOpt = None, api_key: KeyOpt = None, as_json: JsonOpt = False,
) -> None:
    """Upload the teacher and data, submit a job, and (with --wait) follow it and download the student."""
    config = _pairs(set_, "--set")
    named = {"method": method, "epochs": epochs, "temperature": temperature, "alpha": alpha}
    for key, value in named.items():
        if value is not None:
            config[key] = _pairs([f"{key}={value}"], f"--{key}")[key]
    for key, given in {"text_column": text_column, "max_length": max_length}.items():
        if given is not None:
            config[key] = given
    with _session(url, api_key, as_json) as client:
        teachers = [_file_id(client, t, "teacher", as_json) for t in teacher]
        data_id = _file_id(client, dataset, "dataset", as_json)
        val_id = _file_id(client, validation, "dataset", as_json) if validation else None
        init_id = _file_id(client, student_init, "student_init", as_json) if student_init else None
        job = client.create_job(teacher=teachers, dataset=data_id, student=student, config=config,
                                validation=val_id, student_init=init_id, metadata=_pairs(meta, "--meta"),
                                webhook_url=webhook_url, idempotency_key=idempotency_key, task=task)
        if not wait:
            _emit(as_json, job_dict(job), f"{job.id} {job.status}")
            return
        if not as_json:
            typer.echo(f"{job.id} submitted; following (Ctrl-C stops following, not the job)", err=True)
        job = client.wait(job.id, progress=not as_json, timeout_s=timeout)
        result = job_dict(job)
        if out is not None:
            result["downloaded"] = str(client.download(job.id, artifact, _target(out, artifact, single=True)))
        _emit(as_json, result, job_summary(job) + (f"\nstudent: {result['downloaded']}" if out else ""))


def status(job_id: str, url: UrlOpt = None, api_key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Show one job: status, stage, progress, epoch, latest metrics, error."""
    with _session(url, api_key, as_json) as client:
        job = client.get_job(job_id)
        _emit(as_json, job_dict(job), job_summary(job))


def list_(
    status_: Annotated[str | None, typer.Option("--status", help="only jobs in this state")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100)] = 20,
    url: UrlOpt = None, api_key: KeyOpt = None, as_json: JsonOpt = False,
) -> None:
    """List recent jobs, newest first."""
    with _session(url, api_key, as_json) as client:
        page = client.list_jobs(status=status_, limit=limit)
        body = {"data": [job_dict(j) for j in page.data], "next_cursor": page.next_cursor}
        _emit(as_json, body, "\n".join(job_line(j) for j in page.data) or "no jobs")


def logs(
    job_id: str,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing until the job ends")] = False,
    url: UrlOpt = None, api_key: KeyOpt = None, as_json: JsonOpt = False,
) -> None:
    """Print the job's events (stage changes, per-epoch metrics, webhook deliveries)."""
    with _session(url, api_key, as_json) as client:
        if not follow:
            events = client.events(job_id)
            body = {"data": [e.__dict__ for e in events]}
            _emit(as_json, body, "\n".join(event_line(e) for e in events))
            return
        for event in client.follow(job_id):
            _emit(as_json, event.__dict__, event_line(event))
            sys.stdout.flush()


def cancel(job_id: str, url: UrlOpt = None, api_key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Ask the job to stop; a finished job is left as it is."""
    with _session(url, api_key, as_json) as client:
        job = client.cancel(job_id)
        _emit(as_json, job_dict(job), f"{job.id} {job.status}")


def download(
    job_id: str,
    name: Annotated[list[str], typer.Option("--name", help="artifact name (repeat); 'all' for every one")] = [  # noqa: B006
        "student.pt"],
    out: Annotated[Path, typer.Option(help="folder (or file, for one artifact) to write")] = Path("."),
    url: UrlOpt = None, api_key: KeyOpt = None, as_json: JsonOpt = False,
) -> None:
    """Download artifacts (resumes an interrupted download; checks sha256)."""
    with _session(url, api_key, as_json) as client:
        names = [a.name for a in client.artifacts(job_id)] if name == ["all"] else name
        paths = [client.download(job_id, n, _target(out, n, single=len(names) == 1)) for n in names]
        _emit(as_json, {"files": [str(p) for p in paths]}, "\n".join(str(p) for p in paths))


COMMANDS: dict[str, Callable[..., None]] = {
    "submit": submit, "status": status, "list": list_, "logs": logs, "cancel": cancel, "download": download,
}


def register(app: typer.Typer) -> None:
    for command_name, fn in COMMANDS.items():
        app.command(command_name)(fn)
