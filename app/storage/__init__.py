"""Object storage: one interface (`Storage`), a local-folder backend and an S3 backend."""

from __future__ import annotations

from app.config import Settings
from app.storage.base import Storage
from app.storage.local import LocalStorage


def build_storage(settings: Settings, *, for_worker: bool = False) -> Storage:
    """`for_worker`: retry an unreachable S3 store for `s3_worker_retry_budget_s` (a worker can wait; the API
    must answer quickly)."""
    if settings.storage_backend == "s3":
        from app.storage.s3 import S3Storage, make_client

        client = make_client(
            settings.s3_endpoint_url,
            settings.s3_region,
            settings.s3_access_key_id,
            settings.s3_secret_access_key,
        )
        budget = settings.s3_worker_retry_budget_s if for_worker else 0.0
        return S3Storage(client, settings.s3_bucket, retry_budget_s=budget)
    return LocalStorage(settings.storage_path)


__all__ = ["LocalStorage", "Storage", "build_storage"]
