"""The Hugging Face export: the tar's folder loads with from_pretrained, gives the same logits, generates."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import torch
from lm_student_fixtures import teacher, tokenizer

from worker.distill.lm_export import ARCHIVE, MODEL_CARD, export_hf
from worker.distill.lm_students import build_lm_student


def test_export_round_trip(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = tokenizer(300)
    torch.manual_seed(0)
    student, resolved = build_lm_student("causal_lm:layers=1;hidden=32;heads=2", teacher(len(tok)))
    archive = export_hf(student, tok, tmp_path / "out", resolved=resolved, card={"teacher_sha256": "abc"})
    assert archive == tmp_path / "out" / ARCHIVE

    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == sorted(m.name for m in members)
        assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.isfile() for m in members)
        names = {m.name for m in members}
        tar.extractall(tmp_path / "unpacked", filter="data")
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= names  # fmt: skip
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "unpacked", local_files_only=True)
    loaded_tok = AutoTokenizer.from_pretrained(tmp_path / "unpacked", local_files_only=True)
    ids = torch.tensor([loaded_tok("It is a truth universally acknowledged")["input_ids"]])
    assert ids.tolist() == [tok("It is a truth universally acknowledged")["input_ids"]]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, student(input_ids=ids).logits)
        out = loaded.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids.shape[1]

    card = json.loads((tmp_path / "out" / MODEL_CARD).read_text())
    assert card["base_family"] == "llama" and card["teacher_sha256"] == "abc"
    assert card["parameters"] == sum(p.numel() for p in student.parameters())
    assert card["resolved_config"]["hidden"] == 32 and card["resolved_config"]["layers"] == 1

    # The same student gives the same archive, byte for byte.
    again = export_hf(student, tok, tmp_path / "again", resolved=resolved)
    assert again.read_bytes() == archive.read_bytes()
