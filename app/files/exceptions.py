from __future__ import annotations

from app.errors import AppError, Conflict, NotFound


class FileNotFound(NotFound):
    code = "file_not_found"

    def __init__(self) -> None:
        super().__init__("no such file")


class FileInUse(Conflict):
    code = "file_in_use"

    def __init__(self, job_ids: list[str]) -> None:
        super().__init__(f"the file is an input of unfinished job(s) {', '.join(job_ids)}; cancel them first")


class MalformedUpload(AppError):
    status, code, title = 400, "malformed_multipart", "Malformed upload"


class S3NotConfigured(AppError):
    status, code, title = 400, "s3_not_configured", "S3 is not configured"

    def __init__(self) -> None:
        super().__init__("registering s3:// objects needs the S3 backend (DISTILL_STORAGE_BACKEND=s3)")
