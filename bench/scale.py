"""Data larger than memory: does a streamed image job stay within bounded memory, and at what speed?

    python -m bench.scale                  # the full run (about 40 minutes on 2 cores)
    python -m bench.scale --small 2000 --large 20000 --skip-quality   # the plumbing, a few minutes

Generated data: 64x64 RGB JPEGs of 10 classes (a class is a colour and a stripe angle, each image with its
own position, contrast and noise), written as WebDataset shards (`key.jpg` + `key.cls`, 5,000 samples per
tar) in a folder: the set a user registers. The teacher is a small CNN this bench trains for a few minutes
on 20k of them (cached under ~/.cache/distill-bench/scale); the student is the product's `cnn`.

(a) Peak RSS of the soft-label and distill stages (+ evaluate) at `--small` (20k) and `--large` (200k)
    images, each in a fresh child process (its VmHWM; the loader's worker processes are forks of it that
    hold a few batches each). `streaming: "always"`; one epoch, no baseline. Target: large / small <= 1.3x.
(b) Images per second of the product's loader (`ImageStream.pixel_batches`: uint8 batches of 256 handed
    to the training process, as many decoding processes as CPUs) against a bare loop of the same Pillow
    decode over the same members with the same number of processes (`multiprocessing.Pool`, each decoding
    a share, nothing sent back): the ceiling. Best of 3. Target >= 90%. Also shown: the same batches made
    float32 in the training process (`ImageStream.batches` on the CPU; with a GPU that happens there).
(c) Small data keeps the in-memory path and is not slower: a Fashion-MNIST job (the 60k IDX training rows
    and the 10k test rows as validation, `mlp:hidden=128`, 2 epochs, Hinton, baseline included) run by this
    code and by the commit before streaming existed (a git worktree of it), CPU seconds of the job's process
    (user + system), best of 3, interleaved. Target: new / old within 10%. The teacher: bench/teacher.py's
    cached CNN when present, else an MLP trained here for one epoch.
A quality line: the student trained with augmentation and 4 stored views (FKD) against the same student
without, same epochs, on a 10k-image subset, evaluated on 2,000 held-out generated images.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.fmnist import CACHE_DIR

SIDE, CLASSES, PER_SHARD = 64, 10, 5000
SCALE_CACHE = CACHE_DIR / "scale"
OLD_COMMIT = "e59dd19"  # the last commit before image_stream.py
STREAM_JOB = {
    "student": "cnn:channels=8,16", "epochs": 1, "batch_size": 128, "method": "hinton",
    "temperature": 4.0, "alpha": 0.5, "preprocess": {"scale": 1 / 255}, "soft_label_format": "topk",
    "topk": 5, "baseline": False, "streaming": "always", "export_formats": ["safetensors"],
}  # fmt: skip


# -- data --------------------------------------------------------------------------------------------------


def images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, 64, 64, 3) and labels: class c is colour c and stripes at c * 18 degrees."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    palette = np.random.default_rng(99).uniform(40, 215, (CLASSES, 3))
    grid = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32)
    out = np.empty((n, SIDE, SIDE, 3), np.uint8)
    for i in range(n):
        angle = np.pi * y[i] / CLASSES + rng.normal(0, 0.08)
        wave = np.sin((grid[0] * np.cos(angle) + grid[1] * np.sin(angle)) * rng.uniform(0.35, 0.6))
        cy, cx = rng.uniform(16, 48, 2)
        blob = np.exp(-((grid[0] - cy) ** 2 + (grid[1] - cx) ** 2) / (2 * rng.uniform(8, 16) ** 2))
        contrast = rng.uniform(0.4, 1.0)
        pixel = palette[y[i]] * (0.5 + 0.5 * blob[..., None]) + 40 * contrast * wave[..., None]
        pixel += rng.normal(0, 18, pixel.shape)
        out[i] = np.clip(pixel, 0, 255).astype(np.uint8)
    return out, y


def write_shards(folder: Path, n: int, seed: int) -> Path:
    """A WebDataset shard set of n images (cached: written once per size and seed)."""
    from PIL import Image

    done = folder / ".complete"
    if done.is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for shard, start in enumerate(range(0, n, PER_SHARD)):
        x, y = images(min(PER_SHARD, n - start), seed * 1000 + shard)
        with tarfile.open(folder / f"shard-{shard:05d}.tar", "w") as tar:
            for j, (pixels, label) in enumerate(zip(x, y, strict=True)):
                key = f"{start + j:08d}"
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
                label_bytes = str(int(label)).encode()
                for name, data in ((f"{key}.jpg", buffer.getvalue()), (f"{key}.cls", label_bytes)):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    done.touch()
    return folder


def teacher(path: Path, minutes: float = 3.0) -> Path:
    """A small CNN trained on 20k generated images for about `minutes` (cached), saved as TorchScript."""
    import torch
    from torch import nn

    if path.is_file():
        return path
    x, y = images(20000, seed=7)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
    yt = torch.from_numpy(y)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 24, 3, stride=2, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
        nn.Conv2d(24, 48, 3, stride=2, padding=1), nn.BatchNorm2d(48), nn.ReLU(),
        nn.Conv2d(48, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, CLASSES),
    )  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), 3e-3)
    started = time.perf_counter()
    while time.perf_counter() - started < minutes * 60:
        for batch in torch.randperm(len(yt)).split(128):
            loss = nn.functional.cross_entropy(model(xt[batch]), yt[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if time.perf_counter() - started > minutes * 60:
                break
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(torch.jit.script(model), str(path))
    return path


# -- (a) peak memory ---------------------------------------------------------------------------------------


def stages_child(work: str, job: str) -> None:
    """In a fresh process: the job's stages, then this process's and its loaders' peak RSS as JSON."""
    from worker.distill.config import DistillConfig
    from worker.distill.pipeline import distill, evaluate, soft_label

    cfg = DistillConfig.from_dict(json.loads(job))
    timings = {}
    for name, stage in (("soft_label", soft_label), ("distill", distill), ("evaluate", evaluate)):
        started = time.perf_counter()
        result = stage(Path(work), cfg)
        timings[name] = round(time.perf_counter() - started, 1)
    report: dict[str, Any] = result
    print(
        json.dumps(
            {
                # VmHWM: this process's own peak. ru_maxrss would carry the parent's RSS across fork and exec.
                "peak_rss_mib": _status_kib("VmHWM") / 1024,
                "seconds": timings,
                "teacher_accuracy": report["teacher"]["accuracy"],
                "student_accuracy": report["student"]["accuracy"],
            }
        )
    )


def _status_kib(field: str) -> int:
    return int(Path("/proc/self/status").read_text().split(f"{field}:")[1].split()[0])


def run_stages(
    shards: Path, teacher_file: Path, job: dict[str, Any], validation: Path | None = None
) -> dict[str, Any]:
    """The job's stages in a fresh child process (stages_child); what it reports."""
    from worker.distill.workfolder import prepare_inputs

    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        work = Path(tmp) / "work"
        prepare_inputs(work, teachers=[teacher_file], dataset=shards, validation=validation)
        out = subprocess.run(
            [sys.executable, "-m", "bench.scale", "--child", str(work), json.dumps(job)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if out.returncode:
            raise SystemExit(f"stage child failed:\n{out.stderr[-4000:]}")
        return dict(json.loads(out.stdout.strip().splitlines()[-1]))


# -- (b) loader throughput ---------------------------------------------------------------------------------


def _bare_share(args: tuple[list[tuple[str, int, int]]]) -> int:
    from PIL import Image

    (members,) = args
    total = 0
    handles: dict[str, int] = {}
    for path, offset, size in members:
        fd = handles.setdefault(path, os.open(path, os.O_RDONLY))
        with Image.open(io.BytesIO(os.pread(fd, size, offset))) as im:
            total += int(np.asarray(im.convert("RGB"), dtype=np.uint8)[0, 0, 0])
    return total


def loader_speed(shards: Path, repeats: int = 3) -> dict[str, Any]:

    from worker.distill.image_stream import loader_workers, open_image_stream

    data = open_image_stream(shards)
    assert data is not None
    stream, workers = data.x, loader_workers()
    n = len(stream)
    lists = [range(s, min(n, s + 256)) for s in range(0, n, 256)]
    m = stream.members
    members = [(m.containers[int(m.container[i])][1], int(m.offset[i]), int(m.size[i])) for i in range(n)]
    shares = [(members[k::workers],) for k in range(workers)]
    product, converted, bare = [], [], []
    for _ in range(repeats):
        started = time.perf_counter()
        rows = sum(len(batch) for batch in stream.pixel_batches(lists))
        product.append(n / (time.perf_counter() - started))
        assert rows == n
        started = time.perf_counter()
        rows = sum(len(batch) for batch in stream.batches(lists))
        converted.append(n / (time.perf_counter() - started))
        started = time.perf_counter()
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            pool.map(_bare_share, shares)
        bare.append(n / (time.perf_counter() - started))
    return {
        "images": n,
        "workers": workers,
        "product_per_s": max(product),
        "float_per_s": max(converted),
        "bare_per_s": max(bare),
    }


# -- (c) small data, old vs new code -----------------------------------------------------------------------


FMNIST_CHILD = """
import json, resource, sys
from pathlib import Path
import worker.distill
from worker.distill.config import DistillConfig
from worker.distill.pipeline import run_all

run_all(Path(sys.argv[1]), DistillConfig.from_dict(json.loads(sys.argv[2])))
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"cpu_seconds": usage.ru_utime + usage.ru_stime, "code": worker.distill.__file__}))
"""


def fmnist_job() -> dict[str, Any]:
    from bench.fmnist import MEAN, SCALE, STD

    return {
        "student": "mlp:hidden=128", "epochs": 2, "batch_size": 128, "method": "hinton", "temperature": 4.0,
        "alpha": 0.5, "preprocess": {"scale": SCALE, "mean": [MEAN], "std": [STD]},
        "export_formats": ["safetensors"],
    }  # fmt: skip


def fmnist_arm(code: Path, teacher_file: Path, repeats_done: list[float]) -> None:
    from bench.fmnist import FMNIST_DIR
    from worker.distill.workfolder import prepare_inputs

    with tempfile.TemporaryDirectory(prefix="scale-fmnist-") as tmp:
        work = Path(tmp) / "work"
        prepare_inputs(work, teachers=[teacher_file], dataset=FMNIST_DIR)
        env = {**os.environ, "PYTHONPATH": str(code)}
        out = subprocess.run(
            [sys.executable, "-c", FMNIST_CHILD, str(work), json.dumps(fmnist_job())],
            capture_output=True, text=True, check=False, env=env, cwd=code,
        )  # fmt: skip
        if out.returncode:
            raise SystemExit(f"fashion-mnist child failed:\n{out.stderr[-4000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        if not result["code"].startswith(str(code)):  # the code under test, not the installed one
            raise SystemExit(f"the child ran {result['code']}, not the code in {code}")
        repeats_done.append(float(result["cpu_seconds"]))


def fmnist_teacher() -> Path:
    """bench/teacher.py's cached CNN when it is there; else an MLP teacher trained here for one epoch (a few
    seconds): (c) times the product's path, which costs the same whatever the teacher's quality."""
    from bench.teacher import TEACHER_PATH

    if TEACHER_PATH.is_file():
        return Path(TEACHER_PATH)
    path = SCALE_CACHE / "fmnist_mlp_teacher.pt"
    if path.is_file():
        return path
    import torch
    from torch import nn

    from bench.fmnist import load_split, preprocess

    x, y = load_split("train")
    xt, yt = torch.from_numpy(preprocess(x)).flatten(1), torch.from_numpy(y)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    optimizer = torch.optim.AdamW(mlp.parameters(), 1e-3)
    for batch in torch.randperm(len(yt)).split(128):
        loss = nn.functional.cross_entropy(mlp(xt[batch]), yt[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model = nn.Sequential(nn.Flatten(), mlp).eval()
    torch.jit.save(torch.jit.script(model), str(path))
    return path


# -- main --------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--small", type=int, default=20_000)
    parser.add_argument("--large", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-fmnist", action="store_true")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        stages_child(*args.child)
        return
    started = time.perf_counter()
    SCALE_CACHE.mkdir(parents=True, exist_ok=True)
    teacher_file = teacher(SCALE_CACHE / "teacher.pt")
    print(f"teacher ready ({time.perf_counter() - started:.0f} s)", flush=True)
    rows: list[str] = []

    small = write_shards(SCALE_CACHE / f"shards-{args.small}", args.small, seed=1)
    large = write_shards(SCALE_CACHE / f"shards-{args.large}", args.large, seed=2)
    print(f"shards ready ({time.perf_counter() - started:.0f} s)", flush=True)
    memory = {}
    for name, shards in (("small", small), ("large", large)):
        memory[name] = run_stages(shards, teacher_file, STREAM_JOB)
        print(name, memory[name], flush=True)
    ratio = memory["large"]["peak_rss_mib"] / memory["small"]["peak_rss_mib"]
    rows.append(
        f"| (a) peak RSS, stage process, {args.small:,} vs {args.large:,} images | "
        f"{memory['small']['peak_rss_mib']:.0f} MiB vs {memory['large']['peak_rss_mib']:.0f} MiB | "
        f"{ratio:.2f}x | <= 1.3x: {'PASS' if ratio <= 1.3 else 'FAIL'} |"
    )

    speed = loader_speed(small, args.repeats)
    share = speed["product_per_s"] / speed["bare_per_s"]
    rows.append(
        f"| (b) loader, {speed['workers']} processes, {speed['images']:,} JPEGs | "
        f"{speed['product_per_s']:.0f} vs {speed['bare_per_s']:.0f} images/s (bare Pillow) | {share:.0%} | "
        f">= 90%: {'PASS' if share >= 0.9 else 'FAIL'} |"
    )
    rows.append(
        f"| (b) the same batches made float32 on the CPU (the training process's share, done on the device "
        f"when there is one) | {speed['float_per_s']:.0f} images/s | "
        f"{speed['float_per_s'] / speed['bare_per_s']:.0%} | |"
    )
    print(rows[-1], flush=True)

    if not args.skip_fmnist:
        old = Path(tempfile.mkdtemp(prefix="scale-old-"))
        repo = Path(__file__).parents[1]
        add = ["git", "-C", str(repo), "worktree", "add", "--detach", str(old), OLD_COMMIT]
        subprocess.run(add, check=True, capture_output=True)
        try:
            fm_teacher = fmnist_teacher()
            times: dict[str, list[float]] = {"old": [], "new": []}
            for _ in range(args.repeats):
                fmnist_arm(old, fm_teacher, times["old"])
                fmnist_arm(repo, fm_teacher, times["new"])
        finally:
            subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(old)], check=False)
        new_s, old_s = min(times["new"]), min(times["old"])
        rows.append(
            f"| (c) Fashion-MNIST job (in memory), CPU s, best of {args.repeats} | new {new_s:.1f} vs old "
            f"{old_s:.1f} (old commit {OLD_COMMIT}) | {new_s / old_s:.2f}x | within 10%: "
            f"{'PASS' if new_s / old_s <= 1.10 else 'FAIL'} |"
        )
        print(rows[-1], times, flush=True)

    if not args.skip_quality:
        subset = write_shards(SCALE_CACHE / "shards-quality-10000", 10_000, seed=3)
        held = write_shards(SCALE_CACHE / "shards-quality-val-2000", 2_000, seed=4)
        quality = {}
        for arm, extra in (
            ("no augmentation", {}),
            ("augment + 4 views", {"augment": {"random_resized_crop": {"scale": [0.5, 1.0]}, "hflip": True},
                                   "views": 4}),
        ):  # fmt: skip
            job = {**STREAM_JOB, "epochs": 8, "streaming": "auto", **extra}
            quality[arm] = run_stages(subset, teacher_file, job, validation=held)
            print(arm, quality[arm], flush=True)
        rows.append(
            "| quality: cnn:channels=8,16, 8 epochs, 10k images, 2k held out | "
            + " vs ".join(f"{arm} {q['student_accuracy']:.2%}" for arm, q in quality.items())
            + f" (teacher {quality['no augmentation']['teacher_accuracy']:.2%}) | | report |"
        )
    print(f"\n{time.perf_counter() - started:.0f} s in all\n")
    print("| measure | figures | ratio | target |\n| --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
