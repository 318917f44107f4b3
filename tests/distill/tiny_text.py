"""Tiny text-classification pieces built in the test, never downloaded: a WordPiece tokenizer trained here, a
2-layer BERT sequence classifier (trained a few steps so its labels mean something), a CSV of texts."""

from __future__ import annotations

import csv
import random
import tarfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

LABELS = ["negative", "positive"]
GOOD = ["good", "great", "lovely", "fine", "happy"]
BAD = ["bad", "awful", "poor", "sad", "broken"]
FILLER = ["the", "movie", "was", "a", "day", "and", "food", "service", "very", "quite", "it", "really"]


def texts(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """(text, label): label 1 when the text has more good words than bad ones."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randrange(2)
        words = rng.choices(FILLER, k=rng.randrange(3, 12))
        strong, weak = (GOOD, BAD) if label else (BAD, GOOD)
        words += rng.choices(strong, k=2) + rng.choices(weak, k=rng.randrange(0, 2))
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


@lru_cache(maxsize=1)
def tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=120, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    )
    tok.train_from_iterator([t for t, _ in texts(200)], trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    return str(tok.to_str())


def fast_tokenizer() -> Any:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json()),
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def teacher_model(steps: int = 30) -> Any:
    """A 2-layer BERT classifier, trained `steps` steps on the toy task (seeded: the same every call)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    tok = fast_tokenizer()
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)},
        pad_token_id=tok.pad_token_id,
    )
    model = BertForSequenceClassification(config)
    rows = texts(64, seed=1)
    batch = tok([t for t, _ in rows], padding=True, return_tensors="pt")
    labels = torch.tensor([y for _, y in rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def save_teacher(folder: Path, steps: int = 30) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    teacher_model(steps).save_pretrained(folder)
    fast_tokenizer().save_pretrained(folder)
    return folder


def pack(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=path.relative_to(folder).as_posix())
    return archive


def write_csv(
    path: Path, rows: list[tuple[str, int]], *, names: bool = True, unlabelled_every: int = 0
) -> Path:
    """text,label rows; labels as names (or ids); every `unlabelled_every`-th row without a label."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i, (text, label) in enumerate(rows):
            blank = unlabelled_every and i % unlabelled_every == 0
            writer.writerow([text, "" if blank else (LABELS[label] if names else label)])
    return path
