"""Train the Fashion-MNIST CNN teacher once and cache it outside git.

    python -m bench.teacher            # ~20 min on 2 cores; a no-op when the cache exists

Writes `~/.cache/distill-bench/fmnist_teacher.pt` (TorchScript, takes preprocessed input of shape
(N, 1, 28, 28), (N, 28, 28) or (N, 784)) and `fmnist_teacher.json` (its t10k accuracy). A per-epoch
checkpoint lets an interrupted run continue where it stopped.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch import Tensor, nn

from bench.fmnist import CACHE_DIR, load_split, preprocess

TEACHER_PATH = CACHE_DIR / "fmnist_teacher.pt"
TEACHER_INFO = CACHE_DIR / "fmnist_teacher.json"


class FashionCNN(nn.Module):
    """Three conv blocks and a small head: ~8M multiply-adds per image, about 92-93% on t10k."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()

        def block(c_in: int, c_out: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()
            )

        self.features = nn.Sequential(
            block(1, 32), nn.MaxPool2d(2), block(32, 64), nn.MaxPool2d(2), block(64, 128), nn.MaxPool2d(2)
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(0.3),
            nn.Linear(128 * 3 * 3, 256),
            nn.ReLU(),
            nn.Dropout(0.3),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        # Accept flat or channel-less rows so the same file serves MLP-shaped datasets.
        return self.head(self.features(x.reshape(-1, 1, 28, 28)))


@torch.inference_mode()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 1000) -> float:
    model.eval()
    hits = sum(
        int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(x), batch)
    )
    return hits / len(x)


def train_teacher(epochs: int, seed: int = 0, batch_size: int = 128, lr: float = 3e-3) -> dict:
    torch.manual_seed(seed)
    x, y = (torch.from_numpy(a) for a in (preprocess(load_split("train")[0]), load_split("train")[1]))
    xt, yt = (torch.from_numpy(a) for a in (preprocess(load_split("t10k")[0]), load_split("t10k")[1]))
    model = FashionCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps_per_epoch = (len(x) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    ckpt_path = CACHE_DIR / "fmnist_teacher.ckpt"
    start = 0
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=True)
        (
            model.load_state_dict(ckpt["model"]),
            opt.load_state_dict(ckpt["opt"]),
            sched.load_state_dict(ckpt["sched"]),
        )
        torch.set_rng_state(ckpt["rng"])
        start = ckpt["epoch"]
    for epoch in range(start, epochs):
        t0, model = time.perf_counter(), model.train()
        for idx in torch.randperm(len(x)).split(batch_size):
            xb = x[idx]
            # Horizontal flips are label-preserving for clothes and cost nothing.
            flip = torch.rand(len(xb)) < 0.5
            xb[flip] = xb[flip].flip(-1)
            loss = nn.functional.cross_entropy(model(xb), y[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        acc = accuracy(model, xt, yt)
        print(
            f"epoch {epoch + 1}/{epochs}  loss {loss.item():.3f}  t10k {acc:.4f}"
            f"  {time.perf_counter() - t0:.0f}s",
            flush=True,
        )
        torch.save(
            {
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "sched": sched.state_dict(),
                "rng": torch.get_rng_state(),
                "epoch": epoch + 1,
            },
            ckpt_path,
        )
    model.eval()
    torch.jit.save(torch.jit.script(model), TEACHER_PATH)
    info = {
        "test_accuracy": accuracy(model, xt, yt),
        "epochs": epochs,
        "seed": seed,
        "params": sum(p.numel() for p in model.parameters()),
        "preprocess": {"scale": 1 / 255, "mean": [0.2860], "std": [0.3530]},
    }
    TEACHER_INFO.write_text(json.dumps(info, indent=2))
    ckpt_path.unlink()
    return info


def ensure_teacher(epochs: int = 12) -> tuple[torch.jit.ScriptModule, dict]:
    """The cached teacher and its info, training it first when the cache is empty."""
    if not (TEACHER_PATH.exists() and TEACHER_INFO.exists()):
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        train_teacher(epochs)
    return torch.jit.load(TEACHER_PATH), json.loads(TEACHER_INFO.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    np.random.seed(0)
    teacher, info = ensure_teacher(args.epochs)
    print(f"teacher: {TEACHER_PATH}  t10k accuracy {info['test_accuracy']:.4f}  params {info['params']}")


if __name__ == "__main__":
    main()
