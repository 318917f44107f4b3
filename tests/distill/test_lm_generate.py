"""Prompt-only datasets: the teacher writes the completions (lm_generate.py) and the soft-label stage trains
on them. Greedy text is the teacher's own `generate`; sampled text is fixed by the seed; a run stopped
midway resumes to the same bytes; prompts without `generate`, and `generate` over text, are refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from tiny_lm import CORPUS, fast_tokenizer, pack, save_folder, tiny_llama

from worker.distill import lm_generate
from worker.distill.errors import ConfigError, DatasetError
from worker.distill.lm_config import LMConfig
from worker.distill.lm_generate import (
    GENERATED,
    GENERATED_INFO,
    encode_prompts,
    generate_completions,
    read_prompts,
)
from worker.distill.lm_pipeline import lm_preflight, lm_soft_label
from worker.distill.lm_teachers import LMTeacher
from worker.distill.text_data import TokenData
from worker.distill.workfolder import prepare_inputs

torch.set_num_threads(1)
PROMPTS = ["the quick brown fox", "hello", "a small model learns from a larger one", "distillation", "the"]
IDENTITY = {"teacher_sha256": "t", "dataset_sha256": "d"}
GREEDY: dict[str, Any] = dict(max_new_tokens=6, do_sample=False, temperature=1.0, top_p=1.0, seed=0)
SAMPLED: dict[str, Any] = dict(max_new_tokens=6, do_sample=True, temperature=1.5, top_p=0.9, seed=7)


@pytest.fixture(scope="module")
def teacher() -> LMTeacher:
    tokenizer = fast_tokenizer()
    return LMTeacher(tiny_llama(len(tokenizer)), tokenizer, "hf_folder")


def _run(teacher: LMTeacher, folder: Path, settings: dict[str, Any], **kwargs: Any) -> list[dict[str, str]]:
    generate_completions(
        teacher, PROMPTS, folder, identity={**IDENTITY, **settings}, batch_size=2, **settings, **kwargs
    )
    return [json.loads(line) for line in (folder / GENERATED).read_text().splitlines()]


def test_greedy_completions_are_the_teachers_own_generate_and_stop_at_eos(
    teacher: LMTeacher, tmp_path: Path
) -> None:
    rows = _run(teacher, tmp_path / "greedy", GREEDY)
    assert [r["prompt"] for r in rows] == PROMPTS
    tok = teacher.tokenizer
    written = []
    for row in rows:  # left padded in batches of 2, each row is what the teacher writes for it alone
        ids = torch.tensor([tok(row["prompt"], add_special_tokens=False)["input_ids"]])
        own = teacher.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False
        )
        written.append(own[0, ids.shape[1] :].tolist())
        assert row["completion"] == tok.decode(written[-1], skip_special_tokens=True) != ""
    info = json.loads((tmp_path / "greedy" / GENERATED_INFO).read_text())
    assert (info["rows"], info["tokens"], info["empty_completions"], info["complete"]) == (5, 30, 0, True)

    # A teacher that says EOS at its second new token (row 0 of the first batch) ends that text there.
    calls = {"n": 0}

    def eos_at_second_token(module: Any, args: Any, out: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 2:
            out[0, -1, tok.eos_token_id] = 1e4
        return out

    hook = teacher.model.lm_head.register_forward_hook(eos_at_second_token)
    try:
        stopped = _run(teacher, tmp_path / "eos", GREEDY)
    finally:
        hook.remove()
    assert stopped[0]["completion"] == tok.decode(written[0][:1])
    assert stopped[1:] == rows[1:]
    info = json.loads((tmp_path / "eos" / GENERATED_INFO).read_text())
    assert info["tokens"] == 2 + 4 * 6  # the EOS that ended the text counts as generated


def test_sampling_is_fixed_by_the_seed(teacher: LMTeacher, tmp_path: Path) -> None:
    first, again = _run(teacher, tmp_path / "a", SAMPLED), _run(teacher, tmp_path / "b", SAMPLED)
    assert first == again
    other = _run(teacher, tmp_path / "c", {**SAMPLED, "seed": 8})
    greedy = _run(teacher, tmp_path / "d", GREEDY)
    assert other != first and greedy != first


def test_a_stopped_run_resumes_to_the_same_file(
    teacher: LMTeacher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = tmp_path / "whole"
    _run(teacher, whole, SAMPLED)
    monkeypatch.setattr(lm_generate, "INFO_EVERY_S", 0.0)  # the record follows every batch

    class Crash(Exception):
        pass

    def crash_after_two_batches(rows: int, total: int, tokens: int) -> None:
        if rows == 4:
            raise Crash

    folder = tmp_path / "resumed"
    with pytest.raises(Crash):
        _run(teacher, folder, SAMPLED, on_batch=crash_after_two_batches)
    with open(folder / GENERATED, "a") as f:  # and a torn row, as a copy taken mid-write would have
        f.write('{"prompt": "the", "compl')
    seen: list[int] = []
    _run(teacher, folder, SAMPLED, on_batch=lambda rows, total, tokens: seen.append(rows))
    assert seen == [5]  # only the last batch ran again
    assert (folder / GENERATED).read_bytes() == (whole / GENERATED).read_bytes()
    info, want = (json.loads((p / GENERATED_INFO).read_text()) for p in (folder, whole))
    assert info.pop("resumed_from") == 4 and want.pop("resumed_from") == 0
    assert info.pop("seconds") > 0 and want.pop("seconds") > 0
    assert info == want

    def no_generate(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a finished file was generated again")

    monkeypatch.setattr(lm_generate, "_generate", no_generate)
    assert _run(teacher, folder, SAMPLED) == _run(teacher, whole, SAMPLED)
    # Other settings: the file starts over.
    monkeypatch.undo()
    assert _run(teacher, folder, GREEDY) == _run(teacher, tmp_path / "greedy", GREEDY)


def test_prompts_are_read_from_tables_and_refused_where_text_is_there(tmp_path: Path) -> None:
    import pandas as pd

    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("".join(json.dumps({"prompt": p, "id": i}) + "\n" for i, p in enumerate(PROMPTS)))
    pd.DataFrame({"prompt": PROMPTS}).to_csv(tmp_path / "prompts.csv", index=False)
    pd.DataFrame({"prompt": PROMPTS}).to_parquet(tmp_path / "prompts.parquet")
    for name in ("prompts.jsonl", "prompts.csv", "prompts.parquet"):
        assert read_prompts(tmp_path / name, "text") == PROMPTS

    (tmp_path / "examples.jsonl").write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    (tmp_path / "docs.txt").write_text("one paragraph\n\nanother\n")
    (tmp_path / "questions.jsonl").write_text(json.dumps({"question": "a"}) + "\n")
    for name, code in [
        ("examples.jsonl", "dataset_has_completions"),
        ("docs.txt", "dataset_has_completions"),
        ("questions.jsonl", "missing_column"),
    ]:
        with pytest.raises(DatasetError) as info:
            read_prompts(tmp_path / name, "text")
        assert info.value.code == code, name

    tokenizer = fast_tokenizer()
    lengths = [len(ids) for ids in encode_prompts(tokenizer, PROMPTS, 100, context=None)]
    longest = max(lengths)
    assert encode_prompts(tokenizer, PROMPTS, 100, context=100 + longest) is not None
    with pytest.raises(DatasetError, match=f"prompt 3 is {longest} tokens") as long:
        encode_prompts(tokenizer, PROMPTS, 100, context=100 + longest - 1)
    assert long.value.code == "prompt_too_long" and lengths.index(longest) == 2


def test_generate_settings_are_resolved_and_bounded() -> None:
    config = LMConfig.from_dict({"seed": 3, "generate": {}})
    assert config.generate == {
        "max_new_tokens": 128,
        "do_sample": False,
        "temperature": 1.0,
        "top_p": 1.0,
        "seed": 3,
    }
    assert LMConfig.from_dict(config.to_dict()) == config
    assert (
        LMConfig.from_dict({"generate": {"do_sample": True, "temperature": 2}}).generate["temperature"] == 2.0
    )
    for bad, field in [
        ({"max_new_tokens": 0}, "generate.max_new_tokens"),
        ({"max_new_tokens": 1025}, "generate.max_new_tokens"),
        ({"do_sample": True, "temperature": 0}, "generate.temperature"),
        ({"do_sample": True, "top_p": 0}, "generate.top_p"),
        ({"do_sample": True, "top_p": 1.5}, "generate.top_p"),
        ({"do_sample": "yes"}, "generate.do_sample"),
        ({"temperature": 0.7}, "generate.do_sample"),  # greedy text has no temperature
        ({"seed": -1}, "generate.seed"),
        ({"top_k": 5}, "generate"),
    ]:
        with pytest.raises(ConfigError) as info:
            LMConfig.from_dict({"generate": bad})
        assert info.value.field == field, bad


@pytest.fixture(scope="module")
def prompt_job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A work folder with a tiny teacher and a JSONL of prompts alone."""
    root = tmp_path_factory.mktemp("prompt_job")
    save_folder(root / "model")
    dataset = root / "prompts.jsonl"
    prompts = sorted({" ".join(s.split()[:3]) for s in CORPUS})
    dataset.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    prepare_inputs(root / "work", teachers=[pack(root / "model", root / "teacher.tar.gz")], dataset=dataset)
    return root / "work"


SETTINGS: dict[str, Any] = dict(topk=8, max_length=16, val_fraction=0.25, epochs=1, shard_rows=4)


def test_prompts_alone_are_refused_without_generate_and_trained_on_with_it(prompt_job: Path) -> None:
    with pytest.raises(DatasetError) as refused:
        lm_preflight(prompt_job, LMConfig.from_dict(SETTINGS))
    assert refused.value.code == "prompts_need_generation" and "generate" in refused.value.message

    config = LMConfig.from_dict({**SETTINGS, "generate": {"max_new_tokens": 5}})
    summary = lm_preflight(prompt_job, config)
    assert summary["dataset"]["prompts"] == 4 and summary["dataset"]["generate"]["max_new_tokens"] == 5
    events: list[dict[str, Any]] = []
    manifest = lm_soft_label(prompt_job, config, events.append)
    assert [e["stage"] for e in events][:1] == ["generate"] and events[-1]["stage"] == "soft_label"
    rows = [json.loads(line) for line in (prompt_job / "soft_labels" / GENERATED).read_text().splitlines()]
    assert len(rows) == 4 and all(r["completion"] for r in rows)
    # The windows are the generated examples, the loss on the teacher's completion only.
    data = TokenData.load_npz(prompt_job / "soft_labels" / "tokens.npz")
    assert data.documents + data.val_documents == 4 and not data.loss_mask[:, 0].any()
    info = json.loads((prompt_job / "soft_labels" / GENERATED_INFO).read_text())
    assert manifest["dataset_sha256"] == info["sha256"]  # the labels are keyed by what the teacher wrote
    assert all(manifest["splits"][s]["complete"] for s in ("train", "val"))
