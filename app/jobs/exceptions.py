from __future__ import annotations

from app.errors import Conflict, NotFound


class JobNotFound(NotFound):
    code = "job_not_found"

    def __init__(self) -> None:
        super().__init__("no such job")


class ArtifactNotFound(NotFound):
    code = "artifact_not_found"

    def __init__(self, name: str) -> None:
        super().__init__(f"the job has no artifact named {name!r}")


class JobFinished(Conflict):
    code = "job_finished"

    def __init__(self, status: str) -> None:
        super().__init__(f"the job already finished ({status}); only unfinished jobs can be cancelled")


class IdempotencyConflict(Conflict):
    code = "idempotency_key_reused"

    def __init__(self) -> None:
        super().__init__("this Idempotency-Key was used with a different request body")
