"""The worker's S3 client outlasts a store that is away longer than the API's quick retries: its upload
goes through once the store is back, while the API's client has already given up (the API answers 503)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.config import Settings
from app.storage import build_storage
from app.storage.exceptions import ObjectNotFound, StorageUnavailable
from tests.reliability.proxy import TcpProxy
from tests.reliability.stack import S3_SETTINGS, proxied_s3


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[tuple[Settings, TcpProxy]]:
    with proxied_s3() as (s3, proxy):
        yield Settings(data_dir=tmp_path, **s3), proxy


def test_a_minute_long_outage_is_within_the_worker_budget() -> None:
    assert Settings(**S3_SETTINGS).s3_worker_retry_budget_s >= 90


def test_worker_upload_outlasts_an_outage_the_api_gives_up_on(store, tmp_path: Path) -> None:
    settings, proxy = store
    api, worker = build_storage(settings), build_storage(settings, for_worker=True)
    artifact = tmp_path / "student.safetensors"
    artifact.write_bytes(b"weights" * 1000)

    proxy.down(listen=True)  # connections accepted and cut at once: a store that is there but broken
    outcome: dict[str, object] = {}

    def worker_uploads() -> None:
        try:
            outcome["put"] = worker.put_stream("a/part.bin", iter([b"x" * 100]))
            outcome["file"] = worker.upload_from(artifact, "a/student.safetensors")
        except Exception as exc:  # recorded, so that the assertion below names it
            outcome["error"] = exc

    thread = threading.Thread(target=worker_uploads)
    thread.start()
    started = time.monotonic()
    with pytest.raises(StorageUnavailable):
        api.put_stream("b/part.bin", iter([b"y" * 100]))
    api_gave_up = time.monotonic() - started
    assert api_gave_up < 30  # the API's budget: a request answered 503 promptly
    time.sleep(3)  # down longer than the API's whole budget
    assert thread.is_alive() and "error" not in outcome, outcome
    tried = proxy.refused
    proxy.up()
    thread.join(60)
    assert not thread.is_alive()
    assert "error" not in outcome, outcome
    assert outcome["put"][0] == 100 and outcome["file"][0] == 7000  # type: ignore[index]
    assert tried >= 2  # it kept trying during the outage, not just once after it
    assert b"".join(api.open_read("a/student.safetensors")) == artifact.read_bytes()


def test_worker_does_not_retry_a_missing_object(store, tmp_path: Path) -> None:
    settings, _ = store
    worker = build_storage(settings, for_worker=True)
    started = time.monotonic()
    with pytest.raises(ObjectNotFound):
        worker.download_to("no/such/key", tmp_path / "x")
    with pytest.raises(ObjectNotFound):
        worker.head("no/such/key")
    assert time.monotonic() - started < 5
