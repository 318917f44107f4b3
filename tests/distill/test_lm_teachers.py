"""Causal-LM teachers: HF folders in archives and GGUF files load offline; every unsafe or invalid upload is
refused with its code before any of it is loaded."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tiny_lm import fast_tokenizer, pack, save_folder, tar_bytes, tiny_llama, write_gguf

from worker.distill.errors import TeacherError
from worker.distill.lm_teachers import load_lm_teacher

torch.set_num_threads(1)
TEXT = "hello world, the quick fox"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    root = tmp_path_factory.mktemp("hf") / "model"
    return root, save_folder(root)


def _same_logits(teacher, model) -> None:
    rows = [teacher.tokenizer(t)["input_ids"] for t in (TEXT, "a small model")]
    length = max(map(len, rows))
    ids = torch.tensor([r + [0] * (length - len(r)) for r in rows])  # right-padded, as windows are
    mask = torch.tensor([[i < len(r) for i in range(length)] for r in rows])
    got = teacher.logits(ids, mask)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask.long()).logits
    assert got.shape == (2, length, teacher.vocab_size)
    torch.testing.assert_close(got, want)


def test_a_folder_in_a_tar_gz_loads_offline_and_gives_the_models_logits(folder, tmp_path):
    root, model = folder
    teacher = load_lm_teacher(pack(root, tmp_path / "teacher.tar.gz"), tmp_path / "work")
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"
    assert teacher.source == "hf_folder" and not teacher.model.training
    assert teacher.tokenizer.is_fast and teacher.tokenizer.eos_token == "<|endoftext|>"
    assert teacher.tokenizer(TEXT)["input_ids"] == fast_tokenizer()(TEXT)["input_ids"]
    assert next(teacher.model.parameters()).dtype == torch.float32
    _same_logits(teacher, model)
    info = teacher.describe()
    assert info["architecture"] == "LlamaForCausalLM" and info["layers"] == 2 and info["hidden"] == 32
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["vocab_size"] == teacher.vocab_size == len(teacher.tokenizer)


def test_a_sharded_folder_in_a_zip_loads(tmp_path):
    root = tmp_path / "sharded"
    model = save_folder(root, max_shard_size="20KB", seed=1)
    assert (root / "model.safetensors.index.json").is_file()
    _same_logits(load_lm_teacher(pack(root, tmp_path / "t.zip"), tmp_path / "work"), model)


def test_a_gguf_file_loads_with_its_own_tokenizer(tmp_path):
    model = tiny_llama(len(fast_tokenizer()), seed=2)
    path = write_gguf(tmp_path / "teacher.bin.upload", model)  # told by its bytes, not its name
    teacher = load_lm_teacher(path, tmp_path / "work")
    assert teacher.source == "gguf" and teacher.describe()["model_type"] == "llama"
    assert teacher.tokenizer(TEXT)["input_ids"] == fast_tokenizer()(TEXT)["input_ids"]
    assert teacher.tokenizer.eos_token == "<|endoftext|>"
    _same_logits(teacher, model)


def _refused(archive: Path, tmp_path: Path, code: str) -> TeacherError:
    with pytest.raises(TeacherError) as err:
        load_lm_teacher(archive, tmp_path / "work")
    assert err.value.code == code, err.value.message
    return err.value


def _edit_json(name: str, **changes) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        data = json.loads((root / name).read_text())
        (root / name).write_text(json.dumps(data | changes))

    return edit


def _drop_index_shard(root: Path) -> None:
    index = json.loads((root / "model.safetensors.index.json").read_text())
    index["weight_map"] = {"lm_head.weight": "../outside.safetensors"}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))


REFUSALS = {
    "pickle weights beside safetensors": (
        "unsafe_weights",
        lambda r: (r / "pytorch_model.bin").write_bytes(b"x"),
    ),
    "a .pt checkpoint in a subfolder": ("unsafe_weights", lambda r: _write(r / "extra" / "ckpt.pt", b"x")),
    "auto_map in config.json": ("custom_code", _edit_json("config.json", auto_map={"AutoModel": "m.Model"})),
    "auto_map in tokenizer_config.json": ("custom_code", _edit_json("tokenizer_config.json", auto_map={})),
    "trust_remote_code in config.json": ("custom_code", _edit_json("config.json", trust_remote_code=True)),
    "a python file": ("custom_code", lambda r: (r / "modeling_evil.py").write_text("import os")),
    "no config.json": ("invalid_teacher", lambda r: (r / "config.json").unlink()),
    "no tokenizer.json": ("invalid_teacher", lambda r: (r / "tokenizer.json").unlink()),
    "no weights": ("invalid_teacher", lambda r: (r / "model.safetensors").unlink()),
    "an index naming a shard outside the folder": ("invalid_teacher", _drop_index_shard),
    "config.json not JSON": ("invalid_teacher", lambda r: (r / "config.json").write_text("{nope")),
    "an encoder, not a causal LM": ("unsupported_architecture", _edit_json("config.json", model_type="t5")),
    "an unknown model_type": ("unsupported_architecture", _edit_json("config.json", model_type="evil_net")),
}


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.mark.parametrize("case", REFUSALS)
def test_a_bad_folder_is_refused_with_its_code(case, folder, tmp_path):
    code, damage = REFUSALS[case]
    root = tmp_path / "model"
    shutil.copytree(folder[0], root)
    if case.startswith("an index"):
        (root / "model.safetensors.index.json").write_text("{}")
    damage(root)
    _refused(pack(root, tmp_path / "teacher.tar.gz"), tmp_path, code)


def test_a_bare_pickle_upload_is_refused(tmp_path):
    path = tmp_path / "teacher.pt"
    path.write_bytes(pickle.dumps({"weight": [1.0]}, protocol=4))
    _refused(path, tmp_path, "unsafe_weights")


def test_neither_archive_nor_gguf_is_invalid(tmp_path):
    path = tmp_path / "teacher.safetensors"
    path.write_bytes(b"not a model at all")
    _refused(path, tmp_path, "invalid_teacher")


def test_an_archive_escaping_its_folder_is_refused(tmp_path):
    archive = tar_bytes(tmp_path / "t.tar.gz", {"../config.json": b"{}"})
    _refused(archive, tmp_path, "unsafe_member")


@pytest.mark.parametrize("arch", ["t5", "evil_net"])
def test_a_gguf_of_an_architecture_transformers_cannot_run_is_refused(arch, tmp_path):
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), arch)
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    _refused(tmp_path / "m.gguf", tmp_path, "unsupported_architecture")


def test_a_truncated_gguf_is_invalid(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00")
    _refused(path, tmp_path, "invalid_teacher")
