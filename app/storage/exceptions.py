from __future__ import annotations

from app.errors import AppError, ServiceUnavailable


class ObjectTooLarge(AppError):
    status, code, title = 413, "file_too_large", "Payload too large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"the file exceeds the size limit of {limit} bytes")
        self.limit = limit


class ObjectNotFound(AppError):
    status, code, title = 404, "object_not_found", "Not found"

    def __init__(self, key: str) -> None:
        super().__init__("the stored object does not exist")
        self.key = key


class StorageUnavailable(ServiceUnavailable):
    code = "storage_unavailable"


class NotSupportedByStorage(AppError):
    status, code, title = 400, "storage_not_supported", "Not supported by this storage"


class ObjectNotAccessible(AppError):
    status, code, title = 422, "object_not_accessible", "Object not accessible"


class ObjectChanged(AppError):
    """A registered object is no longer the version that was registered (its ETag moved)."""

    status, code, title = 409, "object_changed", "Object changed"
