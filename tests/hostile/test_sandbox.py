"""User code is contained: hostile teachers run as real jobs through the worker's task code, in the sandbox.

A TorchScript teacher can call file operators (`torch.save`, `torch.from_file`); the operator check refuses
them at preflight (first test), so the rest run the real stage steps with that check switched off inside
the child (tests/hostile/sandbox_steps.py): what stops them there is the bubblewrap sandbox alone. The
control runs the same writer unconfined and sees its file appear, so the assertions can fail.

The scratch folder is put outside /tmp, as in production (`<data_dir>/scratch`): the sandbox's /tmp is a
folder of the job's own scratch, and a scratch under the host's /tmp would make the rest of /tmp look like a
writable (but private, job-local) place inside the sandbox.
"""

from __future__ import annotations

import dataclasses
import json
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.hostile.sandbox_steps import UNGUARDED_SOFT_LABEL_STEPS
from tests.support import api
from tests.support.api import tiny_job
from tests.support.data import torchscript_bytes
from tests.support.services import Embedded
from worker.sandbox import Sandbox
from worker.tasks.jobs import _hand_to_distill, claim_job, run_claimed, run_soft_label

TESTS = Path(__file__).resolve().parents[1]


class FileWriter(nn.Module):
    """Writes its input to `target` with torch.save (aten::save), then answers like a real classifier."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch.save(x, self.target)
        return self.head(x)


class SharedMapWriter(nn.Module):
    """Maps `target` writable (torch.from_file(shared=True) creates it) and fills it."""

    def __init__(self, target: str) -> None:
        super().__init__()
        self.target = target
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mapped = torch.from_file(self.target, shared=True, size=64, dtype=torch.uint8)
        mapped.fill_(65)
        return self.head(x) + mapped[:3].to(torch.float32) * 0  # used, so the write is not optimized away


class FileReader(nn.Module):
    """The reported exploit: reads `target` and hands its bytes back through everything it can reach: the
    shape of a zero-size output (quoted by shape errors) and, scaled, the logits themselves."""

    def __init__(self, target: str, size: int) -> None:
        super().__init__()
        self.target, self.size = target, size
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        data = torch.from_file(self.target, shared=False, size=self.size, dtype=torch.uint8)
        if x.shape[0] == 2:  # preflight's two samples: leak through the shape error
            leaked: list[int] = data.tolist()
            return torch.zeros([x.shape[0], 0] + leaked)
        return self.head(x) + data[:3].to(torch.float32)


def hostile_job(svc: Embedded, teacher: nn.Module, dataset: tuple[str, bytes]) -> str:
    """A one-epoch job whose teacher is `teacher`, scripted; its id."""
    return api.submit(svc.http, ("teacher.pt", torchscript_bytes(teacher)), dataset, **tiny_job(1))


RunUnguarded = Callable[[str, Sandbox], dict]


@pytest.fixture
def run_unguarded(service: Embedded) -> Iterator[RunUnguarded]:
    """The soft-label task as the worker runs it (claim, inputs, sandboxed child, verdict), with the stage
    steps of sandbox_steps.py; the sandbox also shows the child this tests folder, read-only, to import
    them. The scratch folder lives outside /tmp, as in production."""
    scratch = Path(tempfile.mkdtemp(prefix="distill-sandbox-test-", dir="/var/tmp"))

    def run(job_id: str, sandbox: Sandbox) -> dict:
        confined = dataclasses.replace(sandbox, extra_ro=(TESTS,))
        ctx = dataclasses.replace(service.ctx, sandbox=confined, scratch_root=scratch)
        claim = claim_job(ctx, job_id, ("queued", "soft_labeling"), resumable=("soft_labeling",))
        assert claim is not None
        run_claimed(ctx, claim, "soft_label", UNGUARDED_SOFT_LABEL_STEPS, _hand_to_distill)
        return service.http.get(f"/v1/jobs/{job_id}").json()

    yield run
    shutil.rmtree(scratch, ignore_errors=True)


def everything_the_tenant_sees(svc: Embedded, job_id: str) -> str:
    job = svc.http.get(f"/v1/jobs/{job_id}").json()
    events = svc.http.get(f"/v1/jobs/{job_id}/events").json()
    return json.dumps([job, events])


def assert_no_bytes_of(secret: bytes, text: str) -> None:
    """Neither the bytes as text nor any run of 4+ of them as numbers (decimal, in any separator)."""
    assert secret.decode(errors="ignore")[:8] not in text
    numbers = [int(n) for n in re.findall(r"\d+", text)]
    window = list(secret[:4])
    for i in range(len(numbers) - len(window) + 1):
        assert numbers[i : i + len(window)] != window, f"the secret's bytes leak as numbers at {i}"


@pytest.fixture
def secret_files(service: Embedded) -> dict[str, Path]:
    """What a hostile model wants: the local tenant's key file, the database, another tenant's stored object,
    and /etc/shadow; all readable by the worker itself."""
    key = service.settings.data_dir / "api_key"
    key.write_text(f"dk_{secrets.token_hex(20)}\n")
    other_tenants = ("other.npz", b"PK-other-tenant-" + secrets.token_bytes(64))
    other = api.upload(service.http, "dataset", other_tenants)["id"]
    objects = [p for p in (service.settings.storage_path).rglob("*") if p.is_file()]
    assert objects, other
    found = {"key": key, "database": service.settings.data_dir / "distill.db", "object": objects[0]}
    if Path("/etc/shadow").is_file():
        found["shadow"] = Path("/etc/shadow")
    return found


@pytest.mark.parametrize(
    ("hostile", "operator"),
    [(FileWriter, "aten::save"), (SharedMapWriter, "aten::from_file"), (FileReader, "aten::from_file")],
)
def test_the_operator_check_refuses_file_operators_in_a_real_job(
    service, dataset_bytes, tmp_path, hostile, operator
):
    target = tmp_path / "escaped-by-check.pt"
    target_or_secret = (str(target), 8) if hostile is FileReader else (str(target),)
    job_id = hostile_job(service, hostile(*target_or_secret), dataset_bytes)
    run_soft_label(service.ctx, job_id)
    job = service.http.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"]["code"] == "unsafe_operator", job["error"]
    assert operator in job["error"]["message"]
    assert not target.exists()


@pytest.mark.parametrize("writer", [FileWriter, SharedMapWriter])
def test_a_teacher_cannot_write_outside_its_job_folder(
    service, run_unguarded, dataset_bytes, tmp_path, writer
):
    """TorchScript's aten::save ignores a failed open (the stage goes on: nothing was written anywhere);
    from_file(shared=True) raises, and the job fails with the model's own error."""
    repository = Path(__file__).resolve().parents[2]
    targets = [
        tmp_path / "escaped.bin",
        service.settings.data_dir / "objects" / "planted.bin",
        repository / f"escaped-{secrets.token_hex(4)}.bin",
    ]
    for target in targets:
        job_id = hostile_job(service, writer(str(target)), dataset_bytes)
        job = run_unguarded(job_id, service.ctx.sandbox)
        assert not target.exists()
        if writer is SharedMapWriter:
            assert job["status"] == "failed", job
            # The teacher raised on preflight's first samples: the model's own error, its cause line kept.
            assert job["error"]["code"] == "shape_mismatch", job["error"]
            assert "No such file" in job["error"]["message"] or "Read-only" in job["error"]["message"]
        steps = [e["data"] for e in service.http.get(f"/v1/jobs/{job_id}/events").json()["data"]]
        assert {"step": "preflight", "sandbox": "bwrap", "network_isolated": True} in steps


def test_control_the_same_writer_unconfined_does_write(service, run_unguarded, dataset_bytes, tmp_path):
    """Without the sandbox the hostile writer works: the test above fails if the sandbox does nothing."""
    target = tmp_path / "escaped-unconfined.bin"
    job_id = hostile_job(service, FileWriter(str(target)), dataset_bytes)
    run_unguarded(job_id, Sandbox("off"))
    assert target.exists()


def test_a_teacher_reads_nothing_of_the_worker_and_leaks_no_byte(
    service, run_unguarded, dataset_bytes, secret_files
):
    for name, path in secret_files.items():
        size = min(path.stat().st_size, 47) if path.stat().st_size else 1
        job_id = hostile_job(service, FileReader(str(path), size), dataset_bytes)
        job = run_unguarded(job_id, service.ctx.sandbox)
        assert job["status"] == "failed", (name, job)
        assert "No such file" in job["error"]["message"], (name, job["error"])
        secret = path.read_bytes()[:47] if name != "shadow" else b"root:"  # the test itself may not read it
        assert_no_bytes_of(secret, everything_the_tenant_sees(service, job_id))


def test_the_child_runs_as_nobody_with_no_capabilities(tmp_path):
    from worker.supervisor import run_steps

    result = run_steps(
        [("who", _who)],
        tmp_path,
        {},
        sandbox=Sandbox("bwrap", extra_ro=(TESTS,)),
        on_message=lambda _: None,
        should_stop=lambda: None,
    )
    status = dict(line.split(":\t", 1) for line in result["who"].splitlines() if ":\t" in line)
    assert status["Uid"].split()[0] == "65534" and status["CapEff"].strip("0\n") == ""
    assert status["NoNewPrivs"].strip() == "1"


def _who(work: Path, config: dict, on_progress) -> str:
    return Path("/proc/self/status").read_text()


def test_a_worker_without_bubblewrap_refuses_user_models(service, tmp_path):
    marker = tmp_path / "ran-unconfined"
    ctx = dataclasses.replace(service.ctx, sandbox=Sandbox("bwrap", bwrap=str(tmp_path / "no-bwrap")))
    job_id = hostile_job(service, FileWriter(str(marker)), ("train.npz", b""))
    run_soft_label(ctx, job_id)
    job = service.http.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] in ("queued", "soft_labeling"), job  # handed back for a worker that can sandbox
    failed = [e["data"] for e in service.http.get(f"/v1/jobs/{job_id}/events").json()["data"]]
    failed = [d for d in failed if d.get("code") == "sandbox_unavailable"]
    assert failed and "bubblewrap" in failed[0]["message"] and "DISTILL_SANDBOX=off" in failed[0]["message"]
    assert not marker.exists()


def test_check_sandbox_says_whether_user_models_can_run(tmp_path):
    def check(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "worker.cli", "worker", "--check-sandbox"],
            capture_output=True,
            text=True,
            timeout=120,
            env={"PATH": "/usr/bin:/bin", "DISTILL_DATA_DIR": str(tmp_path), **env},
        )

    ok = check()
    assert ok.returncode == 0 and "sandbox: bwrap" in ok.stderr, ok.stderr
    missing = check(DISTILL_BWRAP_PATH=str(tmp_path / "no-bwrap"))
    assert missing.returncode == 1 and "UNAVAILABLE" in missing.stderr
    off = check(DISTILL_SANDBOX="off")
    assert off.returncode == 0 and "unsafe with more than one tenant" in off.stderr
