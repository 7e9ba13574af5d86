"""Model cost per family: parameters, CPU forward+backward time per image, peak memory.

Each family runs in a fresh subprocess so its memory figure is its own: the growth of the
process's peak resident set (getrusage ru_maxrss) from just before the model is built to after
the timed steps. That counts weights, gradients, activations kept for backward, and what the
allocator and oneDNN hold on to; it is what a training worker would need on top of torch itself.
Times are medians over the timed steps (forward, cross-entropy, backward; no optimizer step)
per image, after one warm-up step: wall-clock, and CPU time of the process (all its threads).
On a shared machine the wall figure grows with the load; with --threads 1 the CPU figure is
close to what the step takes on an idle core.

    python bench/models.py [--width 32] [--depth 4] [--size 256] [--batch 2] [--repeats 3]
                           [--upsample transpose] [--threads N] [--channels-last]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from segsearch.models import ARCHS, build_model, count_parameters

NUM_CLASSES = 4


def measure(arch: str, args: argparse.Namespace) -> dict[str, float]:
    """Build one family and time its training step; run this in a fresh process."""
    torch.manual_seed(0)
    image = torch.randn(args.batch, 3, args.size, args.size)
    target = torch.randint(0, NUM_CLASSES, (args.batch, args.size, args.size))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = {"arch": arch, "width": args.width, "depth": args.depth, "upsample": args.upsample}
    model = build_model(cfg, in_channels=3, num_classes=NUM_CLASSES).train()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
        image = image.to(memory_format=torch.channels_last)
    wall, cpu = [], []
    for step in range(args.repeats + 1):
        model.zero_grad(set_to_none=True)
        started, started_cpu = time.perf_counter(), time.process_time()
        F.cross_entropy(model(image), target).backward()
        if step:
            wall.append(time.perf_counter() - started)
            cpu.append(time.process_time() - started_cpu)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "params": count_parameters(model),
        "wall_ms": 1000 * statistics.median(wall) / args.batch,
        "cpu_ms": 1000 * statistics.median(cpu) / args.batch,
        "peak_mib": (peak - before) / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--upsample", default="transpose")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--channels-last", action="store_true", help="NHWC weights and input")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure this arch, print JSON
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(measure(args.one, args)))
        return

    print(
        f"width {args.width}, depth {args.depth}, {args.size}x{args.size}, batch {args.batch}, "
        f"upsample {args.upsample}, {args.threads} CPU thread(s), "
        f"{'channels_last' if args.channels_last else 'contiguous'}, median of {args.repeats}, "
        f"torch {torch.__version__}, load average {os.getloadavg()[0]:.1f}"
    )
    print("| family | params | fwd+bwd wall ms/image | fwd+bwd CPU ms/image | peak memory MiB |")
    print("|---|---:|---:|---:|---:|")
    for arch in ARCHS.names():
        out = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--one", arch],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(
            f"| {arch} | {row['params'] / 1e6:.2f} M | {row['wall_ms']:.0f} "
            f"| {row['cpu_ms']:.0f} | {row['peak_mib']:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
