"""The dashboard's pages and assets as served (no browser): shells with a strict CSP, our own scripts only,
and the one place a cookie stands in for the bearer key (artifact downloads)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.services import Local, local_app

PAGES = ["/ui/", "/ui/login", "/ui/new", "/ui/jobs/job_0123abcd"]


@pytest.fixture
def local(tmp_path: Path) -> Iterator[Local]:
    with local_app(tmp_path) as app:
        yield app


def test_pages_load_only_our_own_scripts_under_a_strict_policy(local: Local) -> None:
    for page in PAGES:
        r = local.http.get(page)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert "http://" not in r.text and "https://" not in r.text  # nothing from a CDN
        assert not re.search(r"<script(?![^>]*\bsrc=)", r.text), "inline script"
        for src in re.findall(r'(?:src|href)="(/ui/static/[^"]+)"', r.text):
            asset = local.http.get(src)
            assert asset.status_code == 200 and asset.headers["content-type"].split(";")[0] in (
                "text/javascript", "text/css")
    assert "data-job-id=\"job_0123abcd\"" in local.http.get("/ui/jobs/job_0123abcd").text


def test_job_ids_and_asset_names_cannot_smuggle_markup_or_paths(local: Local) -> None:
    assert local.http.get("/ui/jobs/%3Cscript%3E").status_code == 422
    for name in ("nope.js", "..%2Frouter.py", "api.js.map", "ROUTER.PY"):
        assert local.http.get(f"/ui/static/{name}").status_code == 404


def test_artifact_links_work_with_the_dashboard_cookie_and_nothing_else_does(local: Local) -> None:
    owner, other = local.key("owner"), local.key("other")
    job_id = local.submit(owner)["id"]
    local.advance(job_id, artifacts={"student.pt": b"\x00student" * 64})
    url = f"/v1/jobs/{job_id}/artifacts/student.pt"

    local.http.cookies.set("distill_key", owner)
    r = local.http.get(url)
    assert r.status_code == 200 and r.content == b"\x00student" * 64
    # Only that read: listing jobs or cancelling with just the cookie is unauthenticated.
    assert local.http.get("/v1/jobs").status_code == 401
    assert local.http.post(f"/v1/jobs/{job_id}/cancel").status_code == 401
    # Another tenant's cookie finds nothing there, as with its header.
    local.http.cookies.set("distill_key", other)
    assert local.http.get(url).status_code == 404
    local.http.cookies.clear()
    assert local.http.get(url).status_code == 401
