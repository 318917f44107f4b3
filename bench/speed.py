"""Speed on CPU: the product's distillation stage vs two hand-written raw-PyTorch loops, in one run.

    python -m bench.speed              # MLP-128 student, CNN teacher, 10 epochs, Fashion-MNIST
    python -m bench.speed --profile    # also cProfile the product's arm (top functions by own time)

Arms, all on the same rows (the product's 90/10 split of the 60k training images), the same student, the
same fixed T=4 / alpha=0.9 (so all do the same arithmetic; autotune is timed on its own with --auto):
  product  `pipeline.soft_label` + `pipeline.distill` on a work folder (teacher file + NPZ dataset);
  online   a DataLoader loop that runs the teacher on every batch of every epoch (what a user writes);
  floor    the teacher once over the rows into a tensor, then a loop indexing tensors (nothing to remove).
Targets: product >= 3x faster than online end to end (soft-label stage included); within 10% of the floor.
The floor and the product run twice, interleaved, and keep their best time: the machine is shared.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
import time
from pathlib import Path

import torch

from bench import product, raw
from bench.fmnist import CACHE_DIR, load_split, preprocess, stratified_subset
from bench.teacher import TEACHER_PATH, ensure_teacher
from worker.distill.students import build_student

T, ALPHA = 4.0, 0.9


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def product_arm(work: Path, data, spec: str, epochs: int, profile: bool, **settings) -> dict:
    x_raw, y_all, tr, va = data
    product.make_work(work, TEACHER_PATH, x_raw[tr], y_all[tr], x_raw[va], y_all[va])
    cfg = product.config(spec, epochs=epochs, seed=0, **({"temperature": T, "alpha": ALPHA} | settings))
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    _, label_s = timed(product.pipeline.soft_label, work, cfg, None)
    result, train_s = timed(product.pipeline.distill, work, cfg, None)
    if profiler:
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(18)
        print(text.getvalue())
    return {"label_s": label_s, "train_s": train_s, "total_s": label_s + train_s, "result": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--student", default="mlp:hidden=128")
    parser.add_argument("--train-rows", type=int, help="use a stratified subset of the 60k rows (smoke runs)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs of the product and the floor (best kept)"
    )
    parser.add_argument("--profile", action="store_true")
    parser.add_argument(
        "--auto", action="store_true", help="also time the product with temperature/alpha auto"
    )
    parser.add_argument("--skip-online", action="store_true", help="leave out the slow online arm")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    teacher, info = ensure_teacher()
    x_raw, y_all = load_split("train")
    if args.train_rows:
        keep = stratified_subset(y_all, args.train_rows / len(y_all), seed=12345)
        x_raw, y_all = x_raw[keep], y_all[keep]
    tr, va = product.product_split(len(y_all), y_all, 0.1, seed=0)
    x_pre = torch.from_numpy(preprocess(x_raw))
    y = torch.from_numpy(y_all)
    x_tr, y_tr, x_val, y_val = x_pre[tr], y[tr], x_pre[va], y[va]
    shape, classes = tuple(x_raw.shape[1:]), 10
    data = (x_raw, y_all, tr, va)
    print(
        f"{len(tr)} train rows, {len(va)} validation rows, {args.epochs} epochs, student {args.student}, "
        f"teacher CNN ({info['params']} params), T={T} alpha={ALPHA}, {torch.get_num_threads()} threads"
    )

    floor, prod = [], []
    with tempfile.TemporaryDirectory(prefix="distill-speed-", dir=CACHE_DIR) as tmp:
        for i in range(args.repeats):
            logits, label_s = timed(raw.teacher_logits, teacher, x_tr)
            (_, acc), train_s = timed(
                raw.fit,
                build_student(args.student, shape, classes),
                x_tr,
                y_tr,
                x_val,
                y_val,
                logits=logits,
                T=T,
                alpha=ALPHA,
                epochs=args.epochs,
            )
            floor.append(
                {"label_s": label_s, "train_s": train_s, "total_s": label_s + train_s, "val_acc": acc}
            )
            print(
                f"floor   run {i + 1}: teacher pass {label_s:6.1f}s + training {train_s:6.1f}s"
                f"  val {acc:.4f}",
                flush=True,
            )
            p = product_arm(Path(tmp) / f"p{i}", data, args.student, args.epochs, args.profile and i == 0)
            prod.append(p)
            print(
                f"product run {i + 1}: soft-label stage {p['label_s']:6.1f}s"
                f" + distill stage {p['train_s']:6.1f}s"
                f"  val {val_acc(p['result'])}",
                flush=True,
            )
        auto = (
            product_arm(
                Path(tmp) / "auto", data, args.student, args.epochs, False, temperature="auto", alpha="auto"
            )
            if args.auto
            else None
        )
    online_s = None
    if not args.skip_online:
        (_, acc), online_s = timed(
            raw.fit_online,
            build_student(args.student, shape, classes),
            teacher,
            x_tr,
            y_tr,
            x_val,
            y_val,
            T=T,
            alpha=ALPHA,
            epochs=args.epochs,
        )
        print(f"online  run 1: {online_s:6.1f}s  val {acc:.4f}", flush=True)

    best_floor = min(floor, key=lambda r: r["total_s"])
    best_prod = min(prod, key=lambda r: r["total_s"])
    print(f"\n{'arm':34} {'teacher':>8} {'training':>9} {'total':>8}")
    print(f"{'online (DataLoader, teacher/step)':34} {'-':>8} {'-':>9} {fmt(online_s):>8}")
    print(
        f"{'floor (cached logits, by hand)':34} {best_floor['label_s']:8.1f} {best_floor['train_s']:9.1f} "
        f"{best_floor['total_s']:8.1f}"
    )
    print(
        f"{'product (soft_label + distill)':34} {best_prod['label_s']:8.1f} {best_prod['train_s']:9.1f} "
        f"{best_prod['total_s']:8.1f}"
    )
    if auto:
        print(
            f"{'product, temperature/alpha auto':34} {auto['label_s']:8.1f} {auto['train_s']:9.1f} "
            f"{auto['total_s']:8.1f}"
        )
    over_floor = best_prod["total_s"] / best_floor["total_s"]
    print(
        f"\nproduct / floor: {over_floor:.3f} end to end, "
        f"{best_prod['train_s'] / best_floor['train_s']:.3f} training only, "
        f"{best_prod['label_s'] / best_floor['label_s']:.3f} teacher pass only"
    )
    if online_s is not None:
        speedup = online_s / best_prod["total_s"]
        print(
            f"{'PASS' if speedup >= 3 else 'FAIL'}  online / product = {speedup:.2f}x end to end"
            " (target >= 3x)"
        )
    print(
        f"{'PASS' if over_floor <= 1.10 else 'FAIL'}  product at {100 * (over_floor - 1):+.1f}% of the floor "
        f"(target <= +10%)"
    )


def val_acc(result: dict) -> str:
    """The product's best validation accuracy, from what `pipeline.distill` returns."""
    best = result.get("phases", {}).get("distill", {}).get("best_metric")
    return f"{best:.4f}" if isinstance(best, float) else "?"


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


if __name__ == "__main__":
    main()
