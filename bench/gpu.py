"""GPU: one training step from cached teacher logits vs one with the teacher run online, bf16, 224 px.

    python -m bench.gpu                         # on a CUDA card: ResNet-50 teacher -> ResNet-18 student
    python -m bench.gpu --device cpu --tiny     # smoke check anywhere (tiny models, 32 px, a few steps)
    python -m bench.gpu --stream                # also: the product's train() reading JPEG shards

Synthetic data held on the device (what the product's loop does when the data fits). Both arms run the same
student step (bf16 autocast, channels_last, AdamW, Hinton KD with fp32 softmax); the online arm runs the
teacher forward under `inference_mode` first, the cached arm reads the teacher's logits from a tensor, as
the product does after its soft-label stage. Target: cached >= 1.8x online in images per second.

`--stream`: the streaming path (worker/distill/image_stream.py) on the card. `--stream-rows` JPEGs at `--res`
written as a WebDataset shard, indexed, decoded by the product's DataLoader processes (uint8 batches, made
float on the card), the teacher's logits cached over them, then one epoch of the product's `train()` over
the stream against the same rows decoded once and held on the card: streamed / in-memory images per second
(where the CPUs' JPEG decoding caps a GPU step, this ratio shows it).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.raw import hinton_loss


class Block(nn.Module):
    """Basic (two 3x3) or bottleneck (1x1, 3x3, 1x1 with 4x expansion) residual block."""

    def __init__(self, c_in: int, width: int, stride: int, bottleneck: bool) -> None:
        super().__init__()
        c_out = width * 4 if bottleneck else width
        if bottleneck:
            layers = [
                nn.Conv2d(c_in, width, 1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.Conv2d(width, width, 3, stride, 1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.Conv2d(width, c_out, 1, bias=False),
                nn.BatchNorm2d(c_out),
            ]
        else:
            layers = [
                nn.Conv2d(c_in, width, 3, stride, 1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.Conv2d(width, c_out, 3, 1, 1, bias=False),
                nn.BatchNorm2d(c_out),
            ]
        self.body = nn.Sequential(*layers)
        self.skip = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        )
        self.out_channels = c_out

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + self.skip(x))


def resnet(depths: tuple[int, ...], bottleneck: bool, num_classes: int, base: int = 64) -> nn.Sequential:
    """An ImageNet-style ResNet (7x7 stride-2 stem, max-pool, four stages): (B, 3, H, W) -> (B, classes)."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, base, 7, 2, 3, bias=False),
        nn.BatchNorm2d(base),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    ]
    c = base
    for stage, depth in enumerate(depths):
        for i in range(depth):
            block = Block(c, base * 2**stage, 2 if i == 0 and stage > 0 else 1, bottleneck)
            layers.append(block)
            c = block.out_channels
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
    return nn.Sequential(*layers)


MODELS = {
    "resnet18": lambda n, base: resnet((2, 2, 2, 2), False, n, base),
    "resnet50": lambda n, base: resnet((3, 4, 6, 3), True, n, base),
    "resnet101": lambda n, base: resnet((3, 4, 23, 3), True, n, base),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny models and images: a smoke check")
    parser.add_argument("--teacher", default="resnet50", choices=sorted(MODELS))
    parser.add_argument("--student", default="resnet18", choices=sorted(MODELS))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=2048, help="synthetic dataset rows held on the device")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument(
        "--product",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the product's train() over the cached logits (--no-product skips it)",
    )
    parser.add_argument("--stream", action="store_true", help="also time train() streaming JPEG shards")
    parser.add_argument("--stream-rows", type=int, default=4096)
    args = parser.parse_args()
    base = 64
    if args.tiny:
        args.batch, args.res, args.classes, args.rows, args.steps, args.warmup, base = 8, 32, 10, 32, 3, 1, 8
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        card = torch.cuda.get_device_name(device)
    else:
        card = f"CPU ({torch.get_num_threads()} threads)"
    torch.manual_seed(0)
    mem = torch.channels_last
    teacher = MODELS[args.teacher](args.classes, base).to(device, memory_format=mem).eval()
    student = MODELS[args.student](args.classes, base).to(device, memory_format=mem).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=1e-4, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    x = torch.randn(args.rows, 3, args.res, args.res, device=device).contiguous(memory_format=mem)
    y = torch.randint(0, args.classes, (args.rows,), device=device)

    # The soft-label stage: the teacher once over the data, logits kept (fp16 like the product's shards).
    start = time.perf_counter()
    parts = []
    with torch.inference_mode():
        for i in range(0, args.rows, args.batch):
            with autocast:
                parts.append(teacher(x[i : i + args.batch]))
        cached = torch.cat(parts).to(torch.float16)
    sync(device)
    label_s = time.perf_counter() - start
    cached = cached.clone()  # inference tensors cannot be indexed into autograd code

    def step(idx: Tensor, online: bool) -> None:
        xb = x[idx]
        if online:
            with torch.inference_mode(), autocast:
                t = teacher(xb)
            t = t.clone()
        else:
            t = cached[idx]
        with autocast:
            s = student(xb)
        loss = hinton_loss(s, t, y[idx], 4.0, 0.9)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def images_per_s(online: bool) -> float:
        order = torch.randint(0, args.rows, (args.steps + args.warmup, args.batch), device=device)
        for i in range(args.warmup):
            step(order[i], online)
        sync(device)
        start = time.perf_counter()
        for i in range(args.warmup, args.warmup + args.steps):
            step(order[i], online)
        sync(device)
        return args.steps * args.batch / (time.perf_counter() - start)

    # Alternate the arms so clock boosts and neighbours affect both alike; keep each arm's best.
    rates = {"cached": [], "online": []}
    for _ in range(2):
        for arm in ("online", "cached"):
            rates[arm].append(images_per_s(arm == "online"))
    cached_ips, online_ips = max(rates["cached"]), max(rates["online"])
    ratio = cached_ips / online_ips
    peak = (
        f", peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
        if device.type == "cuda"
        else ""
    )
    print(f"device: {card}; torch {torch.__version__}; bf16 autocast, channels_last{peak}")
    print(
        f"teacher {args.teacher}, student {args.student}, {args.res}px, batch {args.batch}, "
        f"{args.classes} classes, {args.steps} timed steps per arm (best of 2)"
    )
    print(f"soft-label pass over {args.rows} rows: {label_s:.2f}s ({args.rows / label_s:.0f} img/s)")
    print(f"online-teacher step: {online_ips:8.1f} img/s")
    print(f"cached-logit step:   {cached_ips:8.1f} img/s")
    if args.product:
        print(
            f"product train(), cached logits: {product_rate(args, x, y, cached, base, device):8.1f} img/s "
            "(one epoch over the rows, its own bf16/memory format, after a warm-up epoch)"
        )
    print(f"{'PASS' if ratio >= 1.8 else 'FAIL'}  cached / online = {ratio:.2f}x (target >= 1.8x)")
    if args.stream:
        streamed, held = stream_rates(args, teacher, base, device)
        print(
            f"product train() streaming {args.stream_rows} JPEG rows: {streamed:8.1f} img/s vs "
            f"{held:8.1f} img/s held on the device: {streamed / held:.2f}x"
        )


def stream_rates(args, teacher: nn.Module, base: int, device: torch.device) -> tuple[float, float]:
    """One epoch of train() over a WebDataset shard of JPEGs, streamed and held on the device."""
    import io
    import tarfile
    import tempfile
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from worker.distill.config import DistillConfig
    from worker.distill.image_stream import open_image_stream
    from worker.distill.preprocess import PreprocessModule
    from worker.distill.train import TensorData, train

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="gpu-stream-") as tmp:
        shard = Path(tmp) / "shard.tar"
        with tarfile.open(shard, "w") as tar:
            for i in range(args.stream_rows):
                low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                image = Image.fromarray(low).resize((args.res, args.res), Image.BILINEAR)
                out = io.BytesIO()
                image.save(out, format="JPEG", quality=90)
                label = str(i % args.classes).encode()
                for name, data in ((f"{i:08d}.jpg", out.getvalue()), (f"{i:08d}.cls", label)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        found = open_image_stream(shard)
        assert found is not None
        stream = found.x.with_transform(PreprocessModule(1 / 255))
        y = torch.from_numpy(found.y)
        lists = [range(i, min(len(y), i + args.batch)) for i in range(0, len(y), args.batch)]
        held = torch.cat([b for b in stream.batches(lists, device=device)])
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            logits = torch.cat([teacher(held[r.start : r.stop]) for r in lists]).float()
        logits = logits.clone().cpu()
        config = DistillConfig(
            method="hinton", temperature=4.0, alpha=0.9, batch_size=args.batch, grad_clip=None
        )
        rates = []
        for x in (stream, held):
            torch.manual_seed(0)
            student = MODELS[args.student](args.classes, base)
            data = TensorData(x, y.to(device) if x is held else y, logits)
            train(student, data, None, "hinton", config, epochs=1, device=device)  # warm-up
            sync(device)
            result = train(student, data, None, "hinton", config, epochs=1, device=device)
            rates.append(len(y) / result.history[0]["seconds"])
        return rates[0], rates[1]


def product_rate(args, x: Tensor, y: Tensor, cached: Tensor, base: int, device: torch.device) -> float:
    """Images per second of `worker.distill.train.train` on the same rows, logits and student architecture."""
    from worker.distill.config import DistillConfig
    from worker.distill.train import TensorData, train

    torch.manual_seed(0)
    student = MODELS[args.student](args.classes, base)
    config = DistillConfig(method="hinton", temperature=4.0, alpha=0.9, batch_size=args.batch, grad_clip=None)
    data = TensorData(x.contiguous(), y, cached)
    train(student, data, None, "hinton", config, epochs=1, device=device)  # warm-up: cudnn autotuning
    sync(device)
    result = train(student, data, None, "hinton", config, epochs=1, device=device)
    return len(data) / result.history[0]["seconds"]


if __name__ == "__main__":
    main()
