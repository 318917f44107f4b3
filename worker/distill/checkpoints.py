"""Per-epoch training checkpoints: plain dicts, written atomically, checked by sha256, loaded without pickle.

    ckpt_dir/epoch-0003.pt          torch.save of a dict of tensors, dicts, lists, numbers and strings
    ckpt_dir/epoch-0003.pt.sha256   "<hex>  epoch-0003.pt" (the `sha256sum` format)
    ckpt_dir/latest.json            {"epoch": 3, "file": "epoch-0003.pt", "sha256": "<hex>"}

Each file is written to a temporary name, fsynced and renamed, so a crash leaves either the old file or the
new one, never half of one. Loading takes the newest checkpoint whose bytes match its sidecar and skips any
other (a torn copy from object storage, a disk error): a corrupt newest checkpoint falls back to the previous.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST = "latest.json"
_NAME = re.compile(r"^epoch-(\d+)\.pt$")


def save_checkpoint(ckpt_dir: Path, epoch: int, state: dict[str, Any], *, keep: int = 2) -> Path:
    """Write `state` as the checkpoint of `epoch`, point latest.json at it, keep the newest `keep` files."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    name = f"epoch-{epoch:04d}.pt"
    _write_atomic(ckpt_dir / name, data)
    _write_atomic(ckpt_dir / f"{name}.sha256", f"{digest}  {name}\n".encode())
    pointer = {"epoch": epoch, "file": name, "sha256": digest}
    _write_atomic(ckpt_dir / LATEST, json.dumps(pointer).encode())
    for _, old in _checkpoints(ckpt_dir)[keep:]:
        old.unlink(missing_ok=True)
        old.with_name(old.name + ".sha256").unlink(missing_ok=True)
    return ckpt_dir / name


def load_latest_checkpoint(ckpt_dir: Path) -> dict[str, Any] | None:
    """The newest checkpoint whose sha256 matches its sidecar, loaded with weights_only=True; None if none."""
    if not ckpt_dir.is_dir():
        return None
    for _, path in _checkpoints(ckpt_dir):
        data = _verified_bytes(path)
        if data is None:
            continue
        try:
            checkpoint: dict[str, Any] = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            return checkpoint
        except Exception:  # noqa: BLE001 - a checkpoint we cannot read is skipped like a corrupt one
            continue
    return None


def capture_rng(order: torch.Generator) -> dict[str, Any]:
    """Every random state a training step can touch, as tensors and numbers (weights_only-loadable)."""
    state = np.random.get_state()
    if isinstance(state, dict):  # only after np.random.set_bit_generator: the global one is MT19937
        raise TypeError(f"numpy's global generator is {state.get('bit_generator')}; checkpoints need MT19937")
    _, keys, pos, has_gauss, cached = state
    version, py_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": {"version": version, "state": list(py_state), "gauss_next": gauss_next},
        "order": order.get_state(),
    }


def restore_rng(state: dict[str, Any], order: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    order.set_state(state["order"])


def _checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)


def _verified_bytes(path: Path) -> bytes | None:
    sidecar = path.with_name(path.name + ".sha256")
    try:
        expected = sidecar.read_text().split()[0]
        data = path.read_bytes()
    except (OSError, IndexError):
        return None
    return data if hashlib.sha256(data).hexdigest() == expected else None


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    # The rename itself lives in the directory: fsync it too, or a power cut can forget the new name.
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
