"""Quality on real Fashion-MNIST: the product's distilled student vs the same student trained alone.

    python -m bench.quality            # 3 seeds, 10 epochs: the figures in bench/README.md
    python -m bench.quality --textbook # ... plus the raw textbook-KD column
    python -m bench.quality --quick    # 1 seed, 3 epochs, to try it

Per seed: the product's stratified holdout (10% of train) is the validation split of every arm, t10k the
test set. Three settings, two students (MLP-784-32-10, MLP-784-128-10):
  (a) full labels, default settings (temperature/alpha "auto");
  (b) labels for a seeded, stratified 3% of the training rows, and only those rows;
  (c) the same 3% labelled, the other 97% given as unlabelled rows (label -1).
"alone" is a hand-written raw-PyTorch loop on hard labels (bench/raw.py, the product's default recipe);
"KD T4/a.9" (--textbook) is the same raw loop with textbook Hinton KD from cached logits; "distilled" is
the product (`pipeline` soft_label -> distill -> evaluate -> export), scored by loading its exported
`student.pt` on raw t10k pixels.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from bench import product, raw
from bench.fmnist import CACHE_DIR, load_split, preprocess, stratified_subset
from bench.teacher import TEACHER_PATH, ensure_teacher
from worker.distill.students import build_student

STUDENTS = ("mlp:hidden=32", "mlp:hidden=128")
SETTINGS = {"a": "(a) full labels", "b": "(b) 3% labels only", "c": "(c) 3% + 97% unlabelled *"}


def run_seed(seed: int, args, teacher_logits: torch.Tensor, data, work_root: Path) -> dict:
    """All arms of one seed -> {"acc": {(setting, student, arm): t10k accuracy in points}, "extra": ...}."""
    x_raw, y_all, x_pre, x_test_raw, x_test_pre, y_test = data
    tr, va = product.product_split(len(y_all), y_all, 0.1, seed)
    sub = tr[stratified_subset(y_all[tr], args.label_fraction, seed)]
    settings = {
        "a": (tr, y_all[tr]),
        "b": (sub, y_all[sub]),
        "c": (tr, np.where(np.isin(tr, sub), y_all[tr], -1)),
    }
    x_val, y_val = torch.from_numpy(x_pre[va]), torch.from_numpy(y_all[va])
    test_raw = torch.from_numpy(x_test_raw.astype(np.float32))  # the exported student takes raw pixels
    test_pre, test_y = torch.from_numpy(x_test_pre), torch.from_numpy(y_test)
    acc, extra = {}, {}
    for name in args.settings:
        idx, y = settings[name]
        x_t, y_t = torch.from_numpy(x_pre[idx]), torch.from_numpy(y)
        previous: Path | None = None
        for spec in args.students:
            work = work_root / f"s{seed}-{name}-{spec.replace(':', '-').replace('=', '')}"
            product.make_work(
                work, TEACHER_PATH, x_raw[idx], y, x_raw[va], y_all[va], soft_labels_from=previous
            )
            cfg = product.config(spec, **{"epochs": args.epochs, "seed": seed, **args.config})
            result = product.run(work, cfg)
            acc[name, spec, "distilled"] = 100 * raw.accuracy(result["student"], test_raw, test_y)
            extra[name, spec] = {"chosen": chosen(result["distill"]), "seconds": result["seconds"]}
            stages = " ".join(f"{k} {v:.0f}s" for k, v in result["seconds"].items())
            print(f"  seed {seed} ({name}) {spec}: {acc[name, spec, 'distilled']:.2f}%, {stages}", flush=True)
            if previous is not None:
                shutil.rmtree(previous)
            previous = work

            if name in ("a", "b"):
                model, _ = raw.fit(fresh(spec, seed), x_t, y_t, x_val, y_val, epochs=args.epochs, seed=seed)
                acc[name, spec, "alone"] = 100 * raw.accuracy(model, test_pre, test_y)
            if args.textbook:
                model, _ = raw.fit(fresh(spec, seed), x_t, y_t, x_val, y_val, logits=teacher_logits[idx],
                                   T=4.0, alpha=0.9, epochs=args.epochs, seed=seed)  # fmt: skip
                acc[name, spec, "textbook"] = 100 * raw.accuracy(model, test_pre, test_y)
        shutil.rmtree(previous)
    return {"acc": acc, "extra": extra}


def fresh(spec: str, seed: int) -> torch.nn.Module:
    """The student untrained, seeded as the product seeds it, so both arms start from the same weights."""
    torch.manual_seed(seed)
    return build_student(spec, (1, 28, 28), 10)


def chosen(distill_result: dict) -> str:
    """What autotune picked, as the product reports it."""
    hp = distill_result.get("hyperparameters") or distill_result.get("chosen") or {}
    m, t, a = hp.get("method", "?"), hp.get("temperature"), hp.get("alpha")
    return f"{m} T={t:g} a={a:g}" if isinstance(t, (int, float)) and isinstance(a, (int, float)) else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 epochs")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--settings", default="abc")
    parser.add_argument(
        "--students",
        default=",".join(STUDENTS).replace("mlp:hidden=", ""),
        help="hidden sizes of the MLP students, comma-separated",
    )
    parser.add_argument("--label-fraction", type=float, default=0.03)
    parser.add_argument(
        "--textbook",
        action="store_true",
        help="add a column: the raw loop with textbook KD, T=4/alpha=0.9 (about +20%% run time)",
    )
    parser.add_argument("--train-rows", type=int, help="use a stratified subset of the 60k rows (smoke runs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--set",
        dest="config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a DistillConfig setting for the product's runs, e.g. --set alpha=0.9 (repeatable)",
    )
    parser.add_argument("--json", type=Path, default=CACHE_DIR / "quality.json")
    args = parser.parse_args()
    args.config = dict(setting(item) for item in args.config)
    if args.quick:
        args.seeds, args.epochs = 1, 3
    args.students = [f"mlp:hidden={h}" for h in args.students.split(",")]
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    teacher, info = ensure_teacher()
    x_raw, y_all = load_split("train")
    if args.train_rows:
        keep = stratified_subset(y_all, args.train_rows / len(y_all), seed=12345)
        x_raw, y_all = x_raw[keep], y_all[keep]
    x_test_raw, y_test = load_split("t10k")
    x_pre, x_test_pre = preprocess(x_raw), preprocess(x_test_raw)
    teacher_logits = raw.teacher_logits(teacher, torch.from_numpy(x_pre))
    teacher_test = 100 * raw.accuracy(teacher, torch.from_numpy(x_test_pre), torch.from_numpy(y_test))
    data = (x_raw, y_all, x_pre, x_test_raw, x_test_pre, y_test)

    per_seed: dict = defaultdict(list)
    extras: dict = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="distill-quality-", dir=CACHE_DIR) as tmp:
        for seed in range(args.seeds):
            out = run_seed(seed, args, teacher_logits, data, Path(tmp))
            for key, value in out["acc"].items():
                per_seed[key].append(value)
            for key, value in out["extra"].items():
                extras[key].append(value)
            print(f"seed {seed} done, {time.perf_counter() - started:.0f}s", flush=True)
    elapsed = time.perf_counter() - started
    results = report(per_seed, extras, teacher_test, args, elapsed)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2))


def report(per_seed, extras, teacher_test: float, args, elapsed: float) -> dict:
    mean = {k: statistics.fmean(v) for k, v in per_seed.items()}
    print(
        f"\nFashion-MNIST, t10k accuracy %, mean of {args.seeds} seed(s), {args.epochs} epochs; "
        f"teacher (CNN) {teacher_test:.2f}"
    )
    header = (
        f"{'setting':28} {'student':8} {'alone':>6} {'KD T4/a.9':>9} {'distilled':>9} {'delta':>6} "
        f"{'kept':>5} {'gap':>5}  chosen by auto"
    )
    print(header)
    print("-" * len(header))
    checks = []
    for name in args.settings:
        for spec in args.students:
            alone_key = ("a" if name == "c" else name, spec, "alone")
            alone, dist = mean.get(alone_key), mean[name, spec, "distilled"]
            tb = mean.get((name, spec, "textbook"))
            label = SETTINGS[name]
            delta = dist - alone if alone is not None else float("nan")
            gap = (
                delta / (teacher_test - alone) if alone is not None and teacher_test > alone else float("nan")
            )
            picks = ", ".join(sorted({e["chosen"] for e in extras[name, spec]}))
            print(
                f"{label:28} {spec.split('=')[-1]:>8} {fmt(alone):>6} {fmt(tb):>9} {dist:9.2f} {delta:+6.2f} "
                f"{dist / teacher_test:5.3f} {gap:5.2f}  {picks}"
            )
            if alone is None:
                continue
            low = min(
                d - a for d, a in zip(per_seed[name, spec, "distilled"], per_seed[alone_key], strict=True)
            )
            if name == "a":
                checks.append((f"(a) {spec}: distilled >= alone (worst seed {low:+.2f})", delta >= 0))
                if spec.endswith("=128"):
                    checks.append((f"(a) {spec}: distilled >= alone + 0.3", delta >= 0.3))
            elif name == "b":
                checks.append((f"(b) {spec}: distilled >= alone + 2 on 3% labels", delta >= 2.0))
            else:
                checks.append((f"(c) {spec}: distilled >= alone on 100% labels - 0.5", delta >= -0.5))
    print(
        "\n* (c)'s alone is the student trained on 100% of the labels."
        "\nkept = distilled / teacher; gap = share of the teacher-alone gap closed by distilling"
    )
    for text, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    secs = [sum(e["seconds"].values()) for v in extras.values() for e in v]
    print(
        f"\nproduct runs: {len(secs)}, {sum(secs):.0f}s in all; whole benchmark {elapsed:.0f}s "
        f"on {torch.get_num_threads()} threads"
    )
    return {
        "teacher": teacher_test,
        "seeds": args.seeds,
        "epochs": args.epochs,
        "elapsed_s": elapsed,
        "accuracy": {"|".join(k): v for k, v in per_seed.items()},
        "extras": {"|".join(k): v for k, v in extras.items()},
        "checks": [{"target": t, "pass": ok} for t, ok in checks],
    }


def setting(item: str) -> tuple[str, object]:
    key, _, value = item.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    main()
