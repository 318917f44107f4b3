"""`distill local`: the whole core from the shell, JSON report on stdout, errors as `error: <code>: ...`."""

import json

import torch
from tiny_job import PREPROCESS, write_job
from typer.testing import CliRunner

from worker.cli import app

torch.set_num_threads(1)


def test_local_json_prints_the_report_and_writes_the_student(tmp_path):
    teacher, data = write_job(tmp_path / "files")
    work = tmp_path / "work"
    args = [
        "local", "--teacher", str(teacher), "--dataset", str(data), "--out", str(work),
        "--student", "mlp:hidden=16", "--epochs", "4", "--soft-labels", "topk", "--topk", "2",
        "--set", f"preprocess={json.dumps(PREPROCESS)}", "--set", "batch_size=32", "--set", "lr=0.003",
        "--set", 'export_formats=["torchscript"]', "--json",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # stdout holds the JSON document and nothing else
    assert report["student"]["accuracy"] > 0.8 and report["baseline"]["accuracy"] is not None
    chosen = report["hyperparameters"]
    assert (
        chosen["source"] == "auto" and chosen["why"] and chosen["trials"]
    )  # temperature/alpha default to auto
    assert (work / "out" / "student.pt").is_file() and (work / "inputs" / "teacher" / "teacher.pt").is_file()
    assert "distill" in result.stderr  # the progress bar

    again = CliRunner().invoke(app, args)  # same folder, same settings: everything is found done
    assert again.exit_code == 0 and json.loads(again.stdout) == report


def test_local_user_error_exits_non_zero_with_its_code(tmp_path):
    teacher, data = write_job(tmp_path / "files", rows=60)
    args = ["local", "--teacher", str(teacher), "--dataset", str(data), "--out", str(tmp_path / "w")]
    result = CliRunner().invoke(app, [*args, "--student", "cnn:channels=4"])  # needs images, data is flat
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1].startswith("error: invalid_config: cnn: needs image inputs")
    assert result.stdout == ""

    result = CliRunner().invoke(app, [*args, "--set", "epochs=0"])
    assert result.exit_code == 1 and "error: invalid_config: epochs" in result.stderr
