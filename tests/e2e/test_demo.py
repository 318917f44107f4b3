"""The README's first command, `distill demo`, on its fallback dataset (scikit-learn's digits, small)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.support.processes import child_env, distill

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_distill_demo_trains_serves_distils_and_prints_the_table(tmp_path: Path):
    result = subprocess.run(
        distill("demo", "--dataset", "digits"), cwd=tmp_path, env=child_env(), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "job took" in out and "KD gain over baseline" in out
    rows = {m[0]: m[1:] for m in re.findall(r"^(teacher|student \(distilled\)) +(\S+)% +(\S+)%", out, re.M)}
    teacher_test, student_test = float(rows["teacher"][1]), float(rows["student (distilled)"][1])
    assert teacher_test > 85 and student_test > 80, out  # ten classes: chance is 10%
    # The KD gain reads like the table: signed, one decimal, the student's val acc less the baseline's (to
    # within the three roundings to one decimal).
    baseline_val = float(re.search(r"^baseline \(hard labels\) +(\S+)%", out, re.M).group(1))
    gain = re.search(r"KD gain over baseline: ([+-]\d+\.\d) points$", out, re.M)
    assert gain, out
    assert abs(float(gain.group(1)) - (float(rows["student (distilled)"][0]) - baseline_val)) < 0.16, out
    assert (tmp_path / ".distill" / "demo" / "student.pt").is_file()
    assert "succeeded" in result.stderr  # progress was shown while it ran
    # The background server is gone: nothing listens on the port it announced.
    port = int(re.search(r"on port (\d+)", result.stderr).group(1))
    import socket

    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
