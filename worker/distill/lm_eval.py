"""Held-out metrics of a causal LM over token windows: perplexity, agreement and KL with the teacher, speed.

Alignment (as in `lm_losses`): the logits at position t predict token t + 1, so a window of L tokens gives
L - 1 predictions, and `loss_mask[:, t]` says whether the prediction made FROM position t counts (not a
prompt, not padding). Teacher targets come per window as (N, L, k), position t describing token t + 1 too
(the teacher's logits at t); the last position predicts nothing and is dropped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worker.distill.lm_losses import IGNORE_INDEX, forward_kl_sparse
from worker.distill.token_targets import SparseTargets

EVAL_BATCH = 8
TargetsLoader = Callable[[Tensor], SparseTargets]  # row indices (B,) int64 -> those rows' targets (B, L, k)


class TokenWindows(Protocol):
    """One split's windows as the metrics and the training loop read them: `text_data.TokenSplit`
    (`TokenData.split("train")`) or anything with these three tensors."""

    @property
    def input_ids(self) -> Tensor: ...  # int32 (N, L)

    @property
    def attention_mask(self) -> Tensor: ...  # bool (N, L)

    @property
    def loss_mask(self) -> Tensor: ...  # bool (N, L): the prediction FROM position t counts


def shift_labels(input_ids: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    """(B, L) ids and loss mask -> labels (B, L - 1) int64 (-100 where not counted) and mask (B, L - 1)."""
    mask = loss_mask[:, :-1].bool()
    labels = input_ids[:, 1:].long().masked_fill(~mask, IGNORE_INDEX)
    return labels, mask


def next_token_targets(targets: SparseTargets, length: int) -> SparseTargets:
    """Targets for the L - 1 predictions of a window of `length` tokens: (B, L, k) loses its last position;
    (B, L - 1, k) is taken as already aligned."""
    stored = targets.ids.shape[1]
    if stored == length - 1:
        return targets
    if stored != length:
        raise ValueError(f"teacher targets cover {stored} positions; windows have {length} tokens")
    tail = None if targets.tail is None else targets.tail[:, :-1]
    return dataclasses.replace(targets, ids=targets.ids[:, :-1], values=targets.values[:, :-1], tail=tail)


def predict(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Logits (B, L - 1, V) for the next-token predictions of a batch of windows (ids may be int32)."""
    logits: Tensor = model(input_ids=input_ids.long(), attention_mask=attention_mask.long()).logits
    return logits[:, :-1]


def autocast_for(device: torch.device) -> Any:
    """bf16 autocast on CUDA, nothing on CPU (fp32 there: bf16 matmuls on CPU are slow and lossy)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def perplexity(model: nn.Module, windows: TokenWindows, *, batch_size: int = EVAL_BATCH) -> float:
    """exp(mean next-token NLL over the counted tokens of all windows); nan when no token counts."""
    return float(evaluate_lm(model, windows, batch_size=batch_size)["perplexity"])


@torch.inference_mode()
def evaluate_lm(
    model: nn.Module,
    windows: TokenWindows,
    targets_loader: TargetsLoader | None = None,
    *,
    batch_size: int = EVAL_BATCH,
) -> dict[str, Any]:
    """Perplexity, and with the teacher's targets: top-1 agreement and KL(teacher || student) at T = 1.

    agreement: the share of counted tokens where the student's argmax is the teacher's first stored id (its
    most probable for top-k targets, its most drawn for sampled ones). kl: `forward_kl_sparse`, the mean over
    counted tokens. Sums run over tokens, not batches, so the batch size does not change the numbers.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nll, kl = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    agree = counted = 0
    n, length = windows.input_ids.shape
    for start in range(0, n, batch_size):
        rows = torch.arange(start, min(start + batch_size, n))
        ids = windows.input_ids[rows].to(device)
        labels, mask = shift_labels(ids, windows.loss_mask[rows].to(device))
        with autocast_for(device):
            logits = predict(model, ids, windows.attention_mask[rows].to(device))
        logits = logits.float()
        nll += F.cross_entropy(
            logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="sum"
        ).cpu()
        counted += int(mask.sum())
        if targets_loader is not None:
            targets = next_token_targets(targets_loader(rows), length).to(device)
            kl += forward_kl_sparse(logits, targets, mask, reduction="none").sum().double().cpu()
            top1 = targets.ids[..., 0].long()
            agree += int(((logits.argmax(-1) == top1) & mask).sum())
    model.train(was_training)
    mean_nll = nll.item() / counted if counted else math.nan
    has_teacher = targets_loader is not None and counted > 0
    return {
        "perplexity": math.exp(mean_nll) if counted else math.nan,
        "nll": mean_nll,
        "tokens": counted,
        "agreement": agree / counted if has_teacher else None,
        "kl": kl.item() / counted if has_teacher else None,
    }


@torch.inference_mode()
def tokens_per_second(
    model: nn.Module, seq_len: int, *, batch_sizes: Sequence[int] = (1, 8), seconds: float = 0.5
) -> dict[str, float]:
    """Forward-pass throughput on the model's device (put it on CPU for the report's CPU figure):
    {"batch_1": tokens/s, "batch_8": ...}, each timed for about `seconds` after one warm-up pass."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    config: Any = model.config
    vocab = int(config.vocab_size)
    generator = torch.Generator().manual_seed(0)
    result = {}
    for batch in batch_sizes:
        ids = torch.randint(vocab, (batch, seq_len), generator=generator).to(device)
        model(input_ids=ids)  # warm-up: allocations and lazy initialisation are not the model's speed
        runs, started = 0, time.perf_counter()
        while runs == 0 or time.perf_counter() - started < seconds:
            model(input_ids=ids)
            runs += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        result[f"batch_{batch}"] = runs * batch * seq_len / (time.perf_counter() - started)
    model.train(was_training)
    return result


@torch.inference_mode()
def generate_side_by_side(
    teacher_model: nn.Module,
    student_model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
) -> list[dict[str, str]]:
    """Greedy continuations of each prompt by teacher and student: [{"prompt", "teacher", "student"}]."""
    rows = []
    for prompt in prompts:
        row = {"prompt": prompt}
        for name, model in (("teacher", teacher_model), ("student", student_model)):
            row[name] = _greedy(model, tokenizer, prompt, max_new_tokens)
        rows.append(row)
    return rows


def _greedy(model: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int) -> str:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = torch.tensor([tokenizer(prompt)["input_ids"]], dtype=torch.long, device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(  # type: ignore[operator]
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
    )
    model.train(was_training)
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
