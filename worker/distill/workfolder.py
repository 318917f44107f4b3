"""The work folder's layout, its inputs loaded and checked, and the small JSON state the stages share.

Every stage starts with `load_inputs`: it reads teacher and data from `inputs/`, applies the preprocessing,
and runs two samples through teacher and a fresh student (the preflight), so each stage fails fast on its own
and needs nothing in memory from the one before.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from worker.distill.config import DistillConfig
from worker.distill.data import load_dataset, split_validation, validate_dataset
from worker.distill.errors import DatasetError, DistillError, TeacherError
from worker.distill.evaluate import count_parameters
from worker.distill.preprocess import PreprocessModule
from worker.distill.softlabels import load_soft_labels, read_manifest, sha256_file
from worker.distill.students import build_student, load_student_init
from worker.distill.teachers import Teacher, check_compatible, load_teacher

SLOTS = ("teacher", "dataset", "validation", "student_init")
RAW_SAMPLE = 256


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


def _digest(paths: list[Path]) -> str:
    """sha256 of one file as is; of several files or folders, over their relative names and digests."""
    files = [(p.name, p) for p in paths if p.is_file()]
    for folder in (p for p in paths if p.is_dir()):
        files += [(str(f.relative_to(folder.parent)), f) for f in sorted(folder.rglob("*")) if f.is_file()]
    if len(files) == 1:
        return sha256_file(files[0][1])
    return hashlib.sha256("".join(f"{n}:{sha256_file(f)}\n" for n, f in sorted(files)).encode()).hexdigest()


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=float))
    os.replace(tmp, path)


@dataclass
class Loaded:
    """Teacher and data of one job, checked against each other; x tensors are preprocessed float32."""

    teacher: Teacher
    teacher_paths: list[Path]
    teacher_sha256: str
    dataset_sha256: str
    preprocess: PreprocessModule
    x: torch.Tensor
    y: torch.Tensor
    x_val: torch.Tensor | None
    y_val: torch.Tensor | None
    raw_sample: torch.Tensor  # up to 256 rows as given (validation first): latency and export checks
    input_shape: tuple[int, ...]
    num_classes: int
    class_names: list[str] | None
    student_init: Path | None

    @property
    def has_val(self) -> bool:
        return self.x_val is not None

    def summary(self, student: nn.Module | None = None) -> dict[str, Any]:
        labelled = int((self.y >= 0).sum())
        return {
            "teacher": {
                "format": self.teacher.format,
                "sha256": self.teacher_sha256,
                "files": len(self.teacher_paths),
            },
            "dataset": {
                "sha256": self.dataset_sha256,
                "train_rows": len(self.y),
                "labelled_rows": labelled,
                "val_rows": 0 if self.y_val is None else len(self.y_val),
            },
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "student_parameters": count_parameters(student) if student is not None else None,
        }


def _preprocessed(pre: PreprocessModule, x: np.ndarray, chunk: int = 65536) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([pre(torch.from_numpy(x[i : i + chunk])) for i in range(0, len(x), chunk)])


def load_inputs(work: Work, config: DistillConfig) -> tuple[Loaded, nn.Module]:
    """Load and cross-check teacher, data and a fresh student (seeded); errors name what is wrong."""
    teacher_paths = work.input_files("teacher")
    if not teacher_paths:
        raise TeacherError(
            f"no teacher file in {work.inputs('teacher')}", code="teacher_not_found", field="teacher"
        )
    dataset_paths = work.input_files("dataset")
    if len(dataset_paths) != 1:
        raise DatasetError(
            f"expected one dataset in {work.inputs('dataset')}, found {len(dataset_paths)}",
            code="dataset_not_found",
            field="dataset",
        )
    val_paths = work.input_files("validation")
    data = load_dataset(dataset_paths[0], config, val_path=val_paths[0] if val_paths else None)
    teacher = load_teacher(teacher_paths, config, input_shape=data.feature_shape)
    data = split_validation(data, config.val_fraction, config.seed)
    pre = PreprocessModule.from_config(config.preprocess)
    x = _preprocessed(pre, data.x)
    init = work.input_files("student_init")
    loaded = Loaded(
        teacher=teacher,
        teacher_paths=teacher_paths,
        teacher_sha256=teacher.sha256,
        dataset_sha256=_digest(dataset_paths + val_paths),
        preprocess=pre,
        x=x,
        y=torch.from_numpy(data.y),
        x_val=None if data.x_val is None else _preprocessed(pre, data.x_val),
        y_val=None if data.y_val is None else torch.from_numpy(data.y_val),
        raw_sample=torch.from_numpy((data.x if data.x_val is None else data.x_val)[:RAW_SAMPLE].copy()),
        input_shape=data.feature_shape,
        num_classes=0,
        class_names=data.class_names,
        student_init=init[0] if init else None,
    )
    # The teacher's output size is authoritative: learn it on real rows, then check the labels against it.
    loaded.num_classes = int(teacher.checked_logits(x[:2]).shape[1])
    validate_dataset(data, num_classes=loaded.num_classes)
    student = new_student(loaded, config)
    check_compatible(teacher, student, x[:2])
    return loaded, student


def new_student(loaded: Loaded, config: DistillConfig) -> nn.Module:
    """The untrained student: the same weights for the same seed, so the baseline starts where KD started."""
    torch.manual_seed(config.seed)
    if loaded.student_init is not None:
        return load_student_init(loaded.student_init, loaded.num_classes, loaded.input_shape)
    return build_student(config.student, loaded.input_shape, loaded.num_classes)


def teacher_parameters(teacher: Teacher, paths: list[Path]) -> int | None:
    """Parameters of a module teacher, initializer values of an ONNX one; an ensemble sums its members."""
    members = getattr(teacher, "members", None) or [teacher]
    total = 0
    for member, path in zip(members, paths, strict=True):
        module = getattr(member, "module", None)
        if isinstance(module, nn.Module):
            total += count_parameters(module)
        elif member.format == "onnx":
            import onnx

            graph = onnx.load(str(path), load_external_data=False).graph
            total += sum(math.prod(t.dims) for t in graph.initializer)
        else:
            return None
    return total


def fingerprint(loaded: Loaded, config: DistillConfig) -> str:
    """What the trained student depends on (soft labels follow from these); export settings are left out."""
    settings = {k: v for k, v in config.to_dict().items() if k != "export_formats"}
    key: list[Any] = [loaded.teacher_sha256, loaded.dataset_sha256, settings]
    if loaded.student_init is not None:
        key.append(sha256_file(loaded.student_init))
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def stored_soft_labels(w: Work, loaded: Loaded, config: DistillConfig, split: str) -> torch.Tensor:
    manifest = read_manifest(w.soft_labels)
    """The teacher's stored logits (N, C) for `split`, if they were made from these inputs and settings."""
    wanted = {"teacher_sha256": loaded.teacher_sha256, "dataset_sha256": loaded.dataset_sha256,
              "format": config.soft_label_format}  # fmt: skip
    if config.soft_label_format == "topk":
        wanted["k"] = min(config.topk, loaded.num_classes)
    if not manifest or any(manifest.get(key) != value for key, value in wanted.items()):
        raise DistillError(
            "soft labels are missing or from other inputs: run soft_label first", code="soft_labels_missing"
        )
    return load_soft_labels(w.soft_labels, split, manifest=manifest)


def save_weights(module: nn.Module, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, tmp)
    tmp.replace(path)


def load_weights(loaded: Loaded, config: DistillConfig, path: Path) -> nn.Module:
    if not path.is_file():
        raise DistillError(f"{path.name} is missing: run the distill stage first", code="student_missing")
    student = new_student(loaded, config)
    student.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return student.eval()
