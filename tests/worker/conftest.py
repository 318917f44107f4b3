"""The embedded service in a temporary folder (tests/support/services.py `embedded`): the real API for
uploads and submits, and a worker context for running tasks in-process the way a Celery worker calls them;
and a tiny problem with a TorchScript teacher to submit."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.api import submit, tiny_job
from tests.support.data import gaussian_problem
from tests.support.services import Embedded, embedded


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Embedded]:
    with embedded(tmp_path) as svc:
        yield svc


@pytest.fixture(scope="session")
def tiny_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 3-class problem in 8 dimensions and a TorchScript teacher for it."""
    problem = gaussian_problem(
        tmp_path_factory.mktemp("tiny"), rows=300, test_rows=0, hidden=16, lr=2e-2, seed=1
    )
    return problem.teacher, problem.dataset


@pytest.fixture
def submit_job(service: Embedded, tiny_inputs: tuple[Path, Path]) -> Callable[..., str]:
    """Submits the tiny problem (a two-epoch job unless `config` says otherwise); the job id."""
    return lambda **config: submit(service.http, *tiny_inputs, **tiny_job(**config))
