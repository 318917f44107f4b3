"""Text datasets of a classification job: a text column and an optional label column, tokenized once.

CSV, Parquet or JSONL rows with `text_column` (default "text") and `label_column` (default "label"). A label
is a class name (mapped through the teacher's `id2label`) or a class id; an empty or missing label makes the
row unlabelled transfer data, which the student learns from the teacher alone. Rows with an empty text are
skipped (counted). Texts are encoded with the teacher's own tokenizer into `x`: int64 token ids (N, L),
right-padded with the tokenizer's pad id, L the longest encoded row of train and validation together, at most
`max_length` (longer texts are truncated, and counted). Token ids are not features: no preprocessing scales
them, and `data.validate_dataset` (float32 features) does not apply; `check_text_dataset` does instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from worker.distill.data import Dataset
from worker.distill.errors import DatasetError, MismatchError
from worker.distill.text_data import read_jsonl, read_table

SUFFIXES = (".csv", ".parquet", ".jsonl")
SHOWN = 8  # label names quoted in an error
Encode = Callable[[Any, list[str], int, int], tuple[np.ndarray, int]]


class Encoder(Protocol):
    """What the rows need of a text teacher (text_teachers.TextTeacher)."""

    tokenizer: Any
    pad_id: int
    id2label: list[str] | None


@dataclass(frozen=True)
class TextStats:
    rows: int
    skipped_empty: int
    truncated: int
    max_length: int
    length: int  # L: the padded width of x

    def as_dict(self) -> dict[str, int]:
        return {
            "rows": self.rows,
            "skipped_empty": self.skipped_empty,
            "truncated": self.truncated,
            "max_length": self.max_length,
            "length": self.length,
        }


def read_text_rows(
    path: Path, text_column: str, label_column: str, id2label: list[str] | None
) -> tuple[list[str], np.ndarray, int]:
    """(texts, labels int64 with -1 for none, rows skipped for an empty text) of one file, in file order."""
    path = Path(path)
    rows, columns = _rows(path)
    if text_column not in columns:
        raise DatasetError(
            f"{path.name} has no text column {text_column!r}; it has: "
            f"{', '.join(str(c)[:40] for c in columns[:20]) or 'nothing'} (set text_column)",
            code="missing_column",
            field="text_column",
        )
    label_of = _label_mapper(path, label_column, id2label)
    texts: list[str] = []
    labels: list[int] = []
    skipped = 0
    for i, row in enumerate(rows):
        text = row.get(text_column)
        if text is None or (isinstance(text, float) and np.isnan(text)) or text == "":
            skipped += 1
            continue
        if not isinstance(text, str):
            raise DatasetError(
                f"{path.name} row {i + 1}: {text_column!r} must be text, not {type(text).__name__}",
                code="bad_dtype",
                field="text_column",
            )
        if not text.strip():
            skipped += 1
            continue
        texts.append(text)
        labels.append(label_of(row.get(label_column), i))
    if not texts:
        raise DatasetError(f"{path.name} has no rows with text", code="empty_dataset", field="dataset")
    return texts, np.asarray(labels, dtype=np.int64), skipped


def load_text_classification(
    path: Path,
    teacher: Encoder,
    *,
    text_column: str = "text",
    label_column: str = "label",
    max_length: int = 128,
    val_path: Path | None = None,
    encode_texts: Encode,
) -> tuple[Dataset, TextStats, list[str]]:
    """The dataset (and an optional validation file) tokenized with the teacher's tokenizer, its counts,
    and the raw texts (validation first) for measurements that include tokenization.

    encode_texts: (tokenizer, texts, max_length, pad_id) -> (ids (N, L) int64, rows truncated), i.e.
    `text_teachers.encode_texts` (passed in: the two modules are siblings in the core's layers).
    """
    texts, y, skipped = read_text_rows(path, text_column, label_column, teacher.id2label)
    val: tuple[list[str], np.ndarray, int] | None = None
    if val_path is not None:
        val = read_text_rows(val_path, text_column, label_column, teacher.id2label)
        skipped += val[2]
    ids, truncated = encode_texts(teacher.tokenizer, texts, max_length, teacher.pad_id)
    x_val = None
    if val is not None:
        ids_val, truncated_val = encode_texts(teacher.tokenizer, val[0], max_length, teacher.pad_id)
        truncated += truncated_val
        width = max(ids.shape[1], ids_val.shape[1])
        ids, x_val = _pad_to(ids, width, teacher.pad_id), _pad_to(ids_val, width, teacher.pad_id)
    dataset = Dataset(
        x=ids,
        y=y,
        x_val=x_val,
        y_val=None if val is None else val[1],
        class_names=list(teacher.id2label) if teacher.id2label else None,
    )
    rows = len(texts) + (0 if val is None else len(val[0]))
    raw = texts if val is None else [*val[0], *texts]
    return dataset, TextStats(rows, skipped, truncated, max_length, int(ids.shape[1])), raw


def check_text_dataset(dataset: Dataset, num_classes: int) -> None:
    """Labels within the teacher's classes (the names were mapped already); the ids are the tokenizer's."""
    for x, y, field in ((dataset.x, dataset.y, "y"), (dataset.x_val, dataset.y_val, "y_val")):
        if x is None or y is None:
            continue
        if len(x) == 0:
            raise DatasetError(f"{field} split has no rows", code="empty_dataset", field="dataset")
        high = np.flatnonzero(y >= num_classes)
        if high.size:
            raise DatasetError(
                f"label {y[high[0]]} at row {high[0]} but the teacher has {num_classes} classes "
                f"(0..{num_classes - 1})",
                code="label_out_of_range",
                field="label_column",
            )
    if dataset.class_names and len(dataset.class_names) != num_classes:
        raise MismatchError(
            f"the teacher's config names {len(dataset.class_names)} labels but it outputs {num_classes}",
            code="class_count_mismatch",
            field="teacher",
        )


def _pad_to(ids: np.ndarray, width: int, pad_id: int) -> np.ndarray:
    if ids.shape[1] == width:
        return ids
    out = np.full((len(ids), width), pad_id, dtype=np.int64)
    out[:, : ids.shape[1]] = ids
    return out


def _rows(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    if not path.is_file():
        raise DatasetError(f"dataset {path.name} does not exist", code="dataset_not_found", field="dataset")
    with open(path, "rb") as f:
        head = f.read(4)
    suffix = path.suffix.lower()
    if head == b"PAR1":
        kind = "parquet"
    elif suffix in (".jsonl", ".json", ".ndjson"):
        kind = "jsonl"
    elif suffix in (".csv", ".tsv", ".txt"):
        kind = "csv"
    else:
        raise DatasetError(
            f"a text dataset is CSV, Parquet or JSONL with a text column; cannot read {path.name}",
            code="unknown_dataset_format",
            field="dataset",
        )
    if kind == "jsonl":
        rows = read_jsonl(path)
        return rows, sorted(set().union(*(r.keys() for r in rows))) if rows else []
    frame = read_table(path, kind)
    return frame.to_dict("records"), [str(c) for c in frame.columns]


def _label_mapper(path: Path, column: str, id2label: list[str] | None) -> Any:
    """A function (cell, row) -> class id or -1: names through id2label, ids as they are."""
    by_name = {name: i for i, name in enumerate(id2label or [])}
    folded = {name.casefold(): i for name, i in by_name.items()}

    def label(value: Any, row: int) -> int:
        if value is None or value == "" or (isinstance(value, float) and np.isnan(value)):
            return -1
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, str):
            text = value.strip()
            if text in by_name:
                return by_name[text]
            if text.casefold() in folded:
                return folded[text.casefold()]
            if text.lstrip("-").isdigit():
                value = int(text)
            else:
                known = ", ".join(repr(n) for n in (id2label or [])[:SHOWN])
                raise DatasetError(
                    f"{path.name} row {row + 1}: label {text[:40]!r} is not one of the teacher's labels "
                    + (f"({known})" if known else "(the teacher names none: use class ids 0..C-1)"),
                    code="unknown_label",
                    field="label_column",
                )
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, (int, np.integer)) or value < -1:
            raise DatasetError(
                f"{path.name} row {row + 1}: label {str(value)[:40]!r} is neither a class name nor an id",
                code="label_out_of_range",
                field="label_column",
            )
        return int(value)

    return label
