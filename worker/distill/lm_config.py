"""The fully resolved settings of one causal-LM distillation run (`task` "causal_lm").

One plain dataclass, like `config.DistillConfig`: built from a JSON-able dict at the edge
(`LMConfig.from_dict`), written back into the model card (`to_dict`). The service's API schema mirrors these
field names. Settings whose defaults depend on others are resolved on construction, so the config stored is
the config run: `method` "auto" is fkl (and "auto" temperature / alpha are 1: no search is run for language
models yet), `topk` None is the format's default (64 for top-k, 12 draws for sampled), gkd's `beta` is 0.5,
and a `generate` object gets every setting it leaves out (GENERATE_DEFAULTS; its `seed` is the job's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from worker.distill.config import parse_model_spec
from worker.distill.errors import ConfigError

TASK = "causal_lm"
LM_METHOD_NAMES = ("fkl", "rkl", "gkd", "ce")  # lm_losses.LM_METHODS, and "ce": cross-entropy alone
LM_SOFT_LABEL_FORMATS = ("topk", "sampled")
LM_EXPORT_FORMATS = ("hf",)
DEFAULT_K = {"topk": 64, "sampled": 12}
DEFAULT_BETA = 0.5
AUTO_MEANS = {"method": "fkl", "temperature": 1.0, "alpha": 1.0}
MAX_PROMPTS, MAX_PROMPT_CHARS, MAX_NEW_TOKENS = 16, 2000, 1024
MAX_K, MAX_LENGTH = 4096, 1 << 16
_FLOATS = ("temperature", "alpha", "lr", "baseline_lr", "weight_decay", "grad_clip", "val_fraction")
# Prompt-only datasets: the teacher writes each completion (lm_generate.py). Greedy unless do_sample; a
# sampled run draws with `seed` (the job's seed when left out), so a rerun writes the same text.
GENERATE_DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 128,
    "do_sample": False,
    "temperature": 1.0,
    "top_p": 1.0,
}
MAX_GENERATE_TEMPERATURE = 100.0


@dataclass
class LMConfig:
    task: str = TASK
    # Student: an lm_students spec ("causal_lm:layers=4;hidden=256;heads=4", "teacher_layers:keep=0,8")
    student: str = "causal_lm"
    # Method: fkl / rkl / gkd (method_params.beta), mixed with CE by alpha at temperature; "ce": CE alone.
    method: str = "fkl"
    temperature: float = 1.0
    alpha: float = 1.0
    method_params: dict[str, float] = field(default_factory=dict)
    # Soft-label stage: the teacher's top-k log-probs, or k sampled ids with their counts / k.
    soft_label_format: str = "topk"
    topk: int | None = None  # None: DEFAULT_K of the format (resolved on construction)
    shard_rows: int = 256
    # Data: token windows of max_length, short documents packed, a seeded held-out share of documents.
    max_length: int = 128
    text_column: str = "text"
    pack: bool = True
    val_fraction: float = 0.1
    # Training
    epochs: int = 4
    batch_size: int = 8
    lr: float = 1e-3
    # The CE-only baseline's own learning rate (None: `lr`). KD on soft targets and CE on one-hot labels
    # often want different rates; a fair baseline is trained at the rate that is best for it, not for KD.
    baseline_lr: float | None = None
    weight_decay: float = 0.01
    grad_clip: float | None = 1.0
    seed: int = 0
    checkpoint_every_steps: int | None = None
    # Report and outputs
    baseline: bool = True  # also train the same student on CE alone, same tokens and steps
    export_formats: list[str] = field(default_factory=lambda: list(LM_EXPORT_FORMATS))
    generation_prompts: list[str] | None = None  # None: the beginnings of the first held-out windows
    max_new_tokens: int = 32  # of the report's side-by-side generations (`generate` has its own)
    # A dataset of prompts alone: the teacher writes the completions first (None: the dataset has them)
    generate: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        # "auto" is accepted where a search would go one day; it is resolved here and stored resolved.
        for name, value in AUTO_MEANS.items():
            if getattr(self, name) == "auto":
                setattr(self, name, value)
        for name in _FLOATS:  # stored as given by JSON (2 or 2.0): one spelling, so one fingerprint
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(self, name, float(value))
        if self.topk is None and self.soft_label_format in DEFAULT_K:
            self.topk = DEFAULT_K[self.soft_label_format]
        if self.method == "gkd" and isinstance(self.method_params, dict):
            self.method_params = {"beta": DEFAULT_BETA, **self.method_params}
        if isinstance(self.generate, dict):
            self.generate = {**GENERATE_DEFAULTS, "seed": self.seed, **self.generate}
            for name in ("temperature", "top_p"):
                value = self.generate[name]
                if isinstance(value, int) and not isinstance(value, bool):
                    self.generate[name] = float(value)
        self.validate()

    @property
    def k(self) -> int:
        """The resolved `topk` (ids per token in the soft labels)."""
        assert self.topk is not None  # resolved in __post_init__
        return self.topk

    @property
    def beta(self) -> float:
        """GKD's beta (the default where the method takes none: train_lm ignores it then)."""
        return float(self.method_params.get("beta", DEFAULT_BETA))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LMConfig:
        if not isinstance(data, dict):
            raise ConfigError("the config must be a JSON object", field="config")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(
                f"unknown setting(s) for causal_lm: {', '.join(unknown)}; known: {', '.join(names)}",
                field=unknown[0],
            )
        values = dict(data)
        for name in ("method_params", "export_formats", "generation_prompts", "generate"):  # not the caller's
            if isinstance(values.get(name), (dict, list)):
                values[name] = type(values[name])(values[name])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        def need(ok: bool, name: str, why: str) -> None:
            if not ok:
                raise ConfigError(f"{name}: {why}", field=name)

        need(self.task == TASK, "task", f"must be {TASK!r} for this config")
        need(isinstance(self.student, str) and bool(self.student.strip()), "student", "a model spec")
        parse_model_spec(self.student)
        need(self.method in LM_METHOD_NAMES, "method", f"one of {LM_METHOD_NAMES} (or 'auto': fkl)")
        need(_number(self.temperature) and self.temperature > 0, "temperature", "a number > 0")
        need(_number(self.alpha) and 0.0 <= self.alpha <= 1.0, "alpha", "a number in [0, 1]")
        need(isinstance(self.method_params, dict), "method_params", "an object")
        allowed = {"beta"} if self.method == "gkd" else set()
        extra = sorted(set(self.method_params) - allowed)
        need(
            not extra,
            "method_params",
            f"{self.method} takes {sorted(allowed) or 'none'}; got {', '.join(map(str, extra))}",
        )
        if "beta" in self.method_params:
            beta = self.method_params["beta"]
            need(_number(beta) and 0.0 <= beta <= 1.0, "method_params", "beta must be a number in [0, 1]")
        formats = LM_SOFT_LABEL_FORMATS
        need(self.soft_label_format in formats, "soft_label_format", f"one of {formats}")
        need(_integer(self.topk) and 1 <= self.k <= MAX_K, "topk", f"an integer in [1, {MAX_K}] or null")
        need(
            not (self.soft_label_format == "sampled" and self.method in ("rkl", "gkd")),
            "method",
            f"{self.method} needs the teacher's log-probs, which sampled soft labels do not estimate; "
            "use fkl or soft_label_format 'topk'",
        )
        need(_integer(self.shard_rows) and self.shard_rows >= 1, "shard_rows", "an integer >= 1")
        need(
            _integer(self.max_length) and 2 <= self.max_length <= MAX_LENGTH,
            "max_length",
            f"an integer in [2, {MAX_LENGTH}]",
        )
        need(isinstance(self.text_column, str) and bool(self.text_column), "text_column", "a column name")
        need(isinstance(self.pack, bool), "pack", "true or false")
        need(_number(self.val_fraction) and 0.0 <= self.val_fraction < 1.0, "val_fraction", "in [0, 1)")
        need(_integer(self.epochs) and self.epochs >= 1, "epochs", "an integer >= 1")
        need(_integer(self.batch_size) and self.batch_size >= 1, "batch_size", "an integer >= 1")
        need(_number(self.lr) and self.lr > 0, "lr", "a number > 0")
        need(
            self.baseline_lr is None or (_number(self.baseline_lr) and self.baseline_lr > 0),
            "baseline_lr",
            "a number > 0, or null for lr",
        )
        need(_number(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a number >= 0")
        need(
            self.grad_clip is None or (_number(self.grad_clip) and self.grad_clip > 0),
            "grad_clip",
            "null or > 0",
        )
        need(_integer(self.seed), "seed", "an integer")
        every = self.checkpoint_every_steps
        need(every is None or (_integer(every) and every >= 1), "checkpoint_every_steps", "null or >= 1")
        need(isinstance(self.baseline, bool), "baseline", "true or false")
        need(isinstance(self.export_formats, list), "export_formats", f"a list of {list(LM_EXPORT_FORMATS)}")
        bad = [f for f in self.export_formats if f not in LM_EXPORT_FORMATS]
        need(not bad, "export_formats", f"unknown {bad}; known {list(LM_EXPORT_FORMATS)}")
        prompts = self.generation_prompts
        need(
            prompts is None
            or (
                isinstance(prompts, list)
                and len(prompts) <= MAX_PROMPTS
                and all(isinstance(p, str) and p.strip() and len(p) <= MAX_PROMPT_CHARS for p in prompts)
            ),
            "generation_prompts",
            f"null or up to {MAX_PROMPTS} non-empty strings of at most {MAX_PROMPT_CHARS} characters",
        )
        need(
            _integer(self.max_new_tokens) and 1 <= self.max_new_tokens <= MAX_NEW_TOKENS,
            "max_new_tokens",
            f"an integer in [1, {MAX_NEW_TOKENS}]",
        )
        self._validate_generate(need)

    def _validate_generate(self, need: Callable[[bool, str, str], None]) -> None:
        settings = self.generate
        need(settings is None or isinstance(settings, dict), "generate", "null or an object")
        if settings is None:
            return
        known = (*GENERATE_DEFAULTS, "seed")
        unknown = sorted(map(str, set(settings) - set(known)))
        need(not unknown, "generate", f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
        count, sample = settings["max_new_tokens"], settings["do_sample"]
        temperature, top_p = settings["temperature"], settings["top_p"]
        need(
            _integer(count) and 1 <= count <= MAX_NEW_TOKENS,
            "generate.max_new_tokens",
            f"an integer in [1, {MAX_NEW_TOKENS}]",
        )
        need(isinstance(sample, bool), "generate.do_sample", "true (sample) or false (greedy)")
        need(
            _number(temperature) and 0 < temperature <= MAX_GENERATE_TEMPERATURE,
            "generate.temperature",
            f"a number in (0, {MAX_GENERATE_TEMPERATURE:g}]",
        )
        need(_number(top_p) and 0 < top_p <= 1, "generate.top_p", "a number in (0, 1]")
        need(_integer(settings["seed"]) and settings["seed"] >= 0, "generate.seed", "an integer >= 0")
        need(
            sample or (temperature == 1.0 and top_p == 1.0),
            "generate.do_sample",
            "temperature and top_p shape sampling only: set do_sample true, or leave them at 1",
        )


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def _integer(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)
