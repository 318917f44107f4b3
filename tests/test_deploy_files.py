"""The production files, checked without a Docker engine (none runs on CI or on this kind of machine): the
compose stack has every part the service needs, wired in the right order, with no default secrets; the two
images split as promised (the API without torch, the worker with the pinned torch); the API image's command
runs where torch cannot be imported."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def stages() -> dict[str, str]:
    """Dockerfile stage name -> its text."""
    text = (ROOT / "Dockerfile").read_text()
    parts = re.split(r"^FROM\s+\S+\s+AS\s+(\S+)\s*$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_compose_runs_every_part_of_the_production_stack_in_order() -> None:
    services = compose()["services"]
    assert {"postgres", "redis", "minio", "minio-bucket", "migrate", "api", "worker"} <= set(services)
    assert services["migrate"]["command"] == ["alembic", "upgrade", "head"]
    assert "mc mb" in services["minio-bucket"]["command"][0]
    for name in ("api", "worker"):
        after = services[name]["depends_on"]
        assert after["migrate"] == {"condition": "service_completed_successfully"}
        assert after["minio-bucket"] == {"condition": "service_completed_successfully"}
        assert after["postgres"]["condition"] == after["redis"]["condition"] == "service_healthy"
        env = services[name]["environment"]
        assert env["DISTILL_STORAGE_BACKEND"] == "s3" and env["DISTILL_S3_ENDPOINT_URL"] == "http://minio:9000"
        assert env["DISTILL_BROKER_URL"].startswith("redis://redis:")
        assert env["DISTILL_DATABASE_URL"].startswith("postgresql+psycopg://")
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert services["worker"]["build"]["target"] == "worker" and services["api"]["build"]["target"] == "api"


def test_compose_has_no_default_passwords() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    for secret in ("POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD"):
        uses = re.findall(r"\$\{" + secret + r"([^}]*)\}", text)
        assert uses and all(u.startswith(":?") for u in uses), (secret, uses)  # required, never defaulted


def test_the_api_image_has_no_torch_and_the_worker_image_pins_the_tested_one() -> None:
    s = stages()
    assert {"api-build", "worker-build", "api", "worker"} <= set(s)
    assert "torch" not in s["api-build"] and "[worker]" not in s["api-build"]
    pinned = re.search(r"TORCH_VERSION=(\S+)", s["worker-build"])
    install = (ROOT / "scripts" / "install.sh").read_text()
    assert pinned and f"torch=={pinned.group(1)}" in install  # the worker image runs what CI tests
    assert "COPY --from=api-build" in s["api"] and "COPY --from=worker-build" in s["worker"]
    assert "USER distill" in s["api"] and "USER distill" in s["worker"]


def test_the_api_image_command_starts_without_torch() -> None:
    cmd = re.search(r'^CMD \[(.*)\]', stages()["api"], flags=re.M)
    assert cmd is not None
    argv = [a.strip().strip('"') for a in cmd.group(1).split(",")]
    assert argv[:2] == ["distill", "serve"] and "--api-only" in argv
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from worker.cli import main\n"
        f"sys.argv = {argv[:2] + ['--help']!r}\n"
        "main()"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    for flag in argv[2:]:
        if flag.startswith("--"):
            assert flag in result.stdout, flag  # every flag the image passes exists
