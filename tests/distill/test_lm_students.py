"""LM students: specs resolved from the teacher's config, layer-dropped teacher copies, user folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lm_student_fixtures import teacher

from worker.distill.errors import ConfigError
from worker.distill.lm_students import LM_STUDENTS, build_lm_student, load_lm_student_init


@pytest.fixture(scope="module")
def tiny_teacher():  # 4 layers, hidden 64, 4 heads of 16, 2 key/value heads, vocab 300
    return teacher(300)


def test_unset_sizes_come_from_the_teacher(tiny_teacher) -> None:
    model, resolved = build_lm_student("causal_lm", tiny_teacher)
    # Half the depth and width, the teacher's head size, kv heads = heads, MLP 3x, the teacher's vocabulary.
    assert {k: resolved[k] for k in ("family", "layers", "hidden", "heads", "kv_heads", "head_dim")} == {
        "family": "llama", "layers": 2, "hidden": 32, "heads": 2, "kv_heads": 2, "head_dim": 16,
    }  # fmt: skip
    assert resolved["intermediate"] == 96
    assert resolved["vocab_size"] == 300 and resolved["max_position_embeddings"] == 128
    assert resolved["parameters"] == sum(p.numel() for p in model.parameters())
    assert model.config.bos_token_id == 1 and model.config.eos_token_id == 2  # special ids kept
    json.dumps(resolved)  # the report stores it as it is


def test_given_sizes_are_used_and_the_rest_follow(tiny_teacher) -> None:
    model, resolved = build_lm_student("causal_lm:layers=3;hidden=48;heads=6;kv_heads=2", tiny_teacher)
    assert (resolved["layers"], resolved["hidden"], resolved["heads"], resolved["kv_heads"]) == (3, 48, 6, 2)
    assert resolved["head_dim"] == 8 and resolved["intermediate"] == 144
    assert model.config.head_dim == 8  # not the teacher's 16, which the copied config carried
    _, by_heads = build_lm_student("causal_lm:heads=3", tiny_teacher)
    assert (by_heads["hidden"], by_heads["head_dim"]) == (48, 16)  # heads alone: the teacher's head size
    logits = model(input_ids=torch.tensor([[1, 5, 7]])).logits
    assert logits.shape == (1, 3, 300)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("causal_lm:hidden=50;heads=4", "not a multiple of heads"),
        ("causal_lm:heads=4;kv_heads=3;hidden=64", "kv_heads 3 must divide heads 4"),
        ("causal_lm:layers=0", "layers must be a positive integer"),
        ("causal_lm:depth=2", "unknown parameter(s) depth"),
        ("transformer:layers=2", "unknown student 'transformer'; known: causal_lm, teacher_layers"),
        ("teacher_layers:keep=0,4", "teacher layers in 0..3"),
        ("teacher_layers:keep=2,1", "ascending and distinct"),
        ("teacher_layers", "set keep"),
    ],
)
def test_invalid_specs_are_config_errors(tiny_teacher, spec: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_lm_student(spec, tiny_teacher)
    assert words in info.value.message
    assert info.value.field == "student"


def test_registry_is_closed() -> None:
    assert LM_STUDENTS.names() == ["causal_lm", "teacher_layers"]


def test_teacher_layers_copies_the_chosen_layers(tiny_teacher) -> None:
    model, resolved = build_lm_student("teacher_layers:keep=0,3", tiny_teacher)
    assert (resolved["layers"], resolved["hidden"], resolved["kv_heads"]) == (2, 64, 2)
    ours, theirs = model.state_dict(), tiny_teacher.model.state_dict()
    for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)
    for i, kept in enumerate([0, 3]):
        for part in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "mlp.down_proj.weight",
                     "input_layernorm.weight"):  # fmt: skip
            torch.testing.assert_close(
                ours[f"model.layers.{i}.{part}"], theirs[f"model.layers.{kept}.{part}"]
            )
    assert not torch.equal(ours["model.layers.1.self_attn.q_proj.weight"],
                           theirs["model.layers.1.self_attn.q_proj.weight"])  # fmt: skip
    # A copy, not a view: training the student leaves the teacher alone.
    assert ours["lm_head.weight"].data_ptr() != theirs["lm_head.weight"].data_ptr()


def test_keeping_every_layer_reproduces_the_teacher(tiny_teacher) -> None:
    model, _ = build_lm_student("teacher_layers:keep=0,1,2,3", tiny_teacher)
    ids = torch.tensor([[1, 17, 42, 99, 3]])
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval()(input_ids=ids).logits, tiny_teacher.model(input_ids=ids).logits
        )


def test_student_init_loads_a_safetensors_folder(tiny_teacher, tmp_path: Path) -> None:
    student, _ = build_lm_student("causal_lm:layers=1", tiny_teacher)
    student.save_pretrained(tmp_path / "init")
    loaded, resolved = load_lm_student_init(tmp_path / "init", tiny_teacher)
    assert resolved["student"] == "student_init" and resolved["layers"] == 1
    for key, value in student.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_student_init_refuses_pickles_custom_code_and_other_vocabularies(
    tiny_teacher, tmp_path: Path
) -> None:
    student, _ = build_lm_student("causal_lm:layers=1", tiny_teacher)
    folder = tmp_path / "init"
    student.save_pretrained(folder)
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ConfigError, match="pickle-based weights") as info:
        load_lm_student_init(folder, tiny_teacher)
    assert info.value.code == "invalid_student_init"
    (folder / "pytorch_model.bin").unlink()
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "x.Y"}}))
    with pytest.raises(ConfigError, match="custom code"):
        load_lm_student_init(folder, tiny_teacher)
    other, _ = build_lm_student("causal_lm:layers=1", teacher(200))
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ConfigError, match="vocabulary of 200 ids; the teacher's has 300"):
        load_lm_student_init(tmp_path / "other", tiny_teacher)
