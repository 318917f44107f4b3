"""The stage supervisor: a child that crashes, hangs or fails costs one attempt, not the worker."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest

from worker.distill.errors import DatasetError, DistillError
from worker.sandbox import Sandbox
from worker.supervisor import StageCrashed, StageError, StageStopped, run_steps

# Steps run in a fresh, sandboxed interpreter, so they are module-level functions it imports by name: the
# sandbox shows it this folder of tests (read-only) besides the project's packages.
SANDBOX = Sandbox("bwrap", extra_ro=(Path(__file__).resolve().parents[1],))
UNCONFINED = Sandbox("off")


def counting_step(work: Path, config: dict, on_progress) -> dict:
    for i in range(3):
        on_progress({"stage": "count", "progress": (i + 1) / 3, "epoch": i, "metrics": {"i": i}})
    (work / "count.txt").write_text(str(config["n"]))
    return {"pid": os.getpid()}


def second_step(work: Path, config: dict, on_progress) -> str:
    return (work / "count.txt").read_text()


def sigkill_self(work: Path, config: dict, on_progress) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def hard_exit(work: Path, config: dict, on_progress) -> None:
    os._exit(3)


def sleep_forever(work: Path, config: dict, on_progress) -> None:
    if config.get("ignore_sigterm"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    (work / "pid").write_text(str(os.getpid()))
    while True:
        on_progress({"stage": "sleep", "progress": 0.0, "epoch": None, "metrics": {}})
        time.sleep(0.1)


def bad_dataset(work: Path, config: dict, on_progress) -> None:
    raise DatasetError("labels out of range: 12 >= 10 classes", field="dataset")


def buggy(work: Path, config: dict, on_progress) -> None:
    raise ValueError("something broke")


def report_environment(work: Path, config: dict, on_progress) -> dict:
    initial = Path("/proc/self/environ").read_bytes().decode(errors="replace")
    return {"environ": dict(os.environ), "initial": initial}


def try_network(work: Path, config: dict, on_progress) -> str:
    with socket.create_server(("127.0.0.1", 0)) as own:  # its own loopback is up: data-parallel ranks use it
        socket.create_connection(own.getsockname(), timeout=2).close()
    try:
        socket.create_connection(("127.0.0.1", config["port"]), timeout=2).close()
        return "connected"
    except OSError as exc:
        return f"refused: {exc}"


def run(steps, tmp_path, config=None, should_stop=lambda: None, sandbox=SANDBOX, **kw):
    messages: list[dict] = []
    result = run_steps(
        steps,
        tmp_path,
        config or {},
        sandbox=sandbox,
        on_message=messages.append,
        should_stop=should_stop,
        **kw,
    )
    return result, messages


def test_steps_run_in_order_in_another_process_and_report_progress(tmp_path):
    result, messages = run([("count", counting_step), ("read", second_step)], tmp_path, {"n": 7})
    assert result["read"] == "7"
    assert result["count"]["pid"] != os.getpid()
    assert [m["name"] for m in messages if m["type"] == "stage"] == ["count", "read"]
    assert [m["event"]["epoch"] for m in messages if m["type"] == "progress"] == [0, 1, 2]


@pytest.mark.parametrize(
    ("step", "code", "exitcode"), [(sigkill_self, "stage_killed", -9), (hard_exit, "stage_crashed", 3)]
)
def test_a_child_that_dies_fails_the_attempt_with_a_clear_code(tmp_path, step, code, exitcode):
    with pytest.raises(StageCrashed) as info:
        run([("die", step)], tmp_path)
    assert info.value.code == code and info.value.exitcode == exitcode
    assert info.value.message


def test_cancel_stops_the_child_within_seconds(tmp_path):
    started = time.monotonic()
    with pytest.raises(StageStopped) as info:
        run(
            [("sleep", sleep_forever)],
            tmp_path,
            should_stop=lambda: "cancelled" if time.monotonic() - started > 1.5 else None,
            stop_check_interval=0.2,
        )
    assert info.value.reason == "cancelled"
    assert time.monotonic() - started < 6
    _assert_gone(tmp_path)


def test_a_child_ignoring_sigterm_is_killed_after_the_grace_time(tmp_path):
    started = time.monotonic()
    with pytest.raises(StageStopped):
        run(
            [("sleep", sleep_forever)],
            tmp_path,
            {"ignore_sigterm": True},
            should_stop=lambda: "cancelled" if time.monotonic() - started > 1.5 else None,
            stop_check_interval=0.2,
            stop_grace=1.0,
        )
    assert time.monotonic() - started < 8
    _assert_gone(tmp_path)


def test_child_errors_come_back_with_their_code(tmp_path):
    with pytest.raises(DistillError) as info:
        run([("preflight", bad_dataset)], tmp_path)
    assert (info.value.code, info.value.field) == ("invalid_dataset", "dataset")
    assert "out of range" in info.value.message
    with pytest.raises(StageError) as other:
        run([("stage", buggy)], tmp_path)
    assert other.value.code == "stage_error" and "ValueError: something broke" in other.value.message
    assert "Traceback" in other.value.detail


def test_the_child_environment_holds_no_credentials(tmp_path, monkeypatch):
    secrets = {
        "DISTILL_DATABASE_URL": "postgresql://u:hunter2@db/x",
        "AWS_SECRET_ACCESS_KEY": "hunter2",
        "AWS_ACCESS_KEY_ID": "AKIA",
        "GITHUB_TOKEN": "ghp_hunter2",
        "S3_PASSWORD": "hunter2",
    }
    for key, value in secrets.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = dict(os.environ)
    result, _ = run([("env", report_environment)], tmp_path)
    assert os.environ == before  # the parent got its environment back
    assert not set(secrets) & set(result["env"]["environ"])
    assert "hunter2" not in result["env"]["initial"]  # not even in the exec-time environment block
    assert result["env"]["environ"]["OMP_NUM_THREADS"] == "1"


@pytest.mark.parametrize("sandbox", [SANDBOX, UNCONFINED], ids=["bwrap", "off"])
def test_the_child_reaches_no_network_but_its_own_loopback(tmp_path, sandbox):
    with socket.socket() as listener:  # a local service the child must not reach
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        socket.create_connection(("127.0.0.1", port), timeout=2).close()  # it is reachable from here
        result, messages = run([("net", try_network)], tmp_path, {"port": port}, sandbox=sandbox)
    assert messages[0]["sandbox"] == sandbox.mode
    if not messages[0]["network_isolated"]:
        assert not sandbox.confined  # bwrap always gives the child its own network namespace
        pytest.skip("no network namespaces here for an unconfined child (needs root or user namespaces)")
    assert result["net"].startswith("refused")


def _assert_gone(work: Path) -> None:
    """No process runs in `work` any more (the sandboxed child's own pid means nothing out here)."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(os.readlink(proc / "cwd")) == work.resolve():
                raise AssertionError(f"stage process {proc.name} still running in {work}")
        except OSError:
            continue
