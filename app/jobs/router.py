from __future__ import annotations

from functools import partial
from typing import Annotated, Any

from fastapi import APIRouter, FastAPI, Header, Query, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.routing import Route

from app.deps import DatabaseDep, EnqueueDep, SessionDep, SettingsDep, StorageDep, TenantDep, current_tenant
from app.jobs import service
from app.jobs.models import Artifact, JobEvent
from app.jobs.schemas import (
    ArtifactList,
    ArtifactOut,
    EventList,
    EventOut,
    JobCreate,
    JobOut,
    JobPage,
    job_out,
)
from app.jobs.state import STATES
from app.limits import JobCaps
from app.paging import MAX_LIMIT
from app.receivers import private_allowed
from app.storage.http import object_response
from app.storage.s3 import S3Storage

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

IdempotencyKey = Annotated[
    str | None, Header(alias="Idempotency-Key", min_length=1, max_length=255, pattern=r"^[\x21-\x7e]+$")
]


def _event_out(event: JobEvent) -> EventOut:
    return EventOut(seq=event.seq, kind=event.kind, data=event.data or {}, created_at=event.created_at)


def _artifact_out(artifact: Artifact) -> ArtifactOut:
    return ArtifactOut(
        name=artifact.name, size=artifact.size, sha256=artifact.sha256, content_type=artifact.content_type
    )


@router.post("", status_code=201, responses={200: {"model": JobOut, "description": "idempotent replay"}})
async def create_job(
    body: JobCreate,
    response: Response,
    session: SessionDep,
    tenant_id: TenantDep,
    enqueue: EnqueueDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKey = None,
) -> JobOut:
    # Async on purpose: the service returns holding the tenant's row lock (app.limits) until the edge
    # commits. A sync route would then wait for a pool thread to validate its response, and under a burst
    # every pool thread is a request blocked on that same lock: a deadlock. Here one pool thread does the
    # service call and builds the answer (attribute loads included), and the commit has threads of its own.
    out, created = await run_in_threadpool(
        partial(
            _submit,
            session,
            tenant_id,
            body,
            idempotency_key=idempotency_key,
            enqueue=enqueue,
            max_attempts=settings.max_attempts,
            caps=JobCaps.from_settings(settings),
            private_webhooks=private_allowed(settings),
        )
    )
    if not created:
        response.status_code = 200
    return out


def _submit(*args: Any, **kwargs: Any) -> tuple[JobOut, bool]:
    job, created = service.create_job(*args, **kwargs)
    return job_out(job), created


@router.get("")
def list_jobs(
    session: SessionDep,
    tenant_id: TenantDep,
    status: Annotated[str | None, Query(pattern="^(" + "|".join(STATES) + ")$")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 20,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> JobPage:
    rows, next_cursor = service.list_jobs(session, tenant_id, status=status, cursor=cursor, limit=limit)
    return JobPage(data=[job_out(j) for j in rows], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut)
async def get_job(job_id: str, tenant_id: TenantDep, db: DatabaseDep) -> Response:
    """Documents the route in OpenAPI; `poll_job` below answers it (same auth, query and body)."""
    body = await service.job_json(db, tenant_id, job_id)
    return Response(body, media_type="application/json")


async def poll_job(request: Request) -> Response:
    """`GET /v1/jobs/{job_id}`, the path every client polls, as a plain Starlette endpoint: FastAPI's
    dependency resolution and its nested routers cost about as much CPU as the database read here.
    Errors are raised as usual, so the one exception handler renders them."""
    request.scope["route"] = JOB_POLL_ROUTE  # FastAPI routes set this; the latency metric labels by it
    tenant_id = await current_tenant(request)
    body = await service.job_json(request.app.state.db, tenant_id, request.path_params["job_id"])
    return Response(body, media_type="application/json")


JOB_POLL_ROUTE = Route("/v1/jobs/{job_id}", poll_job, methods=["GET"], include_in_schema=False)


def install_job_poll(app: FastAPI) -> None:
    """Ahead of every router, so the poll matches first; `get_job` stays for the schema."""
    app.router.routes.insert(0, JOB_POLL_ROUTE)


@router.get("/{job_id}/events")
def list_events(
    job_id: str,
    session: SessionDep,
    tenant_id: TenantDep,
    after: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 1000,
) -> EventList:
    events = service.list_events(session, tenant_id, job_id, after=after, limit=limit)
    return EventList(data=[_event_out(e) for e in events])


@router.post("/{job_id}/cancel")
def cancel_job(job_id: str, session: SessionDep, tenant_id: TenantDep, keep_partial: bool = False) -> JobOut:
    return job_out(service.cancel_job(session, tenant_id, job_id, keep_partial=keep_partial))


@router.get("/{job_id}/artifacts")
def list_artifacts(job_id: str, session: SessionDep, tenant_id: TenantDep) -> ArtifactList:
    return ArtifactList(data=[_artifact_out(a) for a in service.list_artifacts(session, tenant_id, job_id)])


@router.get(
    "/{job_id}/artifacts/{name}",
    response_class=Response,
    responses={
        200: {"content": {"application/octet-stream": {}}},
        206: {"description": "partial content"},
        304: {"description": "not modified"},
        307: {"description": "redirect to a presigned URL"},
        416: {"description": "range not satisfiable"},
    },
)
def download_artifact(
    job_id: str,
    name: str,
    request: Request,
    session: SessionDep,
    tenant_id: TenantDep,
    storage: StorageDep,
    settings: SettingsDep,
) -> Response:
    artifact = service.get_artifact(session, tenant_id, job_id, name)
    presign = (
        settings.presign_expires_s
        if settings.s3_presign_downloads and isinstance(storage, S3Storage)
        else None
    )
    return object_response(
        request,
        storage,
        artifact.key,
        size=artifact.size,
        sha256=artifact.sha256,
        content_type=artifact.content_type,
        filename=artifact.name,
        presign_expires=presign,
    )
