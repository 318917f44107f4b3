"""Tiny language-model pieces for the LM student, training and export tests: no download, seconds to build.

A teacher is a 2-4 layer random LlamaConfig model; the tokenizer is a byte-level BPE trained here; the toy
corpus is a first-order Markov chain whose transition matrix is the "teacher that knows the answer": its
exact next-token distribution serves as the soft labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor

from worker.distill.token_targets import SparseTargets, topk_targets

TEXTS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.",
    "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition.",
    "The family of Dashwood had long been settled in Sussex.",
    "No one who had ever seen Catherine Morland in her infancy would have supposed her born to be a heroine.",
] * 4


@dataclass(frozen=True)
class Windows:
    """One split's windows, as `text_data.TokenSplit` holds them."""

    input_ids: Tensor  # int32 (N, L)
    attention_mask: Tensor  # bool (N, L)
    loss_mask: Tensor  # bool (N, L)


def tokenizer(vocab_size: int = 300) -> Any:
    """A byte-level BPE fast tokenizer with <s>, </s> and <pad>, trained on TEXTS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def teacher(
    vocab_size: int = 300,
    *,
    layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    seed: int = 0,
) -> SimpleNamespace:
    """An object shaped like `lm_teachers.LMTeacher`: a random tiny Llama with its config."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    return SimpleNamespace(model=model, config=config, vocab_size=vocab_size, tokenizer=None)


def markov_chain(vocab_size: int, successors: int, seed: int) -> Tensor:
    """(V, V) float64 transition probabilities: each token has `successors` possible next tokens."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.zeros(vocab_size, vocab_size, dtype=torch.float64)
    for token in range(vocab_size):
        nxt = torch.randperm(vocab_size, generator=g)[:successors]
        weights = -torch.rand(successors, dtype=torch.float64, generator=g).log()  # normalised: Dirichlet(1)
        probs[token, nxt] = weights / weights.sum()
    return probs


def chain_windows(probs: Tensor, n: int, length: int, seed: int) -> Windows:
    """n windows sampled from the chain; every prediction counts except the last position's."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.empty(n, length, dtype=torch.long)
    ids[:, 0] = torch.randint(probs.shape[0], (n,), generator=g)
    for t in range(1, length):
        ids[:, t] = torch.multinomial(probs[ids[:, t - 1]], 1, generator=g).squeeze(1)
    loss_mask = torch.ones(n, length, dtype=torch.bool)
    loss_mask[:, -1] = False
    return Windows(ids.to(torch.int32), torch.ones(n, length, dtype=torch.bool), loss_mask)


def chain_targets(probs: Tensor, windows: Windows, k: int) -> SparseTargets:
    """The chain's exact next-token distribution at every position, as top-k soft labels (N, L, k)."""
    logits = probs[windows.input_ids.long()].clamp_min(1e-30).log()
    return topk_targets(logits, k)


def row_loader(targets: SparseTargets, calls: list[Tensor] | None = None) -> Any:
    """targets_loader over stored targets; records the rows asked for in `calls`."""

    def load(rows: Tensor) -> SparseTargets:
        if calls is not None:
            calls.append(rows.clone())
        tail = None if targets.tail is None else targets.tail[rows]
        return SparseTargets(targets.ids[rows], targets.values[rows], targets.kind, tail, targets.temperature)

    return load
