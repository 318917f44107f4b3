"""Choosing the causal-LM defaults without the held-out novel: bench/lm.py's data, teacher and top-64 soft
labels, the product's training loop (`lm_train.train_lm`), one variant per arm, scored on a validation text
taken from the five *training* novels (the 1,600 tokens after a 200-token gap past each one's training cut),
never on the held-out novel; the held-out perplexity is printed beside it for reference only.

    python -m bench.lm_probe kd lr3 ce ce_lr3   # each arm ~7 min on an idle 2-core box (41k tokens, 4 epochs)

Variants: `kd` (fkl on top-64 with the tail bucket, alpha 1, T 1, lr 1e-3: the defaults before 2026-12-01),
`renorm` (the teacher's top-64 renormalised, no tail bucket), `lr3` (kd at lr 3e-3), `ce` / `ce_lr3` (CE
alone at 1e-3 / 3e-3), `a05` (alpha 0.5), `T2` (temperature 2). Results are appended to
~/.cache/distill-bench/lm/probe.jsonl. Setup (teacher, corpus, soft labels) is bench/lm.py's, shared.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from typing import Any

import torch

from bench import lm as B
from worker.distill import lm_pipeline
from worker.distill.lm_eval import evaluate_lm
from worker.distill.lm_students import build_lm_student
from worker.distill.lm_train import train_lm
from worker.distill.softlabels import sha256_file
from worker.distill.text_data import TokenData, load_text_dataset
from worker.distill.token_softlabels import TokenTargetReader, token_soft_label_stage

TOKENS, HELD_OUT_TOKENS, GAP, VAL_TOKENS = 41_000, 8_000, 200, 1_600
VARIANTS: dict[str, dict[str, Any]] = {
    "kd": {},
    "renorm": {"renorm": True},
    "lr3": {"lr": 3e-3},
    "ce": {"method": "ce"},
    "ce_lr3": {"method": "ce", "lr": 3e-3},
    "a05": {"alpha": 0.5},
    "T2": {"temperature": 2.0},
}


def continuation(text: str, tokenizer: Any, start: int, n: int) -> str:
    """The text of tokens [start, start + n) of `text`."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return text[offsets[start][0] : offsets[min(start + n, len(offsets)) - 1][1]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="+", choices=sorted(VARIANTS))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    size = argparse.Namespace(epochs=args.epochs, seed=0, tokens=TOKENS, heldout_tokens=HELD_OUT_TOKENS)
    gguf, novels = B.ensure_teacher(), B.ensure_corpus()
    root = B.LM_CACHE / f"work-{TOKENS}-{HELD_OUT_TOKENS}-e4-s0"  # bench/lm.py default run: its labels
    work = root / "topk"
    teacher = lm_pipeline.load_job_teacher(B.make_work(work, gguf), "cpu")
    tokenizer = teacher.tokenizer
    train_novels = [n for n in B.NOVELS if n != B.HELD_OUT]
    per_novel = TOKENS // len(train_novels)
    train_file = root / "data" / f"austen-{per_novel}.jsonl"
    B.write_jsonl(train_file, [B.cut(B.novel_text(novels[n]), tokenizer, per_novel) for n in train_novels])
    B.make_work(work, gguf, train_file)
    B.soft_labels(work, B.config(size, soft_label_format="topk", topk=B.TOPK), args.threads)

    val_file = root / "data" / "val-continuations.jsonl"
    B.write_jsonl(val_file, [continuation(B.novel_text(novels[n]), tokenizer, per_novel + GAP, VAL_TOKENS)
                             for n in train_novels])  # fmt: skip
    val = load_text_dataset(val_file, tokenizer, max_length=B.LENGTH, val_fraction=0.0, seed=0).split("train")
    heldout_file = root / "data" / f"{B.HELD_OUT}-{HELD_OUT_TOKENS}.jsonl"
    B.write_jsonl(heldout_file, [B.cut(B.novel_text(novels[B.HELD_OUT]), tokenizer, HELD_OUT_TOKENS)])
    heldout = load_text_dataset(heldout_file, tokenizer, max_length=B.LENGTH, val_fraction=0.0, seed=0)
    token_soft_label_stage(
        teacher.logits, heldout, root / "heldout_labels", k=B.TOPK, teacher_sha256=sha256_file(gguf),
        dataset_sha256=sha256_file(heldout_file), batch_size=8,
    )  # fmt: skip
    held_reader = TokenTargetReader(root / "heldout_labels", "train", cache_shards=1 << 10)

    windows = TokenData.load_npz(work / "soft_labels" / "tokens.npz").split("train")
    reader = TokenTargetReader(work / "soft_labels", "train", cache_shards=1 << 10)

    def renormalised(rows: torch.Tensor) -> Any:  # no tail bucket: the tail's mass is -inf
        targets = reader.take(rows)
        assert targets.tail is not None
        return dataclasses.replace(targets, tail=torch.full_like(targets.tail, float("-inf")))

    out = B.LM_CACHE / "probe.jsonl"
    for name in args.variants:
        v = VARIANTS[name]
        torch.manual_seed(0)
        student, _ = build_lm_student(B.STUDENT, teacher)
        started = time.perf_counter()
        result = train_lm(student, windows, None, renormalised if v.get("renorm") else reader.take,
                          method=v.get("method", "fkl"), alpha=v.get("alpha", 1.0),
                          temperature=v.get("temperature", 1.0), beta=0.5, epochs=args.epochs,
                          batch_size=B.BATCH, lr=v.get("lr", 1e-3), weight_decay=0.01, grad_clip=1.0, seed=0,
                          ckpt_dir=None, device="cpu")  # fmt: skip
        student.eval()
        held = evaluate_lm(student, heldout.split("train"), held_reader.take)
        record = {
            "variant": name, "epochs": args.epochs, "steps": result.steps,
            "val_perplexity": evaluate_lm(student, val)["perplexity"],
            "heldout_perplexity": held["perplexity"],
            "seconds": time.perf_counter() - started,
        }  # fmt: skip
        print(json.dumps(record), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
