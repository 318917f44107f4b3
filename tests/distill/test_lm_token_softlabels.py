"""The token soft-label stage: sparse shards that equal the teacher when k = V, the teacher's own held-out
statistics, byte-identical resume for top-k and sampled, a tampered shard recomputed, one batch of logits
alive at a time, and reads of any row range."""

from __future__ import annotations

import json
import math
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from worker.distill.errors import DistillError
from worker.distill.text_data import TokenData
from worker.distill.token_softlabels import (
    TokenTargetReader,
    load_token_targets,
    read_manifest,
    token_soft_label_stage,
)

torch.set_num_threads(1)
V, L = 300, 16


class TableTeacher:
    """logits[b, t] = table[input_ids[b, t]] + a term in t: a bigram teacher that counts its rows and checks
    that the previous batch's logits were freed before it is asked again."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(V, V, generator=g) * 3
        self.position = torch.randn(L, V, generator=g)
        self.rows = 0
        self.last: weakref.ref[torch.Tensor] | None = None

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        assert self.last is None or self.last() is None, "the previous batch's logits are still alive"
        assert input_ids.dtype == torch.int64 and attention_mask.dtype == torch.bool
        self.rows += input_ids.shape[0]
        logits = self.table[input_ids] + self.position[: input_ids.shape[1]]
        self.last = weakref.ref(logits)
        return logits


def token_data(rows: int = 10, seed: int = 0) -> TokenData:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (rows, L), generator=g, dtype=torch.int32)
    attn = torch.ones(rows, L, dtype=torch.bool)
    attn[-1, L // 2 :] = False  # a padded last window
    loss = torch.zeros_like(attn)
    loss[:, :-1] = attn[:, 1:]
    loss[0, :3] = False  # a prompt
    val = ids[:2].clone()
    return TokenData(
        ids, attn, loss, val, attn[:2].clone(), loss[:2].clone(), L, 0, rows, 2, int(attn.sum()), 2 * L, 0
    )


def stage(teacher, data, out: Path, **kw):
    args = {"split": "train", "fmt": "topk", "k": 8, "shard_rows": 4, "batch_size": 3, "seed": 7}
    return token_soft_label_stage(teacher, data, out, **(args | kw))


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_topk_with_k_equal_to_the_vocabulary_is_the_whole_distribution(tmp_path):
    teacher, data = TableTeacher(), token_data()
    manifest = stage(teacher, data, tmp_path, k=V, temperature=2.0)
    targets = load_token_targets(tmp_path, "train")
    assert targets.ids.shape == (10, L, V) and targets.ids.dtype == torch.uint16
    dense = torch.zeros(10, L, V).scatter_(-1, targets.ids.long(), targets.values.float().exp())
    want = torch.softmax(teacher.table[data.input_ids.long()] / 2.0 + teacher.position / 2.0, dim=-1)
    torch.testing.assert_close(dense, want, atol=2e-3, rtol=2e-3)  # fp16 log-probs
    assert torch.isneginf(targets.tail).all() and targets.temperature == 2.0
    assert manifest["splits"]["train"]["covered_mass"] == pytest.approx(1.0)
    assert manifest["vocab_size"] == V and [s["rows"] for s in manifest["splits"]["train"]["shards"]] == [
        4,
        4,
        2,
    ]


def test_the_manifest_holds_the_teachers_perplexity_accuracy_and_mass_on_the_loss_positions(tmp_path):
    teacher, data = TableTeacher(), token_data()
    info = stage(teacher, data, tmp_path, k=8)["splits"]["train"]
    logits = teacher.table[data.input_ids.long()] + teacher.position
    mask = data.loss_mask[:, :-1]
    following = data.input_ids[:, 1:].long()
    nll = F.cross_entropy(logits[:, :-1][mask].double(), following[mask])
    assert info["loss_tokens"] == int(mask.sum())
    assert info["teacher_nll"] == pytest.approx(nll.item(), rel=1e-5)
    assert info["teacher_perplexity"] == pytest.approx(math.exp(nll.item()), rel=1e-5)
    assert info["teacher_accuracy"] == pytest.approx(
        (logits[:, :-1].argmax(-1) == following)[mask].float().mean().item()
    )
    top8 = torch.softmax(logits.double(), -1).topk(8, -1).values.sum(-1)[:, :-1][mask].mean()
    assert info["covered_mass"] == pytest.approx(top8.item(), rel=1e-3)


@pytest.mark.parametrize("fmt", ["topk", "sampled"])
def test_a_resumed_stage_writes_the_same_bytes_as_an_uninterrupted_one(fmt, tmp_path):
    data = token_data(rows=14)
    stage(TableTeacher(), data, tmp_path / "whole", fmt=fmt)

    def stop_after_shard_1(event):
        if event["metrics"]["shard"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stage(TableTeacher(), data, tmp_path / "cut", fmt=fmt, on_progress=stop_after_shard_1)
    assert not read_manifest(tmp_path / "cut")["splits"]["train"]["complete"]
    teacher = TableTeacher()
    stage(teacher, data, tmp_path / "cut", fmt=fmt)
    assert teacher.rows == 14 - 8  # shards 0 and 1 were kept
    assert shard_bytes(tmp_path / "cut") == shard_bytes(tmp_path / "whole")


def test_a_tampered_shard_is_recomputed_identically_and_a_new_identity_starts_over(tmp_path):
    data = token_data()
    stage(TableTeacher(), data, tmp_path, fmt="sampled", k=12)
    before = shard_bytes(tmp_path)
    shard = tmp_path / "train-00001.npz"
    shard.write_bytes(shard.read_bytes()[:-10] + b"0" * 10)
    teacher = TableTeacher()
    stage(teacher, data, tmp_path, fmt="sampled", k=12)
    assert teacher.rows == 4 and shard_bytes(tmp_path) == before
    stage(teacher, data, tmp_path, fmt="sampled", k=12)
    assert teacher.rows == 4  # complete: nothing to do
    manifest = stage(teacher, data, tmp_path, fmt="sampled", k=12, seed=8)
    assert teacher.rows == 4 + 10 and manifest["seed"] == 8
    stage(teacher, token_data(seed=1), tmp_path, fmt="sampled", k=12, seed=8)  # other windows, same identity
    assert teacher.rows == 4 + 10 + 10


def test_sampled_shards_depend_on_the_seed_and_carry_count_over_k(tmp_path):
    data = token_data()
    stage(TableTeacher(), data, tmp_path / "a", fmt="sampled", k=12, seed=1)
    stage(TableTeacher(), data, tmp_path / "b", fmt="sampled", k=12, seed=2)
    a, b = load_token_targets(tmp_path / "a", "train"), load_token_targets(tmp_path / "b", "train")
    assert a.kind == "sampled" and a.tail is None and not torch.equal(a.ids, b.ids)
    counts = a.values.float() * 12  # count / k, stored in fp16
    torch.testing.assert_close(counts, counts.round(), atol=1e-2, rtol=0)
    assert (counts.round().sum(-1) == 12).all()


def test_k64_costs_at_most_300_bytes_per_stored_token(tmp_path):
    manifest = stage(TableTeacher(), token_data(rows=16), tmp_path, k=64, shard_rows=16, batch_size=8)
    info = manifest["splits"]["train"]
    assert info["bytes_per_token"] == 64 * (2 + 2) + 2
    assert info["stored_bytes"] / (16 * L) <= 300  # the .npz container included


def test_any_row_range_reads_the_same_targets_as_the_whole_split(tmp_path):
    stage(TableTeacher(), token_data(), tmp_path, k=5)
    whole = load_token_targets(tmp_path, "train")
    for rows in (slice(0, 10), slice(3, 9), slice(4, 8), slice(9, None), slice(-3, None)):
        part = load_token_targets(tmp_path, "train", rows)
        assert torch.equal(part.ids, whole.ids[rows]) and torch.equal(part.tail, whole.tail[rows])
    reader = TokenTargetReader(tmp_path, "train", cache_shards=1)
    shuffled = torch.tensor([9, 0, 5, 4, 1, 8])  # a shuffled batch across all three shards
    taken = reader.take(shuffled)
    assert torch.equal(taken.ids, whole.ids[shuffled]) and torch.equal(taken.values, whole.values[shuffled])
    empty = load_token_targets(tmp_path, "train", slice(5, 5))
    assert empty.ids.shape == (0, L, 5)
    with pytest.raises(DistillError) as err:
        load_token_targets(tmp_path, "val")
    assert err.value.code == "missing_soft_labels"


def test_both_splits_share_one_manifest(tmp_path):
    data = token_data()
    stage(TableTeacher(), data, tmp_path)
    manifest = stage(TableTeacher(), data, tmp_path, split="val")
    assert set(manifest["splits"]) == {"train", "val"} and manifest["splits"]["train"]["complete"]
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    assert load_token_targets(tmp_path, "val").ids.shape == (2, L, 8)
