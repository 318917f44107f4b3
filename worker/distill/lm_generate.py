"""Prompt-only datasets: the teacher writes the completions (what the hosted services call distillation).

A dataset of prompts (JSONL / CSV / Parquet with a `prompt` column and neither the text column nor
`completion`) gets one completion per prompt from the teacher, greedy or sampled, at most `max_new_tokens`
tokens, stopping at the teacher's EOS. The result is a dataset like any other:

    <folder>/generated.jsonl   {"prompt", "completion"} per prompt, in the dataset's order (UTF-8)
    <folder>/generated.json    what it is made of (identity), the batch size, per-batch counts while it
                               grows; once complete: rows, tokens, seconds, empty completions, sha256

Prompts are tokenized as the training data is (no special tokens), so the teacher continues exactly the
ids the student is later trained on; `completion` is the decoded new tokens before EOS, so prompt +
completion is the text the teacher wrote. Rows go `batch_size` at a time through `generate`, left padded;
a sampled batch draws from the seed `seed + its first row`, so a rerun after a crash keeps the whole batches
already written (the batch size is the one the file was started with) and writes the rest as an
uninterrupted run would. Another identity (teacher, prompts, settings) starts the file over.

The teacher is loaded already (lm_teachers: offline, no code from the upload); nothing here reaches a hub.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from worker.distill.errors import DatasetError, TeacherError
from worker.distill.lm_teachers import LMTeacher
from worker.distill.softlabels import sha256_file
from worker.distill.text_data import read_records

GENERATED, GENERATED_INFO = "generated.jsonl", "generated.json"
PROMPT_COLUMN = "prompt"
INFO_EVERY_S = 5.0  # how often the record of finished batches is rewritten (and always at the end)

OnBatch = Callable[[int, int, int], None]  # rows written, rows in all, tokens generated so far


def has_prompts(path: Path) -> bool:
    """Whether `path` has a `prompt` column with at least one non-empty prompt."""
    try:
        return bool(read_records(Path(path), PROMPT_COLUMN))
    except DatasetError:
        return False


def read_prompts(path: Path, text_column: str) -> list[str]:
    """The non-empty prompts of a prompt-only dataset, in file order.

    A dataset that already holds text (`text_column`, `prompt` + `completion`, or a `.txt`) is refused
    (`dataset_has_completions`): generating would silently drop the user's own completions."""
    path = Path(path)
    try:
        read_records(path, text_column)
    except DatasetError as exc:
        if exc.code != "missing_column":
            raise
    else:
        raise DatasetError(
            f"`generate` writes the completions of a dataset of prompts, but {path.name} already holds "
            f"text (a {text_column!r} column, 'prompt' + 'completion', or plain text): drop `generate` to "
            "train on it, or upload only a 'prompt' column",
            code="dataset_has_completions",
            field="generate",
        )
    try:
        records = read_records(path, PROMPT_COLUMN)
    except DatasetError as exc:
        if exc.code != "missing_column":
            raise
        raise DatasetError(
            f"`generate` needs a {PROMPT_COLUMN!r} column; {exc.message.partition('; ')[2]}",
            code="missing_column",
            field="dataset",
        ) from None
    if not records:
        raise DatasetError(f"{path.name} holds no non-empty prompt", code="empty_dataset", field="dataset")
    return [r.text for r in records]


def encode_prompts(
    tokenizer: Any, prompts: Sequence[str], max_new_tokens: int, context: int | None
) -> list[list[int]]:
    """Each prompt's ids (no special tokens, as text_data tokenizes); `prompt_too_long` when a prompt and
    `max_new_tokens` together pass the teacher's `context` (None: no limit known)."""
    encoded: list[list[int]] = []
    for start in range(0, len(prompts), 1024):  # batched: the Rust tokenizer runs them in parallel
        encoded += tokenizer(list(prompts[start : start + 1024]), add_special_tokens=False)["input_ids"]
    if context:
        for row, ids in enumerate(encoded):
            if len(ids) + max_new_tokens > context:
                raise DatasetError(
                    f"prompt {row + 1} is {len(ids)} tokens: with max_new_tokens {max_new_tokens} it passes "
                    f"the teacher's context of {context}; shorten it or lower generate.max_new_tokens",
                    code="prompt_too_long",
                    field="dataset",
                )
    return encoded


def teacher_context(teacher: LMTeacher) -> int | None:
    """The most tokens the teacher attends to (prompt + completion), when its config says."""
    positions = getattr(teacher.config, "max_position_embeddings", None)
    return positions if isinstance(positions, int) and positions > 0 else None


def finished(
    folder: Path, identity: dict[str, Any], digest: Callable[[Path], str] = sha256_file
) -> dict[str, Any] | None:
    """generated.json if generated.jsonl is complete, made of `identity`, and intact (`digest` is its
    sha256: a caller may pass one that caches); else None."""
    info = _read_json(Path(folder) / GENERATED_INFO)
    path = Path(folder) / GENERATED
    if (
        info is None
        or info.get("identity") != identity
        or not info.get("complete")
        or not path.is_file()
        or digest(path) != info.get("sha256")
    ):
        return None
    return info


def generate_completions(
    teacher: LMTeacher,
    prompts: Sequence[str],
    folder: Path,
    *,
    identity: dict[str, Any],
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_p: float,
    seed: int,
    batch_size: int,
    on_batch: OnBatch | None = None,
) -> dict[str, Any]:
    """Write folder/generated.jsonl (see the module docstring) and return its finished generated.json.

    `identity`: what the file is made of (the caller's: teacher and dataset hashes, the settings); a file of
    another identity is started over, one of this identity resumed at its last whole batch."""
    folder = Path(folder)
    done = finished(folder, identity)
    if done is not None:
        return done
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = teacher.tokenizer
    encoded = encode_prompts(tokenizer, prompts, max_new_tokens, teacher_context(teacher))
    info, offset = _resume(folder, identity, prompts, batch_size)
    size = int(info["batch_size"])
    stops = _stop_ids(teacher)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stops)
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
    if do_sample:  # top_k 0: no cut but top_p's (transformers would otherwise keep the 50 likeliest)
        options |= {"temperature": temperature, "top_p": top_p, "top_k": 0}
    written = len(info["batches"]) * size
    tokens = sum(b[0] for b in info["batches"])
    last_save = time.monotonic()
    with open(folder / GENERATED, "r+b") as out:
        out.truncate(offset)
        out.seek(offset)
        for start in range(written, len(prompts), size):
            began = time.perf_counter()
            new = _generate(teacher, encoded[start : start + size], options, stops, pad, seed + start)
            texts = [tokenizer.decode(_text_ids(ids, stops), skip_special_tokens=True) for ids in new]
            lines = [
                json.dumps({"prompt": p, "completion": t}, ensure_ascii=False) + "\n"
                for p, t in zip(prompts[start : start + size], texts, strict=True)
            ]
            out.write("".join(lines).encode("utf-8"))
            out.flush()
            os.fsync(out.fileno())  # rows on disk before the record that counts them
            batch_tokens = sum(len(ids) for ids in new)
            empty = sum(not t.strip() for t in texts)
            info["batches"].append([batch_tokens, round(time.perf_counter() - began, 3), empty])
            written, tokens = min(start + size, len(prompts)), tokens + batch_tokens
            if written < len(prompts) and time.monotonic() - last_save >= INFO_EVERY_S:
                _write_json(folder / GENERATED_INFO, info)
                last_save = time.monotonic()
            if on_batch is not None:
                on_batch(written, len(prompts), tokens)
    batches = info.pop("batches")
    info |= {
        "complete": True,
        "rows": len(prompts),
        "tokens": tokens,
        "seconds": round(sum(b[1] for b in batches), 3),
        "empty_completions": sum(b[2] for b in batches),
        "resumed_from": info.get("resumed_from", 0),
        "sha256": sha256_file(folder / GENERATED),
    }
    _write_json(folder / GENERATED_INFO, info)
    return info


def _resume(
    folder: Path, identity: dict[str, Any], prompts: Sequence[str], batch_size: int
) -> tuple[dict[str, Any], int]:
    """The record to continue (its whole batches that the file holds too) and the file's byte length they
    take; a fresh record and 0 when nothing of this identity is there."""
    path = folder / GENERATED
    if not path.is_file():
        path.write_bytes(b"")
    info = _read_json(folder / GENERATED_INFO)
    fresh = {"identity": identity, "batch_size": batch_size, "batches": [], "complete": False}
    if (
        info is None
        or info.get("identity") != identity
        or info.get("complete")  # complete but not intact (finished() said so): start over
        or not isinstance(info.get("batch_size"), int)
        or info["batch_size"] < 1
        or not isinstance(info.get("batches"), list)
    ):
        _write_json(folder / GENERATED_INFO, fresh)
        return fresh, 0
    ends = _row_ends(path, prompts)
    size = info["batch_size"]
    kept = min(len(info["batches"]), len(ends) // size)
    info["batches"] = info["batches"][:kept]
    info["resumed_from"] = kept * size
    return info, ends[kept * size - 1] if kept else 0


def _row_ends(path: Path, prompts: Sequence[str]) -> list[int]:
    """The byte offset after each leading row of `path` that is whole and holds the prompt of its index."""
    ends: list[int] = []
    position = 0
    with open(path, "rb") as f:
        for line in f:
            if len(ends) == len(prompts) or not line.endswith(b"\n"):
                break
            try:
                row = json.loads(line)
            except ValueError:
                break
            if not isinstance(row, dict) or row.get("prompt") != prompts[len(ends)]:
                break
            position += len(line)
            ends.append(position)
    return ends


def _stop_ids(teacher: LMTeacher) -> list[int]:
    """Every token the teacher ends a text with: its generation config's EOS ids and the tokenizer's."""
    configured = getattr(teacher.model.generation_config, "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    stops = {int(i) for i in [*ids, teacher.tokenizer.eos_token_id] if i is not None}
    if not stops:
        raise TeacherError("the teacher names no EOS token to stop at", field="teacher")
    return sorted(stops)


@torch.inference_mode()
def _generate(
    teacher: LMTeacher,
    prompts: list[list[int]],
    options: dict[str, Any],
    stops: list[int],
    pad: int,
    seed: int,
) -> list[list[int]]:
    """The new ids of each prompt, cut after the first stop token (kept: it ended the text)."""
    from transformers import GenerationConfig

    width = max(len(ids) for ids in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):  # left padded: every row's next token comes at the same column
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    model = teacher.model
    # A blank config underneath: the job's settings are all that shape the text, not the sampling defaults
    # (top_k, repetition penalties, ...) a teacher's generation_config.json may carry.
    own = model.generation_config
    config = GenerationConfig(**options, eos_token_id=stops, pad_token_id=pad)  # type: ignore[no-untyped-call]
    devices = [teacher.device] if teacher.device.type == "cuda" else []
    try:
        model.generation_config = GenerationConfig()  # type: ignore[no-untyped-call]
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = model.generate(
                input_ids=ids.to(teacher.device),
                attention_mask=mask.to(teacher.device),
                generation_config=config,
            )
    finally:
        model.generation_config = own
    rows = []
    for new in out[:, width:].tolist():
        end = next((i + 1 for i, token in enumerate(new) if token in stops), len(new))
        rows.append(new[:end])
    return rows


def _text_ids(ids: list[int], stops: list[int]) -> list[int]:
    """The ids of the completion's text: without the stop token (not every EOS is a special token)."""
    return ids[:-1] if ids and ids[-1] in stops else ids


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)
