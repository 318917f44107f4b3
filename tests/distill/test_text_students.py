"""Text-classifier students: built from a tiny BERT teacher and a WordPiece tokenizer made here, never
downloaded; every kind ignores extra padding, learns a toy task and exports to ONNX (and the two transformer
kinds to a folder `from_pretrained` loads)."""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from worker.distill.errors import ConfigError
from worker.distill.export import ExportError
from worker.distill.text_export import (
    HF_ARCHIVE,
    export_text_hf,
    export_text_onnx,
    has_hf_export,
)
from worker.distill.text_students import TEXT_STUDENTS, build_text_student, is_text_student

PAD = 0
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
GOOD = ["a good film", "good acting and a good plot", "the cast was good", "good fun for everyone"]
BAD = ["a bad film", "bad acting and a bad plot", "the cast was bad", "bad fun for nobody"]
SMALL = {
    "text_transformer": "text_transformer:layers=1;hidden=16;heads=2;intermediate=32",
    "teacher_layers": "teacher_layers:keep=0,2",
    "textcnn": "textcnn:embed=16;channels=8;kernels=2,3;dropout=0.1",
    "bow": "bow:embed=16",
}


@dataclass
class Teacher:
    pad_id: int
    max_positions: int | None
    hf_config: Any | None
    model: nn.Module | None
    tokenizer: Any


@lru_cache(maxsize=1)
def tokenizer() -> Any:
    """WordPiece with BERT's specials and template: [CLS] text [SEP]."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(GOOD + BAD, trainers.WordPieceTrainer(vocab_size=120, special_tokens=SPECIALS))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]",
    )  # fmt: skip


def bert_teacher() -> Teacher:
    from transformers import BertConfig, BertForSequenceClassification

    tok = tokenizer()
    config = BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, pad_token_id=PAD, id2label={0: "neg", 1: "neutral", 2: "pos"},
    )  # fmt: skip
    config.name_or_path = "org/bert-teacher"
    torch.manual_seed(0)
    return Teacher(PAD, 64, config, BertForSequenceClassification(config).eval(), tok)


def onnx_teacher() -> Teacher:
    return Teacher(PAD, None, None, None, tokenizer())


def batch(texts: list[str]) -> Tensor:
    return torch.tensor(tokenizer()(texts, padding=True)["input_ids"])


def build(
    spec: str, teacher: Teacher | None = None, num_classes: int = 3
) -> tuple[nn.Module, dict[str, Any]]:
    torch.manual_seed(0)
    return build_text_student(spec, teacher or bert_teacher(), num_classes)


def test_the_registry_holds_the_four_kinds() -> None:
    assert TEXT_STUDENTS.names() == sorted(SMALL)
    assert all(map(is_text_student, ["textcnn:embed=8", " bow ", "teacher_layers", "text_transformer:x=1"]))
    assert not any(map(is_text_student, ["mlp:hidden=8", "causal_lm", ""]))


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_student_gives_logits_that_extra_padding_leaves_unchanged(kind: str) -> None:
    student, resolved = build(SMALL[kind])
    student.eval()
    ids = batch(["a good film", "bad"])
    assert ids[1, -1] == PAD  # the short row is padded
    with torch.no_grad():
        logits = student(ids)
        padded = student(torch.cat([ids, torch.full((2, 5), PAD)], dim=1))
        alone = student(ids[1:, : int((ids[1] != PAD).sum())])
    assert logits.shape == (2, 3) and logits.dtype == torch.float32
    torch.testing.assert_close(padded, logits)
    torch.testing.assert_close(alone, logits[1:])
    assert student.pad_id == PAD
    assert resolved["student"] == kind and resolved["num_classes"] == 3 and resolved["pad_id"] == PAD
    assert resolved["vocab_size"] == len(tokenizer())
    assert resolved["parameters"] == sum(p.numel() for p in student.parameters())
    assert has_hf_export(student) == (kind in ("text_transformer", "teacher_layers"))


@pytest.mark.parametrize("kind", ["bow", "textcnn", "text_transformer"])
def test_student_learns_good_from_bad(kind: str) -> None:
    student, _ = build(SMALL[kind], num_classes=2)
    ids, labels = batch(GOOD + BAD), torch.tensor([1] * len(GOOD) + [0] * len(BAD))
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-2)
    losses = []
    for _ in range(20):
        loss = nn.functional.cross_entropy(student(ids), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses


def test_text_transformer_is_the_teachers_family_with_its_label_names() -> None:
    from transformers import BertConfig

    student, resolved = build("text_transformer:layers=2;hidden=16;heads=4")
    config = student.hf.config
    assert type(config) is BertConfig and config.model_type == "bert"
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (2, 16, 4)
    assert config.intermediate_size == 64  # 4x the width, as in BERT
    assert config.id2label == {0: "neg", 1: "neutral", 2: "pos"}
    assert (config.vocab_size, config.max_position_embeddings) == (len(tokenizer()), 64)
    sizes = ("family", "layers", "hidden", "heads", "intermediate", "max_positions")
    assert [resolved[k] for k in sizes] == ["bert", 2, 16, 4, 64, 64]
    assert resolved["config"]["_name_or_path"] == ""  # the teacher's origin is not the student's

    defaults, _ = build("text_transformer")  # half the teacher's depth and width at its head size
    c = defaults.hf.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads) == (2, 16, 1)
    two_classes, _ = build("text_transformer", num_classes=2)
    assert two_classes.hf.config.num_labels == 2


def test_text_transformer_for_an_onnx_teacher_is_a_bert_on_its_tokenizer() -> None:
    student, resolved = build("text_transformer:layers=1;hidden=16;heads=2", onnx_teacher())
    config = student.hf.config
    assert config.model_type == "bert"
    assert (config.vocab_size, config.pad_token_id, config.num_labels) == (len(tokenizer()), PAD, 3)
    assert resolved["max_positions"] == config.max_position_embeddings == 512


def test_teacher_layers_copies_the_chosen_layers_and_the_embeddings() -> None:
    teacher = bert_teacher()
    student, resolved = build("teacher_layers:keep=1,3", teacher)
    assert resolved["keep"] == [1, 3] and resolved["layers"] == 2 and resolved["hidden"] == 32
    t, s = teacher.model.state_dict(), student.hf.state_dict()
    for i, kept in enumerate((1, 3)):
        layer = {k: v for k, v in s.items() if k.startswith(f"bert.encoder.layer.{i}.")}
        assert layer
        for key, value in layer.items():
            torch.testing.assert_close(value, t[key.replace(f"layer.{i}.", f"layer.{kept}.")], rtol=0, atol=0)
    for key in [k for k in s if k.startswith(("bert.embeddings.", "bert.pooler.", "classifier."))]:
        torch.testing.assert_close(s[key], t[key], rtol=0, atol=0)
    assert s["classifier.weight"].data_ptr() != t["classifier.weight"].data_ptr()  # a copy, not shared
    # Every kept layer: the student is the teacher with layers 0 and 2 skipped
    every, _ = build("teacher_layers:keep=0,1,2,3", teacher)
    with torch.no_grad():
        ids = batch(GOOD)
        torch.testing.assert_close(
            every.eval()(ids), teacher.model(input_ids=ids, attention_mask=ids != PAD).logits
        )

    fresh_head, _ = build("teacher_layers:keep=0", teacher, num_classes=2)  # the head cannot fit: fresh
    assert fresh_head.hf.classifier.weight.shape == (2, 32)


def test_distilbert_teacher_sizes_are_read_and_written_under_its_own_names() -> None:
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    config = DistilBertConfig(vocab_size=len(tokenizer()), dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                              max_position_embeddings=64, num_labels=3)  # fmt: skip
    torch.manual_seed(0)
    teacher = Teacher(PAD, 64, config, DistilBertForSequenceClassification(config).eval(), tokenizer())
    fresh, resolved = build("text_transformer:layers=1;hidden=16;heads=2", teacher)
    c = fresh.hf.config
    assert (c.model_type, c.n_layers, c.dim, c.n_heads, c.hidden_dim) == ("distilbert", 1, 16, 2, 64)
    kept, _ = build("teacher_layers:keep=1", teacher)
    key = "distilbert.transformer.layer.0.ffn.lin1.weight"
    torch.testing.assert_close(
        kept.hf.state_dict()[key], teacher.model.state_dict()[key.replace(".0.", ".1.")]
    )
    ids = batch(["a good film", "bad"])
    assert fresh(ids).shape == kept(ids).shape == (2, 3)


@pytest.mark.parametrize(
    ("spec", "teacher", "message"),
    [
        ("lstm:hidden=8", "bert", "unknown student 'lstm'"),
        ("bow:embed=8;depth=2", "bert", "unknown parameter(s) depth"),
        ("bow:embed=0", "bert", "embed must be a positive integer"),
        ("textcnn:kernels=3,0", "bert", "kernels must be a positive integer"),
        ("textcnn:dropout=1.5", "bert", "dropout must be in [0, 1)"),
        ("text_transformer:hidden=30;heads=4", "bert", "not a multiple of heads"),
        ("text_transformer:layers=two", "bert", "layers must be a positive integer"),
        ("teacher_layers", "bert", "set keep"),
        ("teacher_layers:keep=0,4", "bert", "keep must list teacher layers in 0..3"),
        ("teacher_layers:keep=2,1", "bert", "ascending and distinct"),
        ("teacher_layers:keep=0", "onnx", "teacher_layers needs a Hugging Face teacher"),
    ],
)
def test_bad_specs_are_config_errors_on_the_student_field(spec: str, teacher: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        build(spec, bert_teacher() if teacher == "bert" else onnx_teacher())
    assert message in info.value.message and info.value.field == "student"


def test_no_classes_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="num_classes"):
        build("bow", num_classes=0)


@pytest.mark.parametrize("kind", ["text_transformer", "teacher_layers"])
def test_hf_export_loads_with_from_pretrained_and_gives_the_same_logits(kind: str, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast

    student, _ = build(SMALL[kind])
    archive = export_text_hf(student, tokenizer(), tmp_path / "out")
    assert archive == tmp_path / "out" / HF_ARCHIVE
    again = export_text_hf(student, tokenizer(), tmp_path / "again")
    assert again.read_bytes() == archive.read_bytes()
    with tarfile.open(archive) as tar:
        names = {m.name for m in tar.getmembers()}
        tar.extractall(tmp_path / "unpacked", filter="data")
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "unpacked", local_files_only=True)
    loaded_tok = PreTrainedTokenizerFast.from_pretrained(tmp_path / "unpacked", local_files_only=True)
    texts = ["a good film and a good cast", "bad"]
    encoded = loaded_tok(texts, padding=True, return_tensors="pt")
    assert encoded["input_ids"].tolist() == batch(texts).tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(**encoded).logits, student.eval()(encoded["input_ids"]))


def test_hf_export_of_a_student_without_a_hugging_face_model_is_an_export_error(tmp_path: Path) -> None:
    student, _ = build(SMALL["bow"])
    with pytest.raises(ExportError, match="text_transformer or teacher_layers"):
        export_text_hf(student, tokenizer(), tmp_path)


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_onnx_export_reads_the_mask_it_is_given(kind: str, tmp_path: Path) -> None:
    import onnxruntime as ort
    from tokenizers import Tokenizer

    student, _ = build(SMALL[kind])
    path = export_text_onnx(student, tokenizer(), tmp_path, batch(["a good film", "bad"]))
    assert path == tmp_path / "student.onnx" and not student.training
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [(i.name, i.type) for i in session.get_inputs()] == [
        ("input_ids", "tensor(int64)"), ("attention_mask", "tensor(int64)"),
    ]  # fmt: skip
    assert [o.name for o in session.get_outputs()] == ["logits"]

    # What a runtime with only tokenizer.json and onnxruntime does: a batch of another size and length
    runtime_tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    texts = ["good acting and a good plot", "the cast was bad", "fun"]
    encodings = runtime_tok.encode_batch(texts)
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    assert ids.tolist() == batch(texts).tolist()
    got = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, student(torch.from_numpy(ids)).numpy(), atol=1e-4, rtol=0)
        # A mask that hides a real token is obeyed, not recomputed from the pad id (a fresh BERT's logits
        # are small: the change is measured against the export's own error)
        mask[0, 2] = 0
        hidden = student.classify(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    error = np.abs(session.run(None, {"input_ids": ids, "attention_mask": mask})[0] - hidden).max()
    assert error < 1e-4 and np.abs(hidden[0] - got[0]).max() > 100 * error


def test_onnx_export_refuses_a_module_that_is_not_a_text_student(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="not a text student"):
        export_text_onnx(nn.Linear(4, 2), tokenizer(), tmp_path, batch(["good"]))
