"""What kind of model file this is, told from its bytes (never its name): shared by teachers and students.

Apart from teachers.py because the student init (students.py) needs the same detection, and teachers.py
sits above students.py: the weights-only formats are loaded into the students' architectures.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from worker.distill.errors import TeacherError

FORMATS = ("torchscript", "onnx", "safetensors", "state_dict")
ACCEPTED = (
    "TorchScript (torch.jit.save), ONNX, safetensors + teacher_arch, "
    "or a state dict saved with torch.save + teacher_arch"
)


def detect_format(path: Path) -> str:
    """One of FORMATS, from the file's bytes; TeacherError (code `unknown_teacher_format`) otherwise."""
    path = Path(path)
    if not path.is_file():
        raise TeacherError(f"teacher file {path.name} does not exist", code="teacher_not_found")
    with open(path, "rb") as f:
        head = f.read(8)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        if any(n.endswith("/constants.pkl") or "/code/" in n for n in names):
            return "torchscript"
        if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names):
            return "state_dict"
    elif _is_safetensors(path, head):
        return "safetensors"
    elif head[:1] == b"\x80":  # pickle protocol >= 2: the legacy torch.save format
        return "state_dict"
    elif _is_onnx(path, head):
        return "onnx"
    raise TeacherError(
        f"cannot tell what kind of model {path.name} is; accepted: {ACCEPTED}", code="unknown_teacher_format"
    )


def _is_safetensors(path: Path, head: bytes) -> bool:
    if len(head) < 8:
        return False
    size = int.from_bytes(head, "little")
    if not 2 <= size <= min(path.stat().st_size - 8, 100 << 20):
        return False
    with open(path, "rb") as f:
        f.seek(8)
        header = f.read(size)
    try:
        return header[:1] == b"{" and isinstance(json.loads(header), dict)
    except (UnicodeDecodeError, ValueError):
        return False


def _is_onnx(path: Path, head: bytes) -> bool:
    if head[:1] != b"\x08":  # ModelProto field 1 (ir_version, varint) comes first in every writer we know
        return False
    import onnx

    model = onnx.ModelProto()
    try:
        model.ParseFromString(path.read_bytes())
    except Exception:  # noqa: BLE001 - protobuf raises its own DecodeError types
        return False
    return model.ir_version > 0 and len(model.graph.output) > 0 and len(model.opset_import) > 0
