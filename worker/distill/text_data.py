"""Text datasets for causal-LM distillation: documents -> token windows with attention and loss masks.

Formats (told by the file's suffix): `.jsonl` (one JSON object per line), `.txt`, `.csv`, `.parquet`. A record
is either a document (`text_column`, default "text") or a `prompt` + `completion` example, the loss then on
the completion only. A table or JSONL with `text_column` is documents; without it, with `prompt` and
`completion`, examples; otherwise `missing_column`.

Plain `.txt`: a document is a paragraph, i.e. the text between blank lines, because prose is hard-wrapped
and one wrapped line is not a unit of meaning; a file with no blank line at all is one document per line.

Every document is tokenized with the teacher's tokenizer (no special tokens added) and followed by EOS. The
held-out split is drawn by document (seeded), before any window is cut, so no document is in both splits.
Then, per split:

- documents, `pack=True`: the split's documents are one stream (EOS between them) cut into `max_length`
  windows; a long document spans windows and nothing is dropped; the last window is padded. Attention
  crosses document boundaries inside a window (as in GPT-2 / nanoGPT packing): EOS marks them.
- documents, `pack=False`: one row per document, truncated at `max_length` (counted) and padded.
- prompt + completion: never packed; one row per example, truncated at `max_length` (counted), padded.

Masks, all (N, L) bool: `attention_mask` is every real token; `loss_mask[t]` says whether the prediction
made at position t of the token at t + 1 counts: both real, and for examples, token t + 1 part of the
completion (or its EOS). The last position of a row never counts: its next token is not in the row.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from worker.distill.data_limits import check_csv_header, check_parquet
from worker.distill.errors import ConfigError, DatasetError, TeacherError

SUFFIXES = (".jsonl", ".txt", ".csv", ".parquet")
MAX_FILE_BYTES = 4 << 30
MAX_TOKENS = 1 << 30  # rows x max_length; each token costs 6 bytes here (int32 id, two bool masks)
MAX_LENGTH = 1 << 16
IGNORE_INDEX = -100
_ARRAYS = ("input_ids", "attention_mask", "loss_mask")
_ARRAY_KEYS = tuple(prefix + name for prefix in ("", "val_") for name in _ARRAYS)
_COUNTS = ("documents", "val_documents", "tokens", "val_tokens", "truncated_documents")


@dataclass(frozen=True, eq=False)
class TokenSplit:
    """One split's windows: input_ids (N, L) int32, attention_mask and loss_mask (N, L) bool."""

    input_ids: Tensor
    attention_mask: Tensor
    loss_mask: Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(frozen=True, eq=False)
class TokenData:
    """Token windows of the training and held-out splits.

    input_ids (N, L) int32, padded with `pad_token_id`; attention_mask and loss_mask (N, L) bool (see the
    module docstring); `val_*` the same for the held-out split (N may be 0). Counts for the report:
    documents per split, `tokens` (real tokens, EOS included), documents cut at `max_length`.
    """

    input_ids: Tensor
    attention_mask: Tensor
    loss_mask: Tensor
    val_input_ids: Tensor
    val_attention_mask: Tensor
    val_loss_mask: Tensor
    max_length: int
    pad_token_id: int
    documents: int
    val_documents: int
    tokens: int
    val_tokens: int
    truncated_documents: int

    def __post_init__(self) -> None:
        for prefix in ("", "val_"):
            ids, attn, loss = (getattr(self, prefix + name) for name in _ARRAYS)
            if ids.dtype != torch.int32 or attn.dtype != torch.bool or loss.dtype != torch.bool:
                raise ValueError(f"{prefix}input_ids must be int32 and the masks bool")
            if (
                ids.dim() != 2
                or ids.shape[1] != self.max_length
                or attn.shape != ids.shape
                or loss.shape != ids.shape
            ):
                raise ValueError(f"{prefix}arrays must all be (N, {self.max_length})")

    def split(self, name: str) -> TokenSplit:
        """The windows of "train" or "val" (what the training loop and the soft-label stage read)."""
        if name not in ("train", "val"):
            raise ConfigError(f"unknown split {name!r}; known: train, val", field="split")
        prefix = "" if name == "train" else "val_"
        return TokenSplit(*(getattr(self, prefix + n) for n in _ARRAYS))

    def report(self) -> dict[str, int]:
        return {name: int(getattr(self, name)) for name in (*_COUNTS, "max_length")} | {
            "windows": int(self.input_ids.shape[0]),
            "val_windows": int(self.val_input_ids.shape[0]),
        }

    def save_npz(self, path: Path) -> None:
        arrays = {key: getattr(self, key).numpy() for key in _ARRAY_KEYS}
        scalars = {n: np.array(getattr(self, n), np.int64) for n in (*_COUNTS, "max_length", "pad_token_id")}
        with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a path
            np.savez(f, allow_pickle=False, **arrays, **scalars)

    @classmethod
    def load_npz(cls, path: Path) -> TokenData:
        """The inverse of `save_npz`; any other key, dtype or shape is a DatasetError (`bad_npz`)."""
        expected = {*_ARRAY_KEYS, *_COUNTS, "max_length", "pad_token_id"}
        try:
            with np.load(path, allow_pickle=False) as npz:
                if set(npz.files) != expected:
                    raise ValueError(f"keys {sorted(npz.files)}, expected {sorted(expected)}")
                loaded = {key: npz[key] for key in expected}
            for key, value in loaded.items():
                want = np.int32 if key.endswith("input_ids") else bool if key.endswith("mask") else np.int64
                if value.dtype != np.dtype(want) or value.ndim != (2 if key in _ARRAY_KEYS else 0):
                    raise ValueError(f"{key} has dtype {value.dtype} and {value.ndim} dims")
            fields: dict[str, Any] = {
                k: torch.from_numpy(np.array(v)) if v.ndim else int(v) for k, v in loaded.items()
            }
            return cls(**fields)
        except (OSError, ValueError, KeyError) as exc:
            raise DatasetError(f"cannot read token data {Path(path).name}: {exc}", code="bad_npz") from None


def next_token_labels(input_ids: Tensor, loss_mask: Tensor) -> Tensor:
    """(B, L) int64: labels[t] = input_ids[t + 1] where loss_mask[t], else IGNORE_INDEX (-100)."""
    labels = torch.full(input_ids.shape, IGNORE_INDEX, dtype=torch.long, device=input_ids.device)
    labels[:, :-1] = input_ids[:, 1:].long()
    return labels.masked_fill(~loss_mask, IGNORE_INDEX)


@dataclass(frozen=True)
class _Record:
    text: str  # the document, or the completion of an example
    prompt: str | None = None


def load_text_dataset(
    path: Path,
    tokenizer: Any,
    *,
    max_length: int,
    text_column: str = "text",
    pack: bool = True,
    val_fraction: float,
    seed: int,
    max_file_bytes: int = MAX_FILE_BYTES,
    max_tokens: int = MAX_TOKENS,
) -> TokenData:
    """Read, tokenize, split by document and window `path` (see the module docstring).

    `tokenizer`: the teacher's (a transformers fast tokenizer with an EOS token). `val_fraction` in [0, 1):
    the share of documents held out (at least one when > 0). Same file, tokenizer and seed: same TokenData.
    """
    path = Path(path)
    if not 2 <= max_length <= MAX_LENGTH:
        raise ConfigError(f"max_length must be in [2, {MAX_LENGTH}], got {max_length}", field="max_length")
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}", field="val_fraction")
    if not path.is_file():
        raise DatasetError(f"dataset {path.name} does not exist", code="dataset_not_found", field="dataset")
    if path.stat().st_size > max_file_bytes:
        raise DatasetError(
            f"{path.name} is {path.stat().st_size} bytes; the cap for a text dataset is {max_file_bytes}",
            code="dataset_too_large",
            field="dataset",
        )
    records = read_records(path, text_column)
    if not records:
        raise DatasetError(f"{path.name} holds no non-empty text", code="empty_dataset", field="dataset")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise TeacherError(
            "the teacher's tokenizer has no EOS token", code="invalid_teacher", field="teacher"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    examples = records[0].prompt is not None
    encoded = _encode(tokenizer, records, eos)
    # Rows x max_length bounds what the windows will take; checked before any is allocated.
    total = sum(len(ids) for ids, _ in encoded)
    rows = len(encoded) if examples or not pack else total // max_length + 1
    if rows * max_length > max_tokens:
        raise DatasetError(
            f"{path.name} makes {rows} windows of {max_length} tokens; the cap is {max_tokens} tokens",
            code="dataset_too_large",
            field="dataset",
        )
    val_docs = _held_out(len(encoded), val_fraction, seed)
    is_val = np.zeros(len(encoded), bool)
    is_val[val_docs] = True
    parts = {}
    for name, chosen in (("train", ~is_val), ("val", is_val)):
        docs = [encoded[i] for i in np.flatnonzero(chosen)]
        window = _pack if pack and not examples else _rows
        parts[name] = window(docs, max_length, pad)
    train, val = parts["train"], parts["val"]
    return TokenData(
        *train[:3],
        *val[:3],
        max_length=max_length,
        pad_token_id=int(pad),
        documents=int((~is_val).sum()),
        val_documents=int(is_val.sum()),
        tokens=int(train[1].sum()),
        val_tokens=int(val[1].sum()),
        truncated_documents=train[3] + val[3],
    )


def read_records(path: Path, text_column: str = "text") -> list[_Record]:
    """The non-empty documents or examples of `path`, in file order."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        text = _read_text(path)
        blocks = re.split(r"\n[ \t]*\n", text) if re.search(r"\n[ \t]*\n", text) else text.splitlines()
        return [_Record(b.strip()) for b in blocks if b.strip()]
    if suffix == ".jsonl":
        rows = read_jsonl(path)
        columns: Sequence[str] = sorted(set().union(*(r.keys() for r in rows))) if rows else []
    elif suffix in (".csv", ".parquet"):
        frame = read_table(path, suffix[1:])
        columns = [str(c) for c in frame.columns]
        rows = frame.to_dict("records")
    else:
        raise DatasetError(
            f"cannot tell the format of {path.name}; text datasets are {', '.join(SUFFIXES)}",
            code="unknown_format",
            field="dataset",
        )
    if not rows:
        return []
    if text_column in columns:
        fields: tuple[str, ...] = (text_column,)
    elif "prompt" in columns and "completion" in columns:
        fields = ("prompt", "completion")
    else:
        raise DatasetError(
            f"{path.name} has no {text_column!r} column (nor 'prompt' + 'completion'); it has: "
            f"{', '.join(c[:40] for c in columns[:20]) or 'nothing'}",
            code="missing_column",
            field="text_column",
        )
    records = []
    for i, row in enumerate(rows):
        values = [_text_value(row.get(f), f, i, path) for f in fields]
        if len(values) == 1 and values[0].strip():
            records.append(_Record(values[0]))
        elif len(values) == 2 and values[1].strip():
            records.append(_Record(values[1], values[0]))
    return records


def _text_value(value: Any, field: str, row: int, path: Path) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""  # an empty cell: the record is skipped
    if not isinstance(value, str):
        raise DatasetError(
            f"{path.name} row {row + 1}: {field!r} must be text, not {type(value).__name__}",
            code="bad_dtype",
            field=field,
        )
    return value


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(
            f"{path.name} is not UTF-8 text: {exc}", code="bad_encoding", field="dataset"
        ) from None


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for i, line in enumerate(_read_text(path).splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise DatasetError(f"{path.name} line {i + 1} is not JSON: {exc}", code="bad_jsonl") from None
        if not isinstance(row, dict):
            raise DatasetError(f"{path.name} line {i + 1} is not a JSON object", code="bad_jsonl")
        rows.append(row)
    return rows


def read_table(path: Path, kind: str) -> Any:
    import pandas as pd

    try:
        if kind == "parquet":
            check_parquet(path)
            return pd.read_parquet(path)
        check_csv_header(path)
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except DatasetError:
        raise
    except Exception as exc:  # noqa: BLE001 - pandas/pyarrow raise many parser error types
        raise DatasetError(f"cannot read {kind} file {path.name}: {exc}", code="bad_table") from None


def _encode(
    tokenizer: Any, records: list[_Record], eos: int, chunk: int = 1024
) -> list[tuple[np.ndarray, int]]:
    """Per record (prompt ids + text ids + EOS, index of the first completion token: 0 for a document)."""

    def ids(texts: list[str]) -> list[list[int]]:  # batched: the Rust tokenizer runs them in parallel
        out: list[list[int]] = []
        for i in range(0, len(texts), chunk):
            out += tokenizer(texts[i : i + chunk], add_special_tokens=False)["input_ids"]
        return out

    bodies = ids([r.text for r in records])
    prompts = ids([r.prompt or "" for r in records]) if records[0].prompt is not None else [[]] * len(records)
    return [
        (np.array([*prompt, *body, eos], dtype=np.int32), len(prompt))
        for prompt, body in zip(prompts, bodies, strict=True)
    ]


def _held_out(documents: int, fraction: float, seed: int) -> np.ndarray:
    if fraction == 0:
        return np.zeros(0, np.int64)
    if documents < 2:
        raise DatasetError(
            f"{documents} document: too few to hold out a validation split",
            code="empty_dataset",
            field="dataset",
        )
    size = min(max(round(documents * fraction), 1), documents - 1)
    return np.sort(np.random.default_rng(seed).permutation(documents)[:size])


Windows = tuple[Tensor, Tensor, Tensor, int]  # input_ids, attention_mask, loss_mask, truncated documents


def _pack(docs: list[tuple[np.ndarray, int]], length: int, pad: int) -> Windows:
    stream = np.concatenate([ids for ids, _ in docs]) if docs else np.zeros(0, np.int32)
    rows = -(-len(stream) // length)
    ids = np.full((rows, length), pad, np.int32)
    ids.reshape(-1)[: len(stream)] = stream
    attn = np.zeros((rows, length), bool)
    attn.reshape(-1)[: len(stream)] = True
    loss = np.zeros_like(attn)
    loss[:, :-1] = attn[:, 1:]
    return torch.from_numpy(ids), torch.from_numpy(attn), torch.from_numpy(loss), 0


def _rows(docs: list[tuple[np.ndarray, int]], length: int, pad: int) -> Windows:
    ids = np.full((len(docs), length), pad, np.int32)
    attn = np.zeros((len(docs), length), bool)
    loss = np.zeros_like(attn)
    truncated = 0
    for row, (doc, first) in enumerate(docs):
        n = min(len(doc), length)
        truncated += len(doc) > length
        ids[row, :n] = doc[:n]
        attn[row, :n] = True
        # Position t predicts token t + 1: it counts when that token is real and not part of the prompt.
        loss[row, max(first - 1, 0) : n - 1] = True
    return torch.from_numpy(ids), torch.from_numpy(attn), torch.from_numpy(loss), truncated
