"""Schemathesis generates requests from the OpenAPI document and sends them, as two tenants, to the real
app on a real (rolled-back) PostgreSQL database: no 5xx, and every response matches the document.

The example count is bounded so the whole run stays well under a minute on 2 cores.
"""

from __future__ import annotations

import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import content_type_conformance, response_schema_conformance

from tests.app.conftest import Tenant
from tests.app.conftest import alice as alice  # noqa: F401  (fixtures reused)
from tests.app.conftest import app as app  # noqa: F401
from tests.app.conftest import bob as bob  # noqa: F401
from tests.app.conftest import broker as broker  # noqa: F401
from tests.app.conftest import connection as connection  # noqa: F401
from tests.app.conftest import db as db  # noqa: F401
from tests.app.conftest import engine as engine  # noqa: F401
from tests.app.conftest import enqueuer as enqueuer  # noqa: F401
from tests.app.conftest import pg_url as pg_url  # noqa: F401
from tests.app.conftest import settings as settings  # noqa: F401
from tests.app.conftest import storage as storage  # noqa: F401

CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance]


@pytest.fixture
def api_schema(app: FastAPI):  # type: ignore[no-untyped-def]  # noqa: F811
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@hypothesis_settings(
    max_examples=5,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_to_its_document_for_two_tenants(case, alice: Tenant, bob: Tenant) -> None:  # noqa: F811
    for tenant in (alice, bob):
        case.call_and_validate(headers=tenant.headers, checks=CHECKS)
    case.call_and_validate(headers={}, checks=CHECKS)  # and without a key: 401, still per the document
