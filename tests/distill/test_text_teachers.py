"""Text-classification teachers: a Hugging Face sequence classifier or an ONNX export with its tokenizer.json,
zipped or tarred, loads offline and gives the model's own logits; every unsafe or invalid upload is refused
with its code. Everything is built here (a WordPiece tokenizer, a 2-layer BERT), nothing is downloaded."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import warnings
import zipfile
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from worker.distill.errors import ConfigError, TeacherError
from worker.distill.teachers import sha256_file
from worker.distill.text_teachers import (
    encode_texts,
    is_text_teacher,
    load_text_teacher,
    load_text_teachers,
)

torch.set_num_threads(1)
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
CORPUS = [
    "the movie was great and the actors were wonderful",
    "a terrible film, i want my money back",
    "it was fine i guess, nothing special",
    "what a wonderful little story",
] * 5
LABELS = {0: "neg", 1: "neu", 2: "pos"}
TEXTS = ["the movie was great", "a terrible film, nothing special at all", "fine"]


# Tiny models -----------------------------------------------------------------------------------------------


@lru_cache(maxsize=2)
def wordpiece_json(special: tuple[str, ...] = SPECIAL) -> str:
    """A lower-casing WordPiece trained on CORPUS that adds [CLS] ... [SEP]. Trained once: training breaks
    ties between equally frequent merges differently from run to run."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=80, special_tokens=list(special)))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return str(tok.to_str())


def fast_tokenizer(special: tuple[str, ...] = SPECIAL) -> Any:
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    pad = {"pad_token": "[PAD]"} if "[PAD]" in special else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(wordpiece_json(special)),
        cls_token="[CLS]",
        sep_token="[SEP]",
        unk_token="[UNK]",
        mask_token="[MASK]",
        **pad,
    )


def tiny_bert(vocab_size: int, seed: int = 0, **config: Any) -> Any:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    settings: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
        id2label=LABELS,
    )
    return BertForSequenceClassification(BertConfig(**(settings | config))).eval()


def save_classifier(folder: Path, seed: int = 0, **config: Any) -> Any:
    """A Hugging Face folder (model.safetensors, config.json, tokenizer files); returns the model."""
    tokenizer = fast_tokenizer()
    model = tiny_bert(len(tokenizer), seed, **config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def pack(folder: Path, archive: Path, *, under: str = "model/") -> Path:
    """`folder`'s files as a .zip or .tar.gz (by `archive`'s suffix), under a wrapping folder name."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if archive.suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for p in files:
                zf.write(p, under + p.relative_to(folder).as_posix())
    else:
        with tarfile.open(archive, "w:gz") as tf:
            for p in files:
                tf.add(p, under + p.relative_to(folder).as_posix())
    return archive


class _LogitsOnly(torch.nn.Module):
    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> Any:
        return self.model(
            input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
        ).logits


def export_onnx(model: Any, path: Path, *, token_types: bool = True) -> Path:
    """The classifier as ONNX with dynamic batch and sequence axes (the TorchScript exporter: ~1 s, where the
    dynamo one takes ~10 s on two cores)."""
    names = ["input_ids", "attention_mask", "token_type_ids"][: 3 if token_types else 2]
    ids = torch.tensor([[2, 10, 11, 3], [2, 12, 3, 0]])
    args = (ids, (ids != 0).long(), torch.zeros_like(ids))[: len(names)]
    axes = {n: {0: "batch", 1: "seq"} for n in names} | {"logits": {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(  # eval(): the exporter restores the wrapper's mode, and with it the model's
            _LogitsOnly(model).eval(),
            args,
            str(path),
            input_names=names,
            output_names=["logits"],
            dynamic_axes=axes,
            opset_version=17,
            dynamo=False,
        )
    return path


def reference_logits(model: Any, ids: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(ids)
    with torch.no_grad():
        return model(input_ids=tensor, attention_mask=(tensor != 0).long()).logits


# Fixtures --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    root = tmp_path_factory.mktemp("hf") / "model"
    return root, save_classifier(root)


@pytest.fixture(scope="module")
def hf_archive(classifier: tuple[Path, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pack(classifier[0], tmp_path_factory.mktemp("up") / "teacher.tar.gz")


@pytest.fixture(scope="module")
def teacher(hf_archive: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_text_teacher(hf_archive, tmp_path_factory.mktemp("work"))


@pytest.fixture(scope="module")
def onnx_folder(classifier: tuple[Path, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model.onnx and tokenizer.json only: the pad token comes from tokenizer.json's own [PAD]."""
    folder = tmp_path_factory.mktemp("onnx")
    export_onnx(classifier[1], folder / "model.onnx")
    shutil.copyfile(classifier[0] / "tokenizer.json", folder / "tokenizer.json")
    return folder


def _refused(archive: Path, tmp_path: Path, code: str) -> TeacherError:
    with pytest.raises(TeacherError) as err:
        load_text_teacher(archive, tmp_path / "work")
    assert err.value.code == code, err.value.message
    assert err.value.field == "teacher"
    return err.value


# Hugging Face folders --------------------------------------------------------------------------------------


def test_a_classifier_folder_loads_offline_and_gives_the_models_logits(teacher, classifier, hf_archive):
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    model = classifier[1]
    assert teacher.format == "hf_text" and teacher.sha256 == sha256_file(hf_archive)
    assert teacher.num_classes == 3 and teacher.id2label == ["neg", "neu", "pos"]
    assert teacher.pad_id == 0 and teacher.max_positions == 64
    assert teacher.tokenizer.is_fast and teacher.hf_config.model_type == "bert"
    assert not teacher.model.training and next(teacher.model.parameters()).dtype == torch.float32
    uploaded = (classifier[0] / "tokenizer.json").read_bytes()
    assert (teacher.tokenizer_dir / "tokenizer.json").read_bytes() == uploaded
    ids, truncated = encode_texts(teacher.tokenizer, TEXTS, 64, teacher.pad_id)
    assert truncated == 0 and (ids == 0).any()  # the short rows are padded
    got = teacher.logits(torch.from_numpy(ids))
    assert got.shape == (3, 3) and got.dtype == torch.float32
    torch.testing.assert_close(got, reference_logits(model, ids), atol=1e-5, rtol=0)


def test_padding_does_not_change_a_rows_logits(teacher):
    alone, _ = encode_texts(teacher.tokenizer, TEXTS[:1], 64, teacher.pad_id)
    batch, _ = encode_texts(teacher.tokenizer, TEXTS, 64, teacher.pad_id)
    assert batch.shape[1] > alone.shape[1]
    torch.testing.assert_close(
        teacher.logits(torch.from_numpy(batch))[0],
        teacher.logits(torch.from_numpy(alone))[0],
        atol=1e-5,
        rtol=0,
    )


def test_default_label_names_are_not_reported(classifier, tmp_path):
    root = tmp_path / "model"
    shutil.copytree(classifier[0], root)
    _edit_json("config.json", id2label={str(i): f"LABEL_{i}" for i in range(3)})(root)
    teacher = load_text_teacher(pack(root, tmp_path / "t.zip"), tmp_path / "work")
    assert teacher.id2label is None and teacher.num_classes == 3


def _edit_json(name: str, **changes: Any) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        data = json.loads((root / name).read_text())
        (root / name).write_text(json.dumps(data | changes))

    return edit


def _no_pad_tokenizer(root: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (root / name).unlink(missing_ok=True)
    fast_tokenizer(special=SPECIAL[1:]).save_pretrained(root)


REFUSALS = {
    "pickle weights beside safetensors": (
        "unsafe_weights",
        lambda r: (r / "pytorch_model.bin").write_bytes(b"x"),
    ),
    "auto_map in config.json": ("custom_code", _edit_json("config.json", auto_map={"AutoModel": "m.Model"})),
    "auto_map in tokenizer_config.json": ("custom_code", _edit_json("tokenizer_config.json", auto_map={})),
    "a python file": ("custom_code", lambda r: (r / "modeling_evil.py").write_text("import os")),
    "a PEFT adapter": ("external_reference", lambda r: (r / "adapter_config.json").write_text("{}")),
    "no tokenizer.json": ("no_tokenizer", lambda r: (r / "tokenizer.json").unlink()),
    "a tokenizer without a pad token": ("no_pad_token", _no_pad_tokenizer),
    "no weights": ("invalid_teacher", lambda r: (r / "model.safetensors").unlink()),
    "a model_type without a sequence classifier": (
        "unsupported_architecture",
        _edit_json("config.json", model_type="evil_net"),
    ),
    "a multi-label classifier": (
        "unsupported_problem_type",
        _edit_json("config.json", problem_type="multi_label_classification"),
    ),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_a_bad_classifier_folder_is_refused_with_its_code(case, classifier, tmp_path):
    code, damage = REFUSALS[case]
    root = tmp_path / "model"
    shutil.copytree(classifier[0], root)
    damage(root)
    _refused(pack(root, tmp_path / "teacher.tar.gz"), tmp_path, code)


def test_file_names_in_tokenizer_config_are_dropped(classifier, tmp_path):
    root = tmp_path / "model"
    shutil.copytree(classifier[0], root)
    (tmp_path / "tokenizer.json").write_text("{}")  # what a crafted path would point at
    _edit_json("tokenizer_config.json", tokenizer_file=str(tmp_path / "tokenizer.json"))(root)
    teacher = load_text_teacher(pack(root, tmp_path / "t.zip"), tmp_path / "work")
    kept = json.loads((teacher.tokenizer_dir / "tokenizer_config.json").read_text())
    assert "tokenizer_file" not in kept and kept["pad_token"] == "[PAD]"
    assert teacher.tokenizer("the movie")["input_ids"] == fast_tokenizer()("the movie")["input_ids"]


def test_uploads_that_are_no_text_teacher_are_refused(tmp_path):
    _refused(tmp_path / "missing.zip", tmp_path, "teacher_not_found")
    junk = tmp_path / "teacher.tar.gz"
    junk.write_bytes(b"not an archive at all")
    _refused(junk, tmp_path, "invalid_teacher")
    escaping = tmp_path / "escape.tar.gz"
    with tarfile.open(escaping, "w:gz") as tf:
        tf.add(junk, "../config.json")
    _refused(escaping, tmp_path, "unsafe_member")


# Sniffing --------------------------------------------------------------------------------------------------


def test_is_text_teacher_tells_classifiers_from_other_uploads(classifier, hf_archive, onnx_folder, tmp_path):
    assert is_text_teacher(hf_archive)
    assert is_text_teacher(pack(classifier[0], tmp_path / "t.zip", under=""))
    assert is_text_teacher(pack(onnx_folder, tmp_path / "onnx.zip"))

    causal = tmp_path / "causal"
    shutil.copytree(classifier[0], causal)
    _edit_json("config.json", architectures=["LlamaForCausalLM"], model_type="llama")(causal)
    lonely_onnx = tmp_path / "lonely"
    lonely_onnx.mkdir()
    shutil.copyfile(onnx_folder / "model.onnx", lonely_onnx / "model.onnx")
    junk = tmp_path / "teacher.zip"
    junk.write_bytes(b"PK not really")
    for path in (
        onnx_folder / "model.onnx",  # a bare ONNX: teachers.py's
        pack(causal, tmp_path / "causal.tar.gz"),
        pack(lonely_onnx, tmp_path / "lonely.zip"),  # no tokenizer.json
        junk,
        tmp_path / "missing.zip",
    ):
        assert not is_text_teacher(path), path.name


# ONNX ------------------------------------------------------------------------------------------------------


def test_an_onnx_export_with_its_tokenizer_gives_the_models_logits(onnx_folder, classifier, tmp_path):
    teacher = load_text_teacher(pack(onnx_folder, tmp_path / "t.zip"), tmp_path / "work")
    assert teacher.format == "onnx_text" and teacher.model is None and teacher.hf_config is None
    assert teacher.num_classes == 3 and teacher.pad_id == 0  # [PAD], declared in tokenizer.json only
    assert teacher.id2label is None and teacher.max_positions is None
    assert json.loads((teacher.tokenizer_dir / "tokenizer_config.json").read_text())["pad_token"] == "[PAD]"
    ids, _ = encode_texts(teacher.tokenizer, TEXTS, 32, teacher.pad_id)
    got = teacher.to("cpu").logits(torch.from_numpy(ids))
    torch.testing.assert_close(got, reference_logits(classifier[1], ids), atol=1e-4, rtol=0)


def test_an_onnx_export_without_token_types_reads_labels_from_its_config(classifier, tmp_path):
    folder = tmp_path / "export"
    folder.mkdir()
    export_onnx(classifier[1], folder / "model.onnx", token_types=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copyfile(classifier[0] / name, folder / name)
    teacher = load_text_teacher(pack(folder, tmp_path / "t.tar.gz"), tmp_path / "work")
    assert teacher.format == "onnx_text" and teacher.session.dtypes.keys() == {"input_ids", "attention_mask"}
    assert teacher.id2label == ["neg", "neu", "pos"] and teacher.max_positions == 64
    ids, _ = encode_texts(teacher.tokenizer, TEXTS, 32, teacher.pad_id)
    torch.testing.assert_close(
        teacher.logits(torch.from_numpy(ids)), reference_logits(classifier[1], ids), atol=1e-4, rtol=0
    )


def _rewrite_onnx(folder: Path, change: Callable[[Any], None]) -> None:
    import onnx

    model = onnx.load(str(folder / "model.onnx"))
    change(model)
    onnx.save(model, str(folder / "model.onnx"))


def _custom_domain(model: Any) -> None:
    model.graph.node[0].domain = "evil.ops"


def _renamed_input(model: Any) -> None:
    for node in model.graph.node:
        node.input[:] = ["segment_ids" if i == "token_type_ids" else i for i in node.input]
    next(i for i in model.graph.input if i.name == "token_type_ids").name = "segment_ids"


def _tokenizer_elsewhere(folder: Path) -> None:
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer.json").rename(folder / "tokenizer" / "tokenizer.json")


def _three_labels_for_two(folder: Path) -> None:
    (folder / "config.json").write_text(json.dumps({"id2label": {"0": "a", "1": "b"}}))


@pytest.mark.parametrize(
    ("damage", "code"),
    [
        (lambda f: _rewrite_onnx(f, _custom_domain), "unsafe_operator"),
        (lambda f: _rewrite_onnx(f, _renamed_input), "unsupported_inputs"),
        (lambda f: (f / "tokenizer.json").rename(f / "vocab.json"), "invalid_teacher"),  # no tokenizer.json
        (_tokenizer_elsewhere, "no_tokenizer"),
        (_three_labels_for_two, "label_count_mismatch"),
    ],
    ids=[
        "custom domain",
        "unknown input",
        "no tokenizer",
        "tokenizer not beside",
        "labels for another class count",
    ],
)
def test_a_bad_onnx_upload_is_refused_with_its_code(damage, code, onnx_folder, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(onnx_folder, folder)
    damage(folder)
    _refused(pack(folder, tmp_path / "t.zip"), tmp_path, code)


# Ensembles -------------------------------------------------------------------------------------------------


def test_an_ensemble_sharing_a_tokenizer_averages_probabilities(
    classifier, hf_archive, onnx_folder, tmp_path
):
    second_root = tmp_path / "second"
    second = save_classifier(second_root, seed=1)
    paths = [hf_archive, pack(second_root, tmp_path / "b.zip"), pack(onnx_folder, tmp_path / "c.zip")]
    ensemble = load_text_teachers(paths, tmp_path / "work")
    assert ensemble.format == "ensemble" and ensemble.num_classes == 3 and ensemble.pad_id == 0
    assert ensemble.id2label == ["neg", "neu", "pos"] and ensemble.max_positions == 64
    assert ensemble.hf_config.model_type == "bert" and ensemble.model is not None
    ids, _ = encode_texts(ensemble.tokenizer, TEXTS, 32, ensemble.pad_id)
    members = [classifier[1], second, classifier[1]]  # the ONNX member is the first model exported
    probs = torch.stack([reference_logits(m, ids).softmax(-1) for m in members]).mean(0)
    got = ensemble.logits(torch.from_numpy(ids))
    torch.testing.assert_close(got.softmax(-1), probs, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.logsumexp(-1), torch.zeros(3), atol=1e-5, rtol=0)  # log-probabilities
    assert len(load_text_teachers(paths[:1], tmp_path / "work").sha256) == 64


def test_an_ensemble_with_different_tokenizers_is_refused(classifier, hf_archive, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(classifier[0], other)
    data = json.loads((other / "tokenizer.json").read_text())
    (other / "tokenizer.json").write_text(json.dumps(data))  # the same tokens, other bytes
    with pytest.raises(TeacherError) as err:
        load_text_teachers([hf_archive, pack(other, tmp_path / "o.zip")], tmp_path / "work")
    assert err.value.code == "ensemble_tokenizers_differ"


# encode_texts ----------------------------------------------------------------------------------------------


def test_encode_texts_pads_right_and_counts_truncated_texts():
    tokenizer = fast_tokenizer()
    cls, sep = tokenizer.convert_tokens_to_ids(["[CLS]", "[SEP]"])
    texts = ["the movie was great and the actors were wonderful", "fine", ""]
    ids, truncated = encode_texts(tokenizer, texts, 6, pad_id=0)
    assert ids.dtype == np.int64 and ids.shape == (3, 6) and truncated == 1
    assert ids[0, 0] == cls and ids[0, -1] == sep and (ids[0] != 0).all()
    short = tokenizer("fine")["input_ids"]
    assert list(ids[1]) == short + [0] * (6 - len(short))
    assert list(ids[2]) == [cls, sep, 0, 0, 0, 0]
    narrow, none_cut = encode_texts(tokenizer, ["fine", ""], 6, pad_id=0)
    assert narrow.shape == (2, len(short)) and none_cut == 0  # as long as the longest row, not max_length
    empty, _ = encode_texts(tokenizer, [], 6, pad_id=0)
    assert empty.shape == (0, 1)
    with pytest.raises(ConfigError):
        encode_texts(tokenizer, texts, 2, pad_id=0)  # no room beside [CLS] and [SEP]
