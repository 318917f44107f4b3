"""Sparse teacher targets: what top-k and sampled targets hold, their size, and their shard arrays."""

import io

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from worker.distill.errors import ConfigError
from worker.distill.token_targets import SparseTargets, id_dtype, sampled_targets, topk_targets

torch.set_num_threads(1)


def _logits(b: int = 2, length: int = 3, v: int = 11, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(b, length, v, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 2


def test_id_dtype_is_uint16_exactly_while_every_id_fits():
    assert id_dtype(2) == torch.uint16
    assert id_dtype(65536) == torch.uint16  # ids 0..65535
    assert id_dtype(65537) == torch.int32
    with pytest.raises(ConfigError):
        id_dtype(0)


@pytest.mark.parametrize("temp", [1.0, 2.5])
def test_topk_holds_the_most_probable_log_probs_in_order_and_the_exact_tail(temp):
    logits = _logits()
    t = topk_targets(logits, 4, temperature=temp, value_dtype=torch.float64)
    log_p = torch.log_softmax(logits / temp, -1)
    expected, expected_ids = log_p.sort(-1, descending=True)
    assert t.kind == "topk" and t.ids.dtype == torch.uint16 and t.temperature == temp
    assert torch.equal(t.ids.long(), expected_ids[..., :4])
    assert_close(t.values, expected[..., :4])
    assert_close(t.tail, torch.log1p(-expected[..., :4].exp().sum(-1)))
    assert_close(t.covered_mass().double(), expected[..., :4].exp().sum(-1), rtol=1e-6, atol=1e-6)


def test_topk_stores_fp16_values_and_caps_k_at_the_vocabulary():
    t = topk_targets(_logits(dtype=torch.float32), 50)
    assert t.values.dtype == torch.float16 and t.tail.dtype == torch.float16 and t.k == 11
    assert torch.isneginf(t.tail).all()  # the whole vocabulary is stored: nothing is missing
    assert_close(t.covered_mass(), torch.ones(2, 3))


def test_bytes_per_token_at_k64_is_256_plus_a_two_byte_tail():
    t = topk_targets(torch.randn(2, 5, 1000), 64)
    assert t.nbytes_per_token() == 64 * (2 + 2) + 2
    stored = sum(a.nbytes for name, a in t.to_arrays().items() if name in ("ids", "values", "tail"))
    assert stored == t.nbytes_per_token() * 2 * 5
    wide = topk_targets(torch.randn(1, 2, 70_000), 64)
    assert wide.ids.dtype == torch.int32 and wide.nbytes_per_token() == 64 * (4 + 2) + 2


def test_sampled_targets_are_reproducible_from_the_seed():
    logits = _logits(dtype=torch.float32)
    a = sampled_targets(logits, 12, torch.Generator().manual_seed(7))
    b = sampled_targets(logits, 12, torch.Generator().manual_seed(7))
    c = sampled_targets(logits, 12, torch.Generator().manual_seed(8))
    assert torch.equal(a.ids, b.ids) and torch.equal(a.values, b.values)
    assert not (torch.equal(a.ids, c.ids) and torch.equal(a.values, c.values))


def test_sampled_targets_hold_distinct_ids_with_count_over_k_then_zero_weight_padding():
    k = 12
    t = sampled_targets(
        _logits(b=3, length=5, v=6), k, torch.Generator().manual_seed(0), value_dtype=torch.float64
    )
    assert t.kind == "sampled" and t.tail is None and t.ids.shape == (3, 5, k)
    assert t.nbytes_per_token() == k * (2 + 2)
    counts = t.values * k
    assert_close(counts, counts.round())  # every value is a whole count over k
    assert_close(t.values.sum(-1), torch.ones(3, 5, dtype=torch.float64))
    assert (t.values[..., :-1] >= t.values[..., 1:]).all()  # most frequent first, padding last
    for ids, weights in zip(t.ids.reshape(-1, k).long(), t.values.reshape(-1, k), strict=True):
        drawn = ids[weights > 0]
        assert len(drawn.unique()) == len(drawn)  # a distinct id per slot
        assert (ids[weights == 0] == 0).all()  # padding is id 0 with weight 0
    with pytest.raises(ValueError, match="unknown"):
        t.covered_mass()


@pytest.mark.parametrize("temp", [1.0, 2.0])
def test_sampled_count_over_k_is_an_unbiased_estimate_of_the_teacher(temp):
    n, k, v = 4000, 12, 6
    row = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0, -3.0])
    t = sampled_targets(row.expand(1, n, v), k, torch.Generator().manual_seed(1), temperature=temp)
    dense = torch.zeros(n, v).scatter_add_(-1, t.ids.reshape(n, k).long(), t.values.reshape(n, k).float())
    p = torch.softmax(row / temp, -1)
    # E[count/k] = p; the mean of n estimates has standard error sqrt(p (1 - p) / (k n)) < 0.0033.
    assert_close(dense.mean(0), p, rtol=0, atol=0.015)


def _roundtrip(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as loaded:
        return {name: loaded[name] for name in loaded.files}


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_arrays_roundtrip_through_an_npz_file_without_pickle(kind):
    logits = _logits(dtype=torch.float32)
    t = topk_targets(logits, 5, 2.0) if kind == "topk" else sampled_targets(logits, 5, torch.Generator(), 2.0)
    back = SparseTargets.from_arrays(_roundtrip(t.to_arrays()), vocab_size=11)
    assert back.kind == kind and back.temperature == 2.0
    assert torch.equal(back.ids, t.ids) and torch.equal(back.values, t.values)
    assert (back.tail is None) == (kind == "sampled")
    if back.tail is not None:
        assert torch.equal(back.tail, t.tail)


def _corrupt(name: str, value) -> dict[str, np.ndarray]:
    arrays = topk_targets(_logits(dtype=torch.float32), 5).to_arrays()
    if value is None:
        del arrays[name]
    else:
        arrays[name] = value(arrays[name]) if callable(value) else value
    return arrays


@pytest.mark.parametrize(
    "name,value,message",
    [
        ("values", lambda a: a.astype(np.float32), "dtype float32"),
        ("ids", lambda a: a.astype(np.int64), "dtype int64"),
        ("ids", lambda a: a.astype(object), "dtype object"),
        ("tail", None, "expected"),
        ("extra", np.zeros(3), "expected"),
        ("kind", np.array("dense"), "kind"),
        ("values", lambda a: np.abs(a) + 1, "log-probabilities"),
        ("temperature", np.array(0.0), "positive"),
    ],
)
def test_loading_refuses_wrong_keys_dtypes_and_ranges(name, value, message):
    with pytest.raises(ValueError, match=message):
        SparseTargets.from_arrays(_corrupt(name, value))


def test_loading_refuses_ids_outside_the_vocabulary():
    arrays = topk_targets(_logits(dtype=torch.float32), 5).to_arrays()
    SparseTargets.from_arrays(arrays, vocab_size=11)
    with pytest.raises(ValueError, match="ids must lie"):
        SparseTargets.from_arrays(arrays, vocab_size=int(arrays["ids"].max()))
