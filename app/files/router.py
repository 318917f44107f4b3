from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from app.deps import SessionDep, SettingsDep, StorageDep, TenantDep
from app.files import service
from app.files.schemas import FileOut, FilePage, FileRegister, Purpose
from app.paging import MAX_LIMIT
from app.storage.http import byte_position

router = APIRouter(prefix="/v1/files", tags=["files"])

_UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "purpose": {"type": "string", "enum": ["teacher", "dataset", "student_init"]},
                        "filename": {"type": "string", "maxLength": 255},
                    },
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


@router.post("", status_code=201, openapi_extra=_UPLOAD_BODY)
async def upload_file(
    request: Request,
    session: SessionDep,
    tenant_id: TenantDep,
    storage: StorageDep,
    settings: SettingsDep,
    purpose: Annotated[str | None, Query(max_length=32, description="for raw (non-multipart) bodies")] = None,
    filename: Annotated[str | None, Query(max_length=255)] = None,
) -> FileOut:
    """Multipart `file` + `purpose`, or a raw body with `?purpose=...&filename=...`; never buffered whole."""
    length = request.headers.get("content-length")
    file = await service.upload(
        session,
        storage,
        tenant_id,
        request.stream(),
        content_type=request.headers.get("content-type", ""),
        # Not plain ASCII digits (isdigit() also takes "²"): left to the streamed count, which caps anyway.
        content_length=byte_position(length) if length and length.isascii() and length.isdigit() else None,
        purpose=purpose,
        filename=filename,
        max_bytes=settings.max_upload_bytes,
    )
    return FileOut.model_validate(file)


@router.post("/register", status_code=201)
def register_file(
    body: FileRegister, session: SessionDep, tenant_id: TenantDep, storage: StorageDep, settings: SettingsDep
) -> FileOut:
    file = service.register(
        session,
        storage,
        tenant_id,
        uri=body.uri,
        purpose=body.purpose,
        filename=body.filename,
        max_bytes=settings.max_upload_bytes,
        limits=service.ShardLimits(settings.max_registered_shards, settings.max_registered_bytes),
    )
    return FileOut.model_validate(file)


@router.get("")
def list_files(
    session: SessionDep,
    tenant_id: TenantDep,
    purpose: Purpose | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 20,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> FilePage:
    rows, next_cursor = service.list_files(session, tenant_id, purpose=purpose, cursor=cursor, limit=limit)
    return FilePage(data=[FileOut.model_validate(f) for f in rows], next_cursor=next_cursor)


@router.get("/{file_id}")
def get_file(file_id: str, session: SessionDep, tenant_id: TenantDep) -> FileOut:
    return FileOut.model_validate(service.get(session, tenant_id, file_id))


@router.delete("/{file_id}", status_code=204)
def delete_file(file_id: str, session: SessionDep, tenant_id: TenantDep, storage: StorageDep) -> Response:
    service.delete(session, storage, tenant_id, file_id)
    return Response(status_code=204)
