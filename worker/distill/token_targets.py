"""Sparse teacher targets for token-level KD: per token k ids and k values, never a (tokens, V) tensor.

Two kinds, both rectangular (..., k) so a batch is one tensor and a shard is one array (shapes below say
(B, L, k); any leading shape works, e.g. a shard's (N, k)):

- `topk`: the teacher's k most probable ids, most probable first, with their log-probs, plus `tail` (B, L):
  the log of the teacher's mass outside those ids. The missing mass travels with the targets (computed from
  the full logits) rather than being rebuilt as 1 - sum(exp(fp16 values)), whose rounding error (~1e-3) is
  larger than the whole tail of a confident language model.
- `sampled`: ids drawn from the teacher with their count / k (Anshumann et al., ACL 2025), see
  `sampled_targets`.

A shard stores values and tail in fp16 and ids in `id_dtype(V)`: at k = 64 with a vocabulary of at most 65536
ids a top-k token costs 64 * (2 + 2) + 2 = 258 bytes. `to_arrays` / `from_arrays` give plain numpy arrays for
`np.savez` / `np.load(allow_pickle=False)`; loading checks every dtype, shape and range.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, cast

import numpy as np
import torch
from torch import Tensor

from worker.distill.errors import ConfigError

TargetKind = Literal["topk", "sampled"]
KINDS: tuple[str, ...] = ("topk", "sampled")
_ID_DTYPES = {torch.uint16: np.uint16, torch.int32: np.int32}
_STORED_VALUE_BYTES = 2  # values and tail are fp16 in a shard, whatever dtype they have in memory


def id_dtype(vocab_size: int) -> torch.dtype:
    """The narrowest dtype that holds every id of the vocabulary: uint16 up to 65536 ids, else int32."""
    if not 0 < vocab_size <= 2**31:
        raise ConfigError(f"vocabulary size {vocab_size} is out of range", field="vocab_size")
    return torch.uint16 if vocab_size <= 2**16 else torch.int32


@dataclass(frozen=True, eq=False)  # tensors have no single truth value for ==
class SparseTargets:
    """ids (B, L, k) uint16|int32; values (B, L, k) float: log-probs (`topk`) or probabilities (`sampled`);
    tail (B, L): log of the teacher's mass outside `ids` (topk only); `temperature`: the teacher's."""

    ids: Tensor
    values: Tensor
    kind: TargetKind
    tail: Tensor | None = None
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown target kind {self.kind!r}; known: {', '.join(KINDS)}")
        if self.ids.dtype not in _ID_DTYPES or not self.values.is_floating_point():
            raise ValueError(
                f"ids must be uint16 or int32 and values float, got {self.ids.dtype}, {self.values.dtype}"
            )
        if self.ids.shape != self.values.shape or self.ids.dim() < 1:
            raise ValueError(f"ids {tuple(self.ids.shape)} and values {tuple(self.values.shape)} must match")
        if (self.tail is not None) != (self.kind == "topk"):
            raise ValueError("top-k targets carry a tail (their missing mass); sampled targets carry none")
        if self.tail is not None and self.tail.shape != self.ids.shape[:-1]:
            raise ValueError(f"tail {tuple(self.tail.shape)} must be ids' shape {tuple(self.ids.shape[:-1])}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")

    @property
    def k(self) -> int:
        return int(self.ids.shape[-1])

    def covered_mass(self) -> Tensor:
        """(B, L) float32: the teacher's probability mass on the top-k ids (for the report)."""
        if self.tail is None:
            raise ValueError(
                "sampled targets hold count/k estimates, not the teacher's probabilities: the mass "
                "their ids cover is unknown"
            )
        return -torch.expm1(self.tail.float())

    def nbytes_per_token(self) -> int:
        """Bytes one token takes in a shard (`to_arrays`): k ids, k fp16 values, an fp16 tail for top-k."""
        header = _STORED_VALUE_BYTES if self.tail is not None else 0
        return self.k * (self.ids.element_size() + _STORED_VALUE_BYTES) + header

    def to(self, device: torch.device | str) -> SparseTargets:
        tail = None if self.tail is None else self.tail.to(device)
        return dataclasses.replace(self, ids=self.ids.to(device), values=self.values.to(device), tail=tail)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays for a shard; values and tail become fp16 (the stored format)."""
        arrays = {
            "kind": np.array(self.kind),
            "temperature": np.array(self.temperature, dtype=np.float64),
            "ids": self.ids.cpu().numpy(),
            "values": self.values.to(torch.float16).cpu().numpy(),
        }
        if self.tail is not None:
            arrays["tail"] = self.tail.to(torch.float16).cpu().numpy()
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray], vocab_size: int | None = None) -> SparseTargets:
        """The inverse of `to_arrays`; refuses any other key, dtype or shape, and ids >= `vocab_size`."""
        kind_array = np.asarray(arrays["kind"]) if "kind" in arrays else None
        if (
            kind_array is None
            or kind_array.dtype.kind != "U"
            or kind_array.shape != ()
            or str(kind_array) not in KINDS
        ):
            raise ValueError(f"soft-label arrays need a scalar string 'kind' in {KINDS}")
        kind = str(kind_array)
        expected = {"kind", "temperature", "ids", "values"} | ({"tail"} if kind == "topk" else set())
        if set(arrays.keys()) != expected:
            raise ValueError(
                f"{kind} soft-label arrays have keys {sorted(arrays.keys())}; expected {sorted(expected)}"
            )
        ids, values, temperature = arrays["ids"], arrays["values"], arrays["temperature"]
        _expect("ids", ids, tuple(_ID_DTYPES.values()))
        _expect("values", values, (np.float16,))
        _expect("temperature", temperature, (np.float64,))
        if temperature.shape != () or not np.isfinite(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a positive scalar, got {temperature!r}")
        if ids.size and (ids.min() < 0 or (vocab_size is not None and ids.max() >= vocab_size)):
            raise ValueError(f"ids must lie in [0, {vocab_size}); got {ids.min()}..{ids.max()}")
        if kind == "topk":
            _expect("tail", arrays["tail"], (np.float16,))
            if np.isnan(values).any() or (values > 0).any() or np.isnan(arrays["tail"]).any():
                raise ValueError("top-k values must be log-probabilities (<= 0, not NaN)")
        elif not ((values >= 0) & (values <= 1)).all():
            raise ValueError("sampled values must be probabilities in [0, 1]")
        tail = torch.from_numpy(np.array(arrays["tail"])) if kind == "topk" else None
        # np.array copies: the tensors never alias a (possibly read-only) buffer from np.load.
        return cls(
            torch.from_numpy(np.array(ids)),
            torch.from_numpy(np.array(values)),
            cast(TargetKind, kind),
            tail,
            float(temperature),
        )


def _expect(name: str, array: np.ndarray, dtypes: tuple[type, ...]) -> None:
    if not isinstance(array, np.ndarray) or array.dtype not in [np.dtype(d) for d in dtypes]:
        got = getattr(array, "dtype", type(array).__name__)
        raise ValueError(
            f"soft-label array {name!r} has dtype {got}; expected {[np.dtype(d).name for d in dtypes]}"
        )


def _check(k: int, temperature: float) -> None:
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}", field="topk")
    if not temperature > 0:
        raise ConfigError(f"temperature must be positive, got {temperature}", field="temperature")


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    # fp32 (fp64 for fp64 logits): bf16 keeps ~3 digits, too few for the small probabilities KD learns from.
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return torch.log_softmax(logits.to(dtype) / temperature, dim=-1)


@torch.no_grad()
def topk_targets(
    logits: Tensor, k: int, temperature: float = 1.0, value_dtype: torch.dtype = torch.float16
) -> SparseTargets:
    """The teacher's top-k log-probs at `temperature` from one batch of logits (B, L, V); k is capped at V.

    `tail` is a logsumexp over the other ids, not log(1 - sum p): that difference cancels to rounding noise
    exactly when the top-k covers nearly all the mass. `value_dtype`: fp16 for storage, fp64 in exact tests.
    """
    _check(k, temperature)
    log_p = _log_probs(logits, temperature)
    values, ids = log_p.topk(min(k, log_p.shape[-1]), dim=-1, sorted=True)
    tail = log_p.scatter(-1, ids, float("-inf")).logsumexp(-1)  # -inf when k = V: no mass is missing
    return SparseTargets(
        ids.to(id_dtype(log_p.shape[-1])), values.to(value_dtype), "topk", tail.to(value_dtype), temperature
    )


@torch.no_grad()
def sampled_targets(
    logits: Tensor,
    k: int,
    generator: torch.Generator,
    temperature: float = 1.0,
    value_dtype: torch.dtype = torch.float16,
) -> SparseTargets:
    """Sparse Logit Sampling (Anshumann et al., ACL 2025): k draws per token from the teacher, with counts.

    For each token, draw k ids i.i.d. (with replacement) from p = softmax(logits / temperature) and store
    each distinct drawn id with value count / k, most frequent first; the remaining slots hold id 0 with
    value 0, so the tensors stay (B, L, k) and padding carries no weight. The count of id i is
    Binomial(k, p_i), hence E[count_i / k] = p_i for every id (an unseen id has estimate 0 and is not
    stored): the targets are an unbiased estimate of the whole teacher distribution. Any loss linear in
    the teacher's probabilities (cross-entropy, the gradient of forward KL) is then unbiased too, where
    top-k, dropping the tail, is biased; the paper finds about 12 draws match full KD. The proposal is the
    teacher itself (at `temperature`), so no importance weights are needed. `generator` (on the logits'
    device) makes it reproducible: the same seed and logits give identical targets, so a resumed shard is
    identical.
    """
    _check(k, temperature)
    probs = _log_probs(logits, temperature).exp()
    vocab = probs.shape[-1]
    draws = torch.multinomial(probs.reshape(-1, vocab), k, replacement=True, generator=generator)
    draws = draws.sort(dim=-1).values
    # Runs of equal ids in the sorted draws are one distinct id each; `slot` numbers the runs 0, 1, ...
    starts = torch.ones_like(draws, dtype=torch.bool)
    starts[:, 1:] = draws[:, 1:] != draws[:, :-1]
    slot = starts.long().cumsum(-1) - 1
    counts = torch.zeros_like(draws).scatter_add_(-1, slot, torch.ones_like(draws))
    # Every draw written to a slot carries the same id, so scatter's duplicate writes cannot disagree.
    ids = torch.zeros_like(draws).scatter_(-1, slot, draws)
    order = counts.argsort(dim=-1, descending=True, stable=True)
    counts, ids = counts.gather(-1, order), ids.gather(-1, order)
    ids = ids.masked_fill(counts == 0, 0)
    shape = (*probs.shape[:-1], k)
    values = (counts.to(probs.dtype) / k).reshape(shape)
    return SparseTargets(
        ids.reshape(shape).to(id_dtype(vocab)), values.to(value_dtype), "sampled", None, temperature
    )
