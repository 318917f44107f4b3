"""What knowledge distillation alone buys on few labels, recipe by recipe, in the hand-written loop.

    python -m bench.kd_sweep         # ~2 min on 2 cores once the teacher is cached (bench/teacher.py)

Setting (b) of bench/quality.py (a seeded stratified 3% of the training rows, the product's validation
split), seeds 0 and 1, MLP-32 and MLP-128, 10 epochs. For each recipe (batch size, learning rate) it trains
the student alone on the hard labels and then with Hinton KD (alpha = 1.0, T in 1, 2, 4) and with DIST
(alpha = 1.0, T in 1, 2) from the cached teacher logits, and prints the t10k accuracy of alone and each KD
run minus alone, measured in the same run with the same recipe: the gain that is KD's, not the recipe's.
The raw loop has Hinton KD written out by hand; DIST is the product's own loss function (`losses.dist`).
"""

from __future__ import annotations

import torch

from bench import product, raw
from bench.fmnist import load_split, preprocess, stratified_subset
from bench.quality import fresh
from bench.teacher import TEACHER_PATH, ensure_teacher
from worker.distill import losses

RECIPES = ((128, 1e-3), (32, 1e-3), (128, 3e-3), (32, 3e-3))  # (batch size, lr); the first is the default
ARMS = (("KD", 1.0), ("KD", 2.0), ("KD", 4.0), ("DIST", 1.0), ("DIST", 2.0))  # (method, T), alpha 1.0


def main() -> None:
    torch.set_num_threads(2)
    ensure_teacher()
    x_raw, y_all = load_split("train")
    xt_raw, y_test = load_split("t10k")
    x_pre, test_pre = torch.from_numpy(preprocess(x_raw)), torch.from_numpy(preprocess(xt_raw))
    test_y = torch.from_numpy(y_test)
    teacher = torch.jit.load(str(TEACHER_PATH)).eval()
    with torch.inference_mode():
        logits = raw.teacher_logits(teacher, x_pre)
    print("seed student batch lr     alone  " + "  ".join(f"{m:>4} T={t:g}" for m, t in ARMS))
    for seed in (0, 1):
        tr, va = product.product_split(len(y_all), y_all, 0.1, seed)
        sub = tr[stratified_subset(y_all[tr], 0.03, seed)]
        x_t, y_t = x_pre[sub], torch.from_numpy(y_all[sub])
        x_val, y_val = x_pre[va], torch.from_numpy(y_all[va])
        for spec in ("mlp:hidden=32", "mlp:hidden=128"):
            for batch, lr in RECIPES:
                recipe = {"epochs": 10, "seed": seed, "batch_size": batch, "lr": lr}
                model, _ = raw.fit(fresh(spec, seed), x_t, y_t, x_val, y_val, **recipe)
                alone = 100 * raw.accuracy(model, test_pre, test_y)
                gains = []
                for method, t in ARMS:
                    loss = None if method == "KD" else losses.dist
                    model, _ = raw.fit(fresh(spec, seed), x_t, y_t, x_val, y_val, logits=logits[sub],
                                       T=t, alpha=1.0, loss=loss, **recipe)  # fmt: skip
                    gains.append(100 * raw.accuracy(model, test_pre, test_y) - alone)
                cells = "  ".join(f"{g:+9.2f}" for g in gains)
                print(f"{seed:4d} {spec[11:]:>7} {batch:5d} {lr:.0e}  {alone:6.2f}  {cells}", flush=True)


if __name__ == "__main__":
    main()
