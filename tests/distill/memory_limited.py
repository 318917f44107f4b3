"""Run a job's stages in this process under an address-space limit (`RLIMIT_AS`): the test of datasets
larger than the memory given. `python -m tests.distill.memory_limited WORK STREAMING HEADROOM_MB` loads
what the stages import, then allows HEADROOM_MB more address space than it has, then runs soft_label,
distill and evaluate; it prints `done` and the report's student accuracy, or `MemoryError`."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import PIL.Image  # noqa: F401 - loaded before the limit, as a worker has it loaded
import torch

from worker.distill.config import DistillConfig
from worker.distill.pipeline import distill, evaluate, soft_label


def address_space() -> int:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmSize:")[1].split()[0]) * 1024


def main(work: Path, streaming: str, headroom_mb: int) -> None:
    torch.set_num_threads(1)
    torch.zeros(1).sum()  # the thread pools exist before the limit
    limit = address_space() + headroom_mb * (1 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    cfg = DistillConfig.from_dict(
        {
            "student": "cnn:channels=4", "epochs": 1, "batch_size": 64, "method": "hinton",
            "temperature": 2.0, "alpha": 0.5, "preprocess": {"scale": 1 / 255}, "streaming": streaming,
            "soft_label_format": "topk", "topk": 2, "shard_size": 512, "baseline": False,
            "export_formats": ["safetensors"],
        }
    )  # fmt: skip
    try:
        soft_label(work, cfg)
        distill(work, cfg)
        report = evaluate(work, cfg)
    except MemoryError:
        print("MemoryError")
        return
    print("done", json.dumps(report["student"]["accuracy"]))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
