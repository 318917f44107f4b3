"""Where the CLI finds the server and key: flags, then environment, then the config file, then the key
`distill serve` wrote under ./.distill; and what it prints and returns when there is none."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from app.client.config import DEFAULT_URL, MissingApiKey, resolve
from tests.support.processes import ROOT, child_env


@pytest.fixture
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in ("DISTILL_URL", "DISTILL_API_KEY", "DISTILL_CONFIG", "DISTILL_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_flags_beat_environment_beat_config_file_beat_embedded_key(clean_env: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    (clean_env / ".distill").mkdir()
    (clean_env / ".distill" / "api_key").write_text("embedded-key\n")
    assert resolve() == resolve(DEFAULT_URL, "embedded-key")

    config = clean_env / "xdg" / "distill" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('url = "http://files.example:9000/"\napi_key = "file-key"\n')
    assert (resolve().url, resolve().api_key) == ("http://files.example:9000", "file-key")

    monkeypatch.setenv("DISTILL_URL", "http://env.example")
    monkeypatch.setenv("DISTILL_API_KEY", "env-key")
    assert (resolve().url, resolve().api_key) == ("http://env.example", "env-key")
    assert (resolve("http://flag.example", "flag-key").api_key) == "flag-key"


def test_no_key_anywhere_is_a_clear_error(clean_env: Path) -> None:
    with pytest.raises(MissingApiKey) as err:
        resolve()
    assert err.value.code == "missing_api_key" and "DISTILL_API_KEY" in err.value.message


def test_cli_prints_the_error_code_and_exits_non_zero(clean_env: Path) -> None:
    env = {k: v for k, v in child_env().items() if k not in ("DISTILL_URL", "DISTILL_API_KEY")}
    env["XDG_CONFIG_HOME"] = str(clean_env / "xdg")
    run = subprocess.run([sys.executable, "-m", "worker.cli", "status", "job_x", "--json"], cwd=clean_env,
                         env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert "error: missing_api_key:" in run.stderr
    assert '"code": "missing_api_key"' in run.stdout
