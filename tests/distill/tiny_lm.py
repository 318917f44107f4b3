"""Tiny causal-LM pieces built in the test, never downloaded: a BPE tokenizer, a 2-layer Llama, a GGUF."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

EOS = "<|endoftext|>"
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, this is a test of tiny teachers",
    "a small model learns from a larger one, token by token",
    "distillation keeps the teacher's probabilities, not only its answers",
] * 10


@lru_cache(maxsize=1)
def tokenizer_json() -> str:
    """A byte-level BPE of ~300 ids trained on CORPUS (the GPT-2 scheme, so GGUF can carry it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return str(tok.to_str())


def fast_tokenizer() -> Any:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json()), eos_token=EOS)


def tiny_llama(vocab_size: int, seed: int = 0) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


def save_folder(folder: Path, *, max_shard_size: str | None = None, seed: int = 0) -> Any:
    """A Hugging Face folder (safetensors + config + tokenizer) in `folder`; returns the in-memory model."""
    tokenizer = fast_tokenizer()
    model = tiny_llama(len(tokenizer), seed)
    extra = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **extra)
    tokenizer.save_pretrained(folder)
    return model


def pack(folder: Path, archive: Path) -> Path:
    """`folder` as a .tar.gz or .zip (by `archive`'s suffix), members under a wrapping folder name."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for p in files:
                zf.write(p, f"model/{p.relative_to(folder).as_posix()}")
    else:
        with tarfile.open(archive, "w:gz") as tf:
            for p in files:
                tf.add(p, f"model/{p.relative_to(folder).as_posix()}")
    return archive


def tar_bytes(archive: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(archive, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return archive


def write_gguf(path: Path, model: Any, *, architecture: str = "llama") -> Path:
    """The model and tokenizer as an F32 GGUF, laid out as llama.cpp's converter writes a Llama."""
    import gguf

    config = model.config
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_vocab_size(config.vocab_size)
    bpe = json.loads(tokenizer_json())["model"]
    tokens = [t for t, _ in sorted(bpe["vocab"].items(), key=lambda item: item[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t == EOS else 1 for t in tokens])  # 3: control
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
    writer.add_eos_token_id(tokens.index(EOS))
    writer.add_bos_token_id(tokens.index(EOS))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        array = tensor.detach().float().numpy()
        heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
        for proj, n_head in heads.items():
            if name.endswith(f"{proj}.weight"):  # llama.cpp's rotary layout; transformers undoes it on load
                shape = array.shape
                array = array.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2)
                array = array.reshape(shape)
        writer.add_tensor(
            names.get_name(name, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(array)
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
