"""Text datasets: documents become packed windows with EOS between them, examples keep a completion-only loss,
the held-out split is by document, and bad files are refused with their codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from worker.distill.errors import ConfigError, DatasetError
from worker.distill.text_data import IGNORE_INDEX, TokenData, load_text_dataset, next_token_labels

WORDS = [f"w{i}" for i in range(60)]


@pytest.fixture(scope="module")
def tok():
    """One id per whitespace-separated word: token counts are word counts. <pad> 0, <eos> 1, w{i} i + 3."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def ids(*words: str) -> list[int]:
    return [int(w[1:]) + 3 for w in words]


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load(path, tok, **kw):
    return load_text_dataset(path, tok, **({"max_length": 4, "val_fraction": 0.0, "seed": 0} | kw))


def test_documents_are_packed_into_windows_with_eos_between_them(tok, tmp_path):
    data = load(jsonl(tmp_path / "d.jsonl", [{"text": "w1 w2"}, {"text": "w3 w4 w5 w6"}, {"text": " "}]), tok)
    stream = [*ids("w1", "w2"), 1, *ids("w3", "w4", "w5", "w6"), 1]  # the blank document is skipped
    assert data.input_ids.dtype == torch.int32 and data.input_ids.shape == (2, 4)
    assert data.input_ids.flatten().tolist() == stream[:8] and data.input_ids[1, :4].tolist() == stream[4:8]
    assert data.attention_mask.all()
    # Position t predicts t + 1 inside the row: the last position of each row has nothing to predict.
    assert data.loss_mask.tolist() == [[True, True, True, False]] * 2
    assert (data.documents, data.tokens, data.truncated_documents) == (2, 8, 0)
    assert data.val_input_ids.shape == (0, 4)
    train = data.split("train")  # what the training loop reads: the same windows, by name
    assert len(train) == 2 and train.loss_mask is data.loss_mask and len(data.split("val")) == 0


def test_the_last_window_is_padded_and_its_padding_never_counts(tok, tmp_path):
    data = load(jsonl(tmp_path / "d.jsonl", [{"text": "w1 w2 w3"}, {"text": "w4"}]), tok)
    assert data.input_ids.tolist() == [[*ids("w1", "w2", "w3"), 1], [ids("w4")[0], 1, 0, 0]]
    assert data.attention_mask[1].tolist() == [True, True, False, False]
    assert data.loss_mask[1].tolist() == [True, False, False, False]
    labels = next_token_labels(data.input_ids, data.loss_mask)
    assert labels.dtype == torch.int64
    assert labels[1].tolist() == [1, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]


def test_without_packing_each_document_is_one_truncated_row(tok, tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"text": "w1 w2 w3 w4 w5"}, {"text": "w6"}])
    data = load(path, tok, pack=False)
    assert data.input_ids.tolist() == [ids("w1", "w2", "w3", "w4"), [ids("w6")[0], 1, 0, 0]]
    assert data.truncated_documents == 1


def test_prompt_completion_rows_are_padded_and_only_the_completion_counts(tok, tmp_path):
    rows = [{"prompt": "w1 w2", "completion": "w3"}, {"prompt": "w4", "completion": "w5 w6 w7 w8"}]
    data = load(jsonl(tmp_path / "pc.jsonl", rows), tok, pack=True)  # never packed across examples
    assert data.input_ids.tolist() == [[*ids("w1", "w2", "w3"), 1], ids("w4", "w5", "w6", "w7")]
    # Row 0: positions 1 (predicts w3) and 2 (predicts EOS). Row 1: positions 0..2 predict w5..w7.
    assert data.loss_mask.tolist() == [[False, True, True, False], [True, True, True, False]]
    assert data.truncated_documents == 1


def test_the_held_out_split_is_by_document_and_seeded(tok, tmp_path):
    docs = [" ".join([f"w{i}"] * (1 + i % 5)) for i in range(40)]  # document i is made of word i only
    path = jsonl(tmp_path / "d.jsonl", [{"text": d} for d in docs])
    data = load(path, tok, max_length=8, val_fraction=0.25, seed=3)
    assert (data.documents, data.val_documents) == (30, 10)

    def words(ids_: torch.Tensor, attn: torch.Tensor) -> set[int]:
        return set(ids_[attn].tolist()) - {1}

    train, val = (
        words(data.input_ids, data.attention_mask),
        words(data.val_input_ids, data.val_attention_mask),
    )
    assert len(train) == 30 and len(val) == 10 and not train & val
    assert data.tokens + data.val_tokens == sum(1 + i % 5 for i in range(40)) + 40
    again = load(path, tok, max_length=8, val_fraction=0.25, seed=3)
    assert torch.equal(again.val_input_ids, data.val_input_ids)
    other = load(path, tok, max_length=8, val_fraction=0.25, seed=4)
    assert words(other.val_input_ids, other.val_attention_mask) != val


def test_txt_documents_are_paragraphs_or_else_lines(tok, tmp_path):
    (tmp_path / "p.txt").write_text("w1 w2\nw3\n\n  \nw4\n")
    assert load(tmp_path / "p.txt", tok, max_length=8).input_ids[0].tolist()[:6] == [
        *ids("w1", "w2", "w3"),
        1,
        *ids("w4"),
        1,
    ]
    (tmp_path / "l.txt").write_text("w1 w2\nw3\n")
    assert load(tmp_path / "l.txt", tok, max_length=8).input_ids[0].tolist()[:5] == [
        *ids("w1", "w2"),
        1,
        *ids("w3"),
        1,
    ]


def test_csv_and_parquet_read_the_text_column(tok, tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"book": ["a", "b", "c"], "line": ["w1 w2", "", "w3"]})
    frame.to_csv(tmp_path / "t.csv", index=False)
    frame.to_parquet(tmp_path / "t.parquet")
    for name in ("t.csv", "t.parquet"):
        data = load(tmp_path / name, tok, text_column="line", max_length=8)
        assert data.documents == 2 and data.input_ids[0, :5].tolist() == [*ids("w1", "w2"), 1, *ids("w3"), 1]


def test_token_data_round_trips_through_npz(tok, tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"text": " ".join(WORDS[i : i + 3])} for i in range(20)])
    data = load(path, tok, val_fraction=0.2, seed=1)
    data.save_npz(tmp_path / "tokens.npz")
    back = TokenData.load_npz(tmp_path / "tokens.npz")
    for name in (
        "input_ids",
        "attention_mask",
        "loss_mask",
        "val_input_ids",
        "val_attention_mask",
        "val_loss_mask",
    ):
        assert (
            torch.equal(getattr(back, name), getattr(data, name))
            and getattr(back, name).dtype == getattr(data, name).dtype
        )
    assert back.report() == data.report() and back.pad_token_id == data.pad_token_id


def test_npz_with_another_dtype_or_an_object_array_is_refused(tok, tmp_path):
    data = load(jsonl(tmp_path / "d.jsonl", [{"text": "w1 w2 w3"}]), tok)
    data.save_npz(tmp_path / "ok.npz")
    with np.load(tmp_path / "ok.npz") as npz:
        arrays = dict(npz)
    np.savez(tmp_path / "int64.npz", **(arrays | {"input_ids": arrays["input_ids"].astype(np.int64)}))
    np.savez(tmp_path / "obj.npz", **(arrays | {"loss_mask": np.array([None], dtype=object)}))
    for name in ("int64.npz", "obj.npz"):
        with pytest.raises(DatasetError) as err:
            TokenData.load_npz(tmp_path / name)
        assert err.value.code == "bad_npz"


@pytest.mark.parametrize(
    ("content", "name", "kw", "code"),
    [
        ("", "e.jsonl", {}, "empty_dataset"),
        ("\n\n  \n", "e.txt", {}, "empty_dataset"),
        ('{"body": "w1"}\n', "m.jsonl", {}, "missing_column"),
        ('{"prompt": "w1"}\n', "p.jsonl", {}, "missing_column"),
        ("book,line\na,w1\n", "m.csv", {}, "missing_column"),
        ('{"text": 3}\n', "n.jsonl", {}, "bad_dtype"),
        ("{not json\n", "b.jsonl", {}, "bad_jsonl"),
        ("w1", "d.docx", {}, "unknown_format"),
        ("w1 w2 w3 w4 w5 w6 w7 w8 w9", "big.txt", {"max_tokens": 8}, "dataset_too_large"),
        ("w1 w2", "big.txt", {"max_file_bytes": 3}, "dataset_too_large"),
        ("w1 w2", "one.txt", {"val_fraction": 0.5}, "empty_dataset"),
    ],
)
def test_bad_datasets_are_refused_with_their_codes(content, name, kw, code, tok, tmp_path):
    (tmp_path / name).write_text(content)
    with pytest.raises(DatasetError) as err:
        load(tmp_path / name, tok, **kw)
    assert err.value.code == code, err.value.message


@pytest.mark.parametrize("kw", [{"max_length": 1}, {"max_length": 1 << 20}, {"val_fraction": 1.0}])
def test_absurd_settings_are_config_errors(kw, tok, tmp_path):
    (tmp_path / "d.txt").write_text("w1 w2")
    with pytest.raises(ConfigError):
        load(tmp_path / "d.txt", tok, **kw)
