"""One job's inputs loaded and cross-checked: teacher, data, preprocessing, and a fresh student.

Every stage starts with `load_inputs`: it reads teacher and data from `inputs/`, applies the preprocessing,
and runs two samples through teacher and a fresh student (the preflight), so each stage fails fast on its own
and needs nothing in memory from the one before. A stage child runs several stages of one job in turn
(distill, evaluate, export), so the last load is kept for the next call with the same work folder, settings
and input files (each file's size, mtime and inode: a replaced or rewritten file loads again).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from worker.distill.augment import VIEW_PARAMS, view_params_name, view_split
from worker.distill.config import DistillConfig
from worker.distill.data import (
    holdout_rows,
    load_dataset,
    split_validation,
    validate_dataset,
    validate_labels,
)
from worker.distill.data_formats import translate_labels
from worker.distill.errors import ConfigError, DatasetError, DistillError, MismatchError, TeacherError
from worker.distill.evaluate import count_parameters
from worker.distill.image_stream import open_image_stream
from worker.distill.preprocess import PreprocessModule
from worker.distill.softlabels import load_soft_labels, load_sparse_soft_labels, read_manifest, sha256_file
from worker.distill.streams import RowStream, StreamedData
from worker.distill.students import build_student, load_student_init
from worker.distill.table_stream import (
    npz_should_stream,
    open_npz_stream,
    open_table_stream,
    table_should_stream,
)
from worker.distill.teachers import Teacher, check_compatible, load_teacher
from worker.distill.text_cls_data import TextStats, check_text_dataset, load_text_classification
from worker.distill.text_students import TEXT_STUDENTS, build_text_student, is_text_student
from worker.distill.text_teachers import TextTeacher, encode_texts, is_text_teacher, load_text_teachers
from worker.distill.train import Targets, Views
from worker.distill.workfolder import SLOTS, Work

RAW_SAMPLE = 256
STREAM_CACHE = ".stream"  # under the work folder: a streamed table's memory-mapped rows


@dataclass(frozen=True)
class TextInputs:
    """What a text classifier adds: its teacher (tokenizer, pad id, labels), the tokenization's counts and
    a few raw texts (latency is measured per text, tokenization included)."""

    teacher: TextTeacher
    stats: TextStats
    sample_texts: list[str]


@dataclass(frozen=True)
class Loaded:
    """Teacher and data of one job, checked against each other; x tensors are preprocessed float32.

    Shared by the stages of a job that run in one process: read it, never change it (a stage that moves
    the teacher to a GPU moves it back).
    """

    teacher: Teacher
    teacher_paths: list[Path]
    teacher_sha256: str
    dataset_sha256: str
    preprocess: PreprocessModule
    x: torch.Tensor | RowStream  # a stream: rows read a batch at a time (streams.py)
    y: torch.Tensor
    x_val: torch.Tensor | RowStream | None
    y_val: torch.Tensor | None
    raw_sample: torch.Tensor  # up to 256 rows as given (validation first): latency and export checks
    input_shape: tuple[int, ...]
    num_classes: int
    class_names: list[str] | None
    student_init: Path | None
    text: TextInputs | None = None  # a text classifier's; x then holds int64 token ids (N, L)

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
            **({"text": self.text.stats.as_dict()} if self.text is not None else {}),
        }


@dataclass(frozen=True)
class _LoadKey:
    root: Path
    settings: str  # the whole config as canonical JSON: any setting may change what loads
    files: tuple[tuple[str, int, int, int], ...]  # (path, size, mtime_ns, inode) of every input entry


# At most one entry: a process serves one job at a time, and a second job's tensors would double its memory.
_last_load: dict[_LoadKey, Loaded] = {}


def load_inputs(work: Work, config: DistillConfig) -> tuple[Loaded, nn.Module]:
    """Load and cross-check teacher, data and a fresh student (seeded); errors name what is wrong.

    A second call with the same inputs and settings returns the kept Loaded and a new student (stages
    train theirs in place); the global RNG ends in the same state either way (new_student seeds it).
    """
    key = _load_key(work, config)
    if key in _last_load:
        loaded = _last_load[key]
        return loaded, new_student(loaded, config)
    _last_load.clear()  # before loading: the previous job's tensors can go while the new ones arrive
    loaded, student = _load(work, config)
    _last_load[key] = loaded
    return loaded, student


def forget_loaded_inputs() -> None:
    """Drop the kept load and its tensors (a long-lived process between jobs; tests)."""
    _last_load.clear()


def _load_key(work: Work, config: DistillConfig) -> _LoadKey:
    entries = []
    for slot in SLOTS:
        for path in work.input_files(slot):
            for entry in [path, *(sorted(path.rglob("*")) if path.is_dir() else [])]:
                stat = entry.stat()
                entries.append((str(entry), stat.st_size, stat.st_mtime_ns, stat.st_ino))
    settings = json.dumps(config.to_dict(), sort_keys=True, default=str)
    return _LoadKey(Path(work.root).resolve(), settings, tuple(entries))


def _load(work: Work, config: DistillConfig) -> tuple[Loaded, nn.Module]:
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
    if any(is_text_teacher(p) for p in teacher_paths):
        if config.augment is not None:
            raise ConfigError("augment applies to images; this job's teacher reads text", field="augment")
        return _load_text(work, config, teacher_paths, dataset_paths[0], val_paths)
    if is_text_student(config.student):
        raise ConfigError(
            f"student {config.student.partition(':')[0]!r} reads text: it needs a transformer teacher (a "
            "Hugging Face sequence-classification folder, or an ONNX classifier with its tokenizer.json, "
            "in one archive) and a dataset with a text column",
            field="student",
        )
    val_path = val_paths[0] if val_paths else None
    streamed = open_image_stream(dataset_paths[0], val_path=val_path, streaming=config.streaming)
    if streamed is not None:
        return _load_streamed(work, config, teacher_paths, dataset_paths + val_paths, streamed)
    if val_path is None and npz_should_stream(dataset_paths[0], config.streaming):
        mapped = open_npz_stream(dataset_paths[0])
        return _load_streamed(work, config, teacher_paths, dataset_paths, mapped)
    if table_should_stream(dataset_paths[0], config.streaming, config.label_column):
        cache = Path(work.root) / STREAM_CACHE
        table = open_table_stream(dataset_paths[0], config.label_column, cache)
        if val_path is not None:
            table = _with_validation(table, open_table_stream(val_path, config.label_column, cache))
        return _load_streamed(work, config, teacher_paths, dataset_paths + val_paths, table)
    data = load_dataset(dataset_paths[0], config, val_path=val_path)
    teacher = load_teacher(teacher_paths, config, input_shape=data.feature_shape)
    data = split_validation(data, config.val_fraction, config.seed)
    pre = PreprocessModule.from_config(config.preprocess)
    if config.augment is not None and len(data.feature_shape) != 3:
        raise ConfigError(
            f"augment applies to images (rows of C x H x W); this dataset's rows have shape "
            f"{tuple(data.feature_shape)}",
            field="augment",
        )
    x = _preprocessed(pre, data.x)
    # The teacher's output size is authoritative: learn it on real rows, then check the labels against it.
    num_classes = int(teacher.checked_logits(x[:2]).shape[1])
    validate_dataset(data, num_classes=num_classes)
    init = work.input_files("student_init")
    loaded = Loaded(
        teacher=teacher,
        teacher_paths=teacher_paths,
        teacher_sha256=teacher.sha256,
        dataset_sha256=_views_digest(_digest(dataset_paths + val_paths), config),
        preprocess=pre,
        x=x,
        y=torch.from_numpy(data.y),
        x_val=None if data.x_val is None else _preprocessed(pre, data.x_val),
        y_val=None if data.y_val is None else torch.from_numpy(data.y_val),
        raw_sample=torch.from_numpy((data.x if data.x_val is None else data.x_val)[:RAW_SAMPLE].copy()),
        input_shape=data.feature_shape,
        num_classes=num_classes,
        class_names=data.class_names,
        student_init=init[0] if init else None,
    )
    student = new_student(loaded, config)
    check_compatible(teacher, student, x[:2])
    return loaded, student


def _with_validation(data: StreamedData, val: StreamedData) -> StreamedData:
    """A separate validation table for a streamed one: the same columns; class names mapped by name."""
    if val.feature_shape != data.feature_shape:
        raise DatasetError(
            f"validation rows have shape {val.feature_shape}, training rows {data.feature_shape}",
            code="val_shape_mismatch",
            field="x_val",
        )
    y_val = translate_labels(val.y, val.class_names, data.class_names)
    return dataclasses.replace(data, x_val=val.x, y_val=y_val)


def _load_streamed(
    work: Work, config: DistillConfig, teacher_paths: list[Path], files: list[Path], data: StreamedData
) -> tuple[Loaded, nn.Module]:
    """An image dataset read a batch at a time (image_stream.py): the same checks, split and preprocessing
    as the in-memory path, on an index instead of decoded rows."""
    if config.augment is not None and len(data.feature_shape) != 3:
        raise ConfigError(
            f"augment applies to images (rows of C x H x W); this dataset's rows have shape "
            f"{tuple(data.feature_shape)}",
            field="augment",
        )
    teacher = load_teacher(teacher_paths, config, input_shape=data.feature_shape)
    if data.x_val is None and config.val_fraction > 0:
        val_rows = holdout_rows(data.y, config.val_fraction, config.seed)
        keep = np.ones(len(data.y), bool)
        keep[val_rows] = False
        train_rows = np.flatnonzero(keep)
        data = dataclasses.replace(
            data, x=data.x[train_rows], y=data.y[train_rows], x_val=data.x[val_rows], y_val=data.y[val_rows]
        )
    pre = PreprocessModule.from_config(config.preprocess)
    x = data.x.with_transform(pre)
    first = x.decode(slice(0, 2))
    num_classes = int(teacher.checked_logits(first).shape[1])
    validate_labels(data.y, "y", num_classes)
    if data.y_val is not None:
        validate_labels(data.y_val, "y_val", num_classes)
    if data.class_names and len(data.class_names) != num_classes:
        raise MismatchError(
            f"the dataset names {len(data.class_names)} classes but the teacher outputs {num_classes}",
            code="class_count_mismatch",
            field="y",
        )
    init = work.input_files("student_init")
    loaded = Loaded(
        teacher=teacher,
        teacher_paths=teacher_paths,
        teacher_sha256=teacher.sha256,
        dataset_sha256=_views_digest(_digest(files), config),
        preprocess=pre,
        x=x,
        y=torch.from_numpy(data.y),
        x_val=None if data.x_val is None else data.x_val.with_transform(pre),
        y_val=None if data.y_val is None else torch.from_numpy(data.y_val),
        raw_sample=(data.x if data.x_val is None else data.x_val).raw(slice(0, RAW_SAMPLE)),
        input_shape=data.feature_shape,
        num_classes=num_classes,
        class_names=data.class_names,
        student_init=init[0] if init else None,
    )
    student = new_student(loaded, config)
    check_compatible(teacher, student, first)
    return loaded, student


def _load_text(
    work: Work, config: DistillConfig, teacher_paths: list[Path], dataset: Path, val_paths: list[Path]
) -> tuple[Loaded, nn.Module]:
    """A text classifier's inputs: the texts tokenized with the teacher's tokenizer, token ids as x."""
    if not all(is_text_teacher(p) for p in teacher_paths):
        raise TeacherError(
            "an ensemble mixes text teachers with other kinds; every member must read the same texts",
            code="ensemble_mixed",
            field="teacher",
        )
    if not is_text_student(config.student):
        raise ConfigError(
            f"a text teacher needs a text student ({', '.join(TEXT_STUDENTS.names())}), "
            f"not {config.student.partition(':')[0]!r}",
            field="student",
        )
    if work.input_files("student_init"):
        raise ConfigError(
            "student_init is not supported for text students yet (use teacher_layers to start from the "
            "teacher's own layers)",
            code="invalid_student_init",
            field="student_init",
        )
    folder = Path(work.root) / ".text" / "teacher"
    shutil.rmtree(folder, ignore_errors=True)  # afresh: a stale extraction never loads
    teacher = load_text_teachers(teacher_paths, folder)
    data, stats, texts = load_text_classification(
        dataset,
        teacher,
        text_column=config.text_column,
        label_column=config.label_column,
        max_length=config.max_length,
        val_path=val_paths[0] if val_paths else None,
        encode_texts=encode_texts,
    )
    data = split_validation(data, config.val_fraction, config.seed)
    x = torch.from_numpy(data.x)
    num_classes = int(teacher.checked_logits(x[:2]).shape[1])
    check_text_dataset(data, num_classes)
    x_val = None if data.x_val is None else torch.from_numpy(data.x_val)
    loaded = Loaded(
        teacher=teacher,
        teacher_paths=teacher_paths,
        teacher_sha256=teacher.sha256,
        # The token ids, not only the file, are what the teacher saw: the text settings are part of them.
        dataset_sha256=_text_digest(_digest([dataset, *val_paths]), config),
        preprocess=PreprocessModule(),  # identity: token ids are never scaled
        x=x,
        y=torch.from_numpy(data.y),
        x_val=x_val,
        y_val=None if data.y_val is None else torch.from_numpy(data.y_val),
        raw_sample=(x if x_val is None else x_val)[:RAW_SAMPLE].clone(),
        input_shape=(int(x.shape[1]),),
        num_classes=num_classes,
        class_names=data.class_names,
        student_init=None,
        text=TextInputs(teacher, stats, texts[:RAW_SAMPLE]),
    )
    student = new_student(loaded, config)
    check_compatible(teacher, student, x[:2])
    return loaded, student


def _text_digest(files_sha256: str, config: DistillConfig) -> str:
    key = json.dumps([files_sha256, config.text_column, config.max_length])
    return hashlib.sha256(key.encode()).hexdigest()


def _views_digest(files_sha256: str, config: DistillConfig) -> str:
    """With `augment`, the stored views depend on its settings too: their soft labels are keyed by them."""
    if config.augment is None:
        return files_sha256
    key = json.dumps([files_sha256, config.augment, config.views], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()


def _preprocessed(pre: PreprocessModule, x: np.ndarray, chunk: int = 65536) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([pre(torch.from_numpy(x[i : i + chunk])) for i in range(0, len(x), chunk)])


def _digest(paths: list[Path]) -> str:
    """sha256 of one file as is; of several files or folders, over their relative names and digests."""
    files = [(p.name, p) for p in paths if p.is_file()]
    for folder in (p for p in paths if p.is_dir()):
        files += [(str(f.relative_to(folder.parent)), f) for f in sorted(folder.rglob("*")) if f.is_file()]
    if len(files) == 1:
        return sha256_file(files[0][1])
    return hashlib.sha256("".join(f"{n}:{sha256_file(f)}\n" for n, f in sorted(files)).encode()).hexdigest()


def new_student(loaded: Loaded, config: DistillConfig) -> nn.Module:
    """The untrained student: the same weights for the same seed, so the baseline starts where KD started."""
    torch.manual_seed(config.seed)
    if loaded.text is not None:
        return build_text_student(config.student, loaded.text.teacher, loaded.num_classes)[0]
    if loaded.student_init is not None:
        return load_student_init(loaded.student_init, loaded.num_classes, loaded.input_shape)
    return build_student(config.student, loaded.input_shape, loaded.num_classes)


def teacher_parameters(teacher: Teacher, paths: list[Path]) -> int | None:
    """Parameters of a module teacher, initializer values of an ONNX one; an ensemble sums its members."""
    members = getattr(teacher, "members", None) or [teacher]
    total = 0
    if members[0].format in ("hf_text", "onnx_text"):  # archives: counted as loaded (ONNX ones: unknown)
        models = [getattr(m, "model", None) for m in members]
        if not all(isinstance(m, nn.Module) for m in models):
            return None
        return sum(count_parameters(m) for m in models if isinstance(m, nn.Module))
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
    """The teacher's stored logits (N, C) for `split`, if they were made from these inputs and settings."""
    found = _stored(w, loaded, config, split, sparse=False)
    assert isinstance(found, torch.Tensor)
    return found


def stored_targets(w: Work, loaded: Loaded, config: DistillConfig, split: str) -> Targets:
    """The same logits as stored: top-k ones stay sparse (train.py makes each batch dense)."""
    return _stored(w, loaded, config, split, sparse=True)


def _stored(w: Work, loaded: Loaded, config: DistillConfig, split: str, *, sparse: bool) -> Targets:
    manifest = read_manifest(w.soft_labels)
    wanted: dict[str, Any] = {
        "teacher_sha256": loaded.teacher_sha256,
        "dataset_sha256": loaded.dataset_sha256,
        "format": config.soft_label_format,
    }
    if config.soft_label_format == "topk":
        wanted["k"] = min(config.topk, loaded.num_classes)
    if not manifest or any(manifest.get(key) != value for key, value in wanted.items()):
        raise DistillError(
            "soft labels are missing or from other inputs: run soft_label first", code="soft_labels_missing"
        )
    if sparse:
        return load_sparse_soft_labels(w.soft_labels, split, manifest=manifest)
    return load_soft_labels(w.soft_labels, split, manifest=manifest)


def stored_views(w: Work, loaded: Loaded, config: DistillConfig) -> Views | None:
    """The augmented views of the training rows the soft-label stage stored (params and teacher logits), or
    None without `augment`."""
    if config.augment is None:
        return None
    params: list[torch.Tensor] = []
    logits: list[Targets] = []
    for view in range(config.views):
        path = w.soft_labels / view_params_name(view)
        found = np.load(path, allow_pickle=False) if path.is_file() else None
        if found is None or found.shape != (len(loaded.y), VIEW_PARAMS):
            raise DistillError(
                f"the parameters of view {view} are missing or for other rows: run soft_label first",
                code="soft_labels_missing",
            )
        params.append(torch.from_numpy(found))
        logits.append(stored_targets(w, loaded, config, view_split(view)))
    return Views(torch.stack(params), logits)


def load_weights(loaded: Loaded, config: DistillConfig, path: Path) -> nn.Module:
    if not path.is_file():
        raise DistillError(f"{path.name} is missing: run the distill stage first", code="student_missing")
    student = new_student(loaded, config)
    student.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return student.eval()
