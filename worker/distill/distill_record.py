"""What the distill stage leaves in checkpoints/: state.json's record, the student and the baseline.

Written by distill_stage.py, read by the evaluate and export stages (outputs.py): both sides name the files
through this module, and the record is a dataclass so neither reads the other's dict keys by convention.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.distill.errors import DistillError
from worker.distill.workfolder import Work, read_json, write_json

STATE, STUDENT, BASELINE = "state.json", "student.pt", "baseline.pt"


@dataclass(frozen=True)
class DistillRecord:
    """checkpoints/state.json: the parts of the distill stage done for the inputs and settings `fingerprint`.

    A key appears in the file only once it has a value, so a record stopped half-way reads as such.
    """

    fingerprint: str
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)  # "distill", "finetune", "baseline"
    hyperparameters: dict[str, Any] | None = None  # method, temperature, alpha, and why (once chosen)
    done: bool = False

    @classmethod
    def read(cls, path: Path) -> DistillRecord | None:
        data = read_json(path)
        if data is None:
            return None
        return cls(
            fingerprint=data.get("fingerprint", ""),
            phases=data.get("phases", {}),
            hyperparameters=data.get("hyperparameters"),
            done=bool(data.get("done")),
        )

    def write(self, path: Path) -> None:
        data: dict[str, Any] = {"fingerprint": self.fingerprint, "phases": self.phases}
        if self.hyperparameters is not None:
            data["hyperparameters"] = self.hyperparameters
        if self.done:
            data["done"] = True
        write_json(path, data)

    def result(self) -> dict[str, Any]:
        return {"hyperparameters": self.hyperparameters, "phases": self.phases}


def finished_record(w: Work) -> DistillRecord:
    """The record of a distill stage that ran to the end; DistillError `stage_not_done` otherwise."""
    record = DistillRecord.read(w.checkpoints / STATE)
    if record is None or not record.done:
        raise DistillError(
            "the student is not trained yet: run the distill stage first", code="stage_not_done"
        )
    return record
