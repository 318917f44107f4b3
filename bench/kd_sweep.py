"""What knowledge distillation alone buys, setting by setting, in the hand-written loop.

    python -m bench.kd_sweep               # setting (b), every recipe: ~3 min on 2 cores (teacher cached)
    python -m bench.kd_sweep --setting a   # setting (a), autotune's whole grid at full length: ~20 min

Setting (b) of bench/quality.py (a seeded stratified 3% of the training rows, the product's validation
split), seeds 0 and 1, MLP-32 and MLP-128, 10 epochs. For each recipe (batch size, learning rate) it trains
the student alone on the hard labels and then with Hinton KD (alpha = 1.0, T in 1, 2, 4) and with DIST
(alpha = 1.0, T in 1, 2) from the cached teacher logits, and prints the t10k accuracy of alone and each KD
run minus alone, measured in the same run with the same recipe: the gain that is KD's, not the recipe's.

Setting (a) (every training row labelled), seeds 0-2, MLP-128, the default recipe: every point of autotune's
grid (Hinton KD and DIST, T in 1, 2, 4, alpha in 0.5, 0.9, 1.0) trained for the full 10 epochs on every row,
with its validation accuracy (what a choice made on validation sees) beside its t10k gain over alone (what
the user gets). It answers whether a longer or full-length search would find a better setting than
autotune's short trials do: only if validation ranks the settings as test does.

The raw loop has Hinton KD written out by hand; DIST is the product's own loss function (`losses.dist`).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from bench import product, raw
from bench.fmnist import load_split, preprocess, stratified_subset
from bench.quality import fresh
from bench.teacher import TEACHER_PATH, ensure_teacher
from worker.distill import losses

RECIPES = ((128, 1e-3), (32, 1e-3), (128, 3e-3), (32, 3e-3))  # (batch size, lr); the first is the default
ARMS = (("KD", 1.0), ("KD", 2.0), ("KD", 4.0), ("DIST", 1.0), ("DIST", 2.0))  # (method, T), alpha 1.0
GRID_A = tuple((m, t, a) for m in ("KD", "DIST") for a in (0.5, 0.9, 1.0) for t in (1.0, 2.0, 4.0))


def fit_kd(spec, seed, x_t, y_t, x_val, y_val, logits, method, t, alpha, **recipe):
    """-> (validation accuracy, the trained student): Hinton KD by hand, or the product's DIST loss."""
    loss = None if method == "KD" else losses.dist
    model, val = raw.fit(fresh(spec, seed), x_t, y_t, x_val, y_val, logits=logits,
                         T=t, alpha=alpha, loss=loss, seed=seed, **recipe)  # fmt: skip
    return val, model


def sweep_b(x_pre, y_all, logits, test_pre, test_y) -> None:
    print("seed student batch lr     alone  " + "  ".join(f"{m:>4} T={t:g}" for m, t in ARMS))
    for seed in (0, 1):
        tr, va = product.product_split(len(y_all), y_all, 0.1, seed)
        sub = tr[stratified_subset(y_all[tr], 0.03, seed)]
        x_t, y_t = x_pre[sub], torch.from_numpy(y_all[sub])
        x_val, y_val = x_pre[va], torch.from_numpy(y_all[va])
        for spec in ("mlp:hidden=32", "mlp:hidden=128"):
            for batch, lr in RECIPES:
                recipe = {"epochs": 10, "batch_size": batch, "lr": lr}
                model, _ = raw.fit(fresh(spec, seed), x_t, y_t, x_val, y_val, seed=seed, **recipe)
                alone = 100 * raw.accuracy(model, test_pre, test_y)
                gains = []
                for method, t in ARMS:
                    arm = (method, t, 1.0)
                    _, model = fit_kd(spec, seed, x_t, y_t, x_val, y_val, logits[sub], *arm, **recipe)
                    gains.append(100 * raw.accuracy(model, test_pre, test_y) - alone)
                cells = "  ".join(f"{g:+9.2f}" for g in gains)
                print(f"{seed:4d} {spec[11:]:>7} {batch:5d} {lr:.0e}  {alone:6.2f}  {cells}", flush=True)


def sweep_a(x_pre, y_all, logits, test_pre, test_y, spec: str, seeds: int) -> None:
    rows: dict[tuple, list[tuple[float, float]]] = {arm: [] for arm in GRID_A}
    for seed in range(seeds):
        tr, va = product.product_split(len(y_all), y_all, 0.1, seed)
        x_t, y_t = x_pre[tr], torch.from_numpy(y_all[tr])
        x_val, y_val = x_pre[va], torch.from_numpy(y_all[va])
        model, alone_val = raw.fit(fresh(spec, seed), x_t, y_t, x_val, y_val, seed=seed)
        alone = 100 * raw.accuracy(model, test_pre, test_y)
        print(f"seed {seed} {spec}: alone val {100 * alone_val:.2f}, t10k {alone:.2f}", flush=True)
        for arm in GRID_A:
            val, model = fit_kd(spec, seed, x_t, y_t, x_val, y_val, logits[tr], *arm)
            gain = 100 * raw.accuracy(model, test_pre, test_y) - alone
            rows[arm].append((100 * (val - alone_val), gain))
            name = f"{arm[0]:>4} T={arm[1]:g} alpha={arm[2]:g}"
            print(f"  {name}: val {100 * val:.2f}, t10k gain {gain:+.2f}", flush=True)
    print(f"\n{spec}, {seeds} seeds, full length; each cell: validation gain / t10k gain over alone, points")
    print("method  T  alpha  " + "  ".join(f"seed {s:<9d}" for s in range(seeds)) + "  mean val / t10k")
    for (m, t, a), cells in rows.items():
        per_seed = "  ".join(f"{v:+.2f} / {g:+.2f}" for v, g in cells)
        mean_v, mean_g = statistics.mean(v for v, _ in cells), statistics.mean(g for _, g in cells)
        print(f"{m:>6} {t:2g} {a:5g}   {per_seed}   {mean_v:+.2f} / {mean_g:+.2f}")
    picks = [max(GRID_A, key=lambda arm: rows[arm][s][0]) for s in range(seeds)]
    got = [rows[arm][s][1] for s, arm in enumerate(picks)]
    best = max(GRID_A, key=lambda arm: statistics.mean(g for _, g in rows[arm]))
    print(
        f"best on validation per seed: {[f'{m} T={t:g} a={a:g}' for m, t, a in picks]} -> t10k gain "
        f"{statistics.mean(got):+.2f} (per seed {', '.join(f'{g:+.2f}' for g in got)})"
    )
    print(
        f"best fixed setting on t10k (hindsight): {best[0]} T={best[1]:g} a={best[2]:g}, "
        f"{statistics.mean(g for _, g in rows[best]):+.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=("a", "b"), default="b")
    parser.add_argument("--student", default="mlp:hidden=128", help="setting (a) only")
    parser.add_argument("--seeds", type=int, default=3, help="setting (a) only")
    args = parser.parse_args()
    torch.set_num_threads(2)
    ensure_teacher()
    x_raw, y_all = load_split("train")
    xt_raw, y_test = load_split("t10k")
    x_pre, test_pre = torch.from_numpy(preprocess(x_raw)), torch.from_numpy(preprocess(xt_raw))
    test_y = torch.from_numpy(y_test)
    teacher = torch.jit.load(str(TEACHER_PATH)).eval()
    with torch.inference_mode():
        logits = raw.teacher_logits(teacher, x_pre)
    if args.setting == "b":
        sweep_b(x_pre, y_all, logits, test_pre, test_y)
    else:
        sweep_a(x_pre, y_all, logits, test_pre, test_y, args.student, args.seeds)


if __name__ == "__main__":
    main()
