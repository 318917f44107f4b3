"""Webhook receivers: link-local, metadata, unspecified, multicast and reserved addresses are refused always,
loopback and private ones except on the embedded default or with `webhook_allow_private`; at submission
(422 naming `webhook_url`) and again at connect time, so a name that later resolves elsewhere (DNS
rebinding) is never contacted."""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from app import receivers
from app.webhooks.dispatcher import get_dispatcher
from tests.client.receiver import Receiver
from tests.support.api import inputs
from tests.support.services import Local, local_app

PUBLIC = ipaddress.ip_address("93.184.216.34")

ALWAYS_REFUSED = [
    "http://169.254.169.254/latest/meta-data/",
    "http://[::ffff:169.254.169.254]/",  # the IPv4-mapped form of the same
    "http://[fe80::1]/",
    "http://0.0.0.0:8000/",
    "http://0.1.2.3/",
    "http://224.0.0.1/",
    "http://[ff02::1]/",
    "http://240.0.0.1/",
    "http://100.100.100.200/",  # a metadata service outside 169.254/16
    "http://[64:ff9b::a9fe:a9fe]/",  # NAT64 for 169.254.169.254
]
PRIVATE = ["http://127.0.0.1:8000/v1/jobs", "http://[::1]/", "http://2130706433/", "http://10.1.2.3/"]


@pytest.fixture
def make_local(tmp_path: Path) -> Iterator[Callable[..., Local]]:
    """Builds in-process apps (SQLite, real commits, the real dispatcher) on the given settings."""
    numbers = itertools.count()
    with ExitStack() as apps:

        def make(**overrides: Any) -> Local:
            folder = tmp_path / f"app{next(numbers)}"
            folder.mkdir()
            return apps.enter_context(local_app(folder, webhook_backoff_s=0.01, **overrides))

        yield make


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def submit(local: Local, webhook_url: str, key: str | None = None) -> Any:
    headers = local.as_tenant(key or local.key("acme"))
    teacher, dataset = inputs(local.http, headers)
    body = {"teacher_file_ids": [teacher], "dataset_file_id": dataset, "webhook_url": webhook_url}
    return local.http.post("/v1/jobs", json=body, headers=headers)


def assert_refused(response: Any, address: str) -> None:
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["code"] == "webhook_url_refused"
    assert [e["field"] for e in body["errors"]] == ["webhook_url"]
    assert address in body["errors"][0]["message"], body


@pytest.mark.parametrize("url", ALWAYS_REFUSED + PRIVATE)
def test_refused_addresses_are_422_at_submission(make_local: Callable[..., Local], url: str) -> None:
    local = make_local(environment="test")
    key = local.key("acme")
    assert_refused(submit(local, url, key), " address")
    assert local.http.get("/v1/jobs", headers=local.as_tenant(key)).json()["data"] == []


@pytest.mark.parametrize("environment", ["development", "test"])
def test_link_local_and_metadata_are_refused_even_where_private_is_allowed(
    make_local: Callable[..., Local], environment: str
) -> None:
    local = make_local(environment=environment, webhook_allow_private=True)
    for url in ALWAYS_REFUSED:
        assert submit(local, url).status_code == 422, url
    for url in PRIVATE:
        assert submit(local, url).status_code == 201, url


def test_a_name_resolving_to_metadata_is_refused_naming_the_address(
    make_local: Callable[..., Local], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        receivers, "resolve", lambda host, port: [PUBLIC, ipaddress.ip_address("169.254.169.254")]
    )
    local = make_local()  # development: loopback would be fine, metadata never is
    assert_refused(submit(local, "https://metadata.example/"), "metadata.example resolves to 169.254.169.254")


def test_loopback_is_fine_on_the_embedded_default(
    make_local: Callable[..., Local], receiver: Receiver
) -> None:
    local = make_local()  # environment "development"
    assert submit(local, receiver.url).status_code == 201
    assert get_dispatcher().wait_idle(30)
    assert [e["data"]["status"] for e in receiver.accepted()] == ["queued"]


def rebinding(first: str, then: str) -> Callable[[str, int], list[Any]]:
    """A resolver that answers `first` once (the submission's check), then `then` (the delivery)."""
    answers = [ipaddress.ip_address(first)]

    def resolve(host: str, port: int) -> list[Any]:
        return [answers.pop()] if answers else [ipaddress.ip_address(then)]

    return resolve


@pytest.mark.parametrize(
    ("settings", "then"),
    [({"environment": "test"}, "127.0.0.1"), ({"webhook_allow_private": True}, "169.254.169.254")],
)
def test_a_name_rebinding_to_a_refused_address_is_never_contacted(
    make_local: Callable[..., Local],
    receiver: Receiver,
    monkeypatch: pytest.MonkeyPatch,
    settings: dict[str, Any],
    then: str,
) -> None:
    monkeypatch.setattr(receivers, "resolve", rebinding(str(PUBLIC), then))
    local = make_local(**settings)
    key = local.key("acme")
    job = local.submit(key, webhook_url=f"http://rebind.example:{receiver.httpd.server_port}/hook")
    assert get_dispatcher().wait_idle(30)
    assert receiver.requests == []  # nothing reached the loopback receiver
    log = local.http.get(f"/v1/jobs/{job['id']}/events", headers=local.as_tenant(key)).json()["data"]
    attempts = [e["data"] for e in log if e["kind"] == "webhook"]
    assert len(attempts) == 1, attempts  # refused, so not retried
    assert not attempts[0]["ok"] and attempts[0]["status_code"] is None and attempts[0]["retry_in_s"] is None
    assert attempts[0]["error"].startswith(f"blocked: rebind.example resolves to {then}, a ")


def test_deliveries_connect_to_the_address_that_was_checked(
    make_local: Callable[..., Local], receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`rebind.example` exists in no DNS: the delivery arriving proves the socket went to the address the
    check resolved, not to a second lookup's answer."""
    monkeypatch.setattr(receivers, "resolve", lambda host, port: [ipaddress.ip_address("127.0.0.1")])
    local = make_local(environment="test", webhook_allow_private=True)
    local.submit(local.key("acme"), webhook_url=f"http://rebind.example:{receiver.httpd.server_port}/hook")
    assert get_dispatcher().wait_idle(30)
    assert [e["data"]["status"] for e in receiver.accepted()] == ["queued"]
    assert receiver.requests[0]["headers"]["Host"] == f"rebind.example:{receiver.httpd.server_port}"
