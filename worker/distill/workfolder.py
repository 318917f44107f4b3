"""The work folder: its layout, the local copy of a job's inputs, the small JSON and weight files of stages.

work/inputs/{teacher,dataset,validation,student_init}/<file>
work/soft_labels/  work/checkpoints/  work/out/     (what each holds: pipeline.py)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from worker.distill.softlabels import sha256_file

SLOTS = ("teacher", "dataset", "validation", "student_init")


@dataclass(frozen=True)
class Work:
    root: Path

    def inputs(self, slot: str) -> Path:
        return Path(self.root) / "inputs" / slot

    @property
    def soft_labels(self) -> Path:
        return Path(self.root) / "soft_labels"

    @property
    def checkpoints(self) -> Path:
        return Path(self.root) / "checkpoints"

    @property
    def out(self) -> Path:
        return Path(self.root) / "out"

    def input_files(self, slot: str) -> list[Path]:
        folder = self.inputs(slot)
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def prepare_inputs(
    work: Path,
    *,
    teachers: list[Path],
    dataset: Path,
    validation: Path | None = None,
    student_init: Path | None = None,
) -> None:
    """Copy local files into `work/inputs/<slot>/` as the service's worker does; unchanged copies are kept."""
    w = Work(Path(work))
    wanted: dict[str, list[tuple[str, Path]]] = {
        "teacher": [
            (f"{i:02d}-{p.name}" if len(teachers) > 1 else p.name, Path(p)) for i, p in enumerate(teachers)
        ],
        "dataset": [(dataset.name, Path(dataset))],
        "validation": [(validation.name, Path(validation))] if validation else [],
        "student_init": [(student_init.name, Path(student_init))] if student_init else [],
    }
    for slot, files in wanted.items():
        folder = w.inputs(slot)
        names = {name for name, _ in files}
        for stale in w.input_files(slot):
            if stale.name not in names:
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        for name, source in files:
            target = folder / name
            folder.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                if target.exists():
                    shutil.rmtree(target)
                shutil.copytree(source, target)
            elif not (target.is_file() and _same_file(source, target)):
                shutil.copyfile(source, folder / f".{name}.tmp")
                os.replace(folder / f".{name}.tmp", target)


def _same_file(a: Path, b: Path) -> bool:
    return a.stat().st_size == b.stat().st_size and sha256_file(a) == sha256_file(b)


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=float))
    os.replace(tmp, path)


def save_weights(module: nn.Module, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, tmp)
    tmp.replace(path)
