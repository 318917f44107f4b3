"""`distill local`: the whole core on local files, no server: teacher + data in, student + report out.

`--out DIR` is the work folder (docs/architecture.md): the inputs are copied under DIR/inputs, the student
lands in DIR/out, and running the same command again resumes where it stopped. A user error prints
`error: <code>: <message>` and exits 1; `--json` prints the final report as one JSON document on stdout.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

EXIT_USER_ERROR = 1


def _number_or_auto(value: str | None, name: str) -> float | str | None:
    if value is None or value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r}: expected a number or 'auto'", param_hint=f"--{name}") from None


def _pairs(items: list[str]) -> dict[str, Any]:
    """`key=value` settings; values parse as JSON when they can (`lr=0.01`, `preprocess={"scale":1}`)."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise typer.BadParameter(f"{item!r}: expected key=value", param_hint="--set")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


class _Progress:
    """One tqdm bar on stderr, restarted for each stage."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bar: Any = None  # a tqdm bar (tqdm has no type information)
        self.stage: str | None = None

    def __call__(self, event: dict[str, Any]) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if event["stage"] != self.stage:
            self.close()
            self.stage = event["stage"]
            self.bar = tqdm(total=100, desc=self.stage, file=sys.stderr, unit="%", leave=True)
        metrics = {k: v for k, v in (event.get("metrics") or {}).items() if isinstance(v, (int, float, str))}
        if event.get("epoch") is not None:
            metrics = {"epoch": event["epoch"], **metrics}
        self.bar.set_postfix(
            {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in list(metrics.items())[:5]}
        )
        self.bar.update(round(100 * float(event["progress"])) - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def local(
    teacher: Annotated[list[Path], typer.Option(help="teacher file; repeat for an ensemble", exists=True)],
    dataset: Annotated[
        Path, typer.Option(help="training data: npz, csv, parquet, image zip/tar, idx", exists=True)
    ],
    out: Annotated[Path, typer.Option(help="work folder; the student lands in OUT/out")],
    student: Annotated[str | None, typer.Option(help="student spec (default mlp:hidden=128)")] = None,
    val_dataset: Annotated[
        Path | None, typer.Option(help="validation data (else a seeded holdout)", exists=True)
    ] = None,
    student_init: Annotated[
        Path | None, typer.Option(help="TorchScript module to start from", exists=True)
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(help="auto (default: hinton or dist, chosen on validation), hinton, soft_target, "
                     "mse_logits, dkd, dist"),
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="default 10")] = None,
    temperature: Annotated[str | None, typer.Option(help="number or auto (default)")] = None,
    alpha: Annotated[str | None, typer.Option(help="number in [0,1] or auto (default)")] = None,
    soft_labels: Annotated[str | None, typer.Option(help="full (default) or topk")] = None,
    topk: Annotated[
        int | None, typer.Option(help="classes kept per row with --soft-labels topk (default 5)")
    ] = None,
    finetune_epochs: Annotated[
        int | None, typer.Option(help="hard-label epochs after distilling (default 0)")
    ] = None,
    no_baseline: Annotated[bool, typer.Option("--no-baseline", help="skip the hard-label baseline")] = False,
    seed: Annotated[int | None, typer.Option(help="default 0")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="other setting, key=value (JSON value)")] = [],  # noqa: B006
    as_json: Annotated[bool, typer.Option("--json", help="print the final report as JSON on stdout")] = False,
    progress: Annotated[bool, typer.Option(help="progress bar on stderr")] = True,
) -> None:
    """Distil TEACHER into a small student on DATASET, evaluate it and export it, all locally."""
    from worker.distill.config import DistillConfig
    from worker.distill.errors import DistillError
    from worker.distill.pipeline import prepare_inputs, run_all

    named = {
        "student": student, "method": method, "epochs": epochs, "seed": seed,
        "temperature": _number_or_auto(temperature, "temperature"), "alpha": _number_or_auto(alpha, "alpha"),
        "soft_label_format": soft_labels, "topk": topk, "finetune_epochs": finetune_epochs,
        "baseline": False if no_baseline else None,
    }  # fmt: skip
    # A flag given on the command line wins over --set; one left out leaves --set or the config default.
    settings = _pairs(set_) | {k: v for k, v in named.items() if v is not None}
    bar = _Progress(progress)
    try:
        config = DistillConfig.from_dict(settings)
        prepare_inputs(
            out, teachers=teacher, dataset=dataset, validation=val_dataset, student_init=student_init
        )
        # Libraries that print to stdout (exporters) must not corrupt the JSON document.
        with contextlib.redirect_stdout(sys.stderr):
            report = run_all(out, config, bar)
    except DistillError as exc:
        bar.close()
        typer.echo(f"error: {exc.code}: {exc.message}", err=True)
        raise typer.Exit(EXIT_USER_ERROR) from None
    bar.close()
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
    else:
        typer.echo(_summary(report, out))


def _summary(report: dict[str, Any], out: Path) -> str:
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.2f}%"

    t, s, b = report["teacher"], report["student"], report.get("baseline") or {}
    hp = report["hyperparameters"]
    lines = [
        f"teacher accuracy   {pct(t.get('accuracy'))}",
        f"student accuracy   {pct(s.get('accuracy'))}  (agreement with teacher {pct(s.get('agreement'))})",
    ]
    if b:
        lines.append(
            f"baseline accuracy  {pct(b.get('accuracy'))}  (KD gain {_points(report.get('kd_gain_points'))})"
        )
    if report.get("speedup"):
        ratio = report.get("compression") or 0
        lines.append(
            f"CPU speed-up       {report['speedup']:.1f}x  (teacher/student parameters {ratio:.1f}x)"
        )
    lines.append(f"{hp.get('method')} T={hp.get('temperature')} alpha={hp.get('alpha')}: {hp.get('why', '')}")
    lines.append(f"student: {out / 'out'}")
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    app.command("local")(local)


def _points(value: object) -> str:
    """Percentage points as the accuracies beside them read: two decimals, signed."""
    return f"{value:+.2f} points" if isinstance(value, (int, float)) else "-"
