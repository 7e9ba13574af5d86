"""What a trained model costs to run: one image at the trial's image size, batch 1, on the trial's
own device, the way a deployment would call it (eval mode, no autograd, float32).

A search measures it only when an objective asks (`SearchSpec.measures_cost`): on CPU the memory
figure needs torch's profiler, which takes a second or more to start on a busy machine, and the
timing runs would slow every trial of a search that does not use them.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

#: Forward passes run before timing (lazy initialisation, caches, cuDNN's algorithm choice).
WARMUP_RUNS = 3
#: Timed forward passes; `latency_ms` is their median.
TIMED_RUNS = 10
MIB = 1024 * 1024


def measure_cost(
    net: nn.Module, *, channels: int, image_size: tuple[int, int], device: torch.device
) -> dict[str, float]:
    """`latency_ms` (median of TIMED_RUNS forwards after WARMUP_RUNS) and `peak_memory_mb` (see
    `peak_memory_mb`) of `net` on one random image; `net` keeps its mode. (`num_params`, the
    third cost objective, every trial reports anyway.)

    Other work on the same device (trials in parallel, data decoding) slows the timed runs: the
    figures compare trials of one search on like hardware, not across machines.
    """
    image = torch.rand(1, channels, *image_size, device=device)
    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode():
            for _ in range(WARMUP_RUNS):
                net(image)
            _synchronize(device)
            times = []
            for _ in range(TIMED_RUNS):
                started = time.perf_counter()
                net(image)
                _synchronize(device)
                times.append(time.perf_counter() - started)
            peak = peak_memory_mb(net, image)
    finally:
        net.train(was_training)
    return {
        "latency_ms": statistics.median(times) * 1000,
        "peak_memory_mb": peak,
    }


def peak_memory_mb(net: nn.Module, image: torch.Tensor) -> float:
    """The model's parameters and buffers plus the most memory its forward of `image` held at
    once beyond them, in MiB.

    CUDA: the caching allocator's peak during the forward (`max_memory_allocated` after a reset)
    less what was allocated before it, so the optimizer's state and other tensors of the trial
    do not count. CPU: the profiler's memory records (`profile_memory`), summed in the order the
    operators ran; the allocator is not watched within an operator, so a workspace an operator
    frees before it returns is not counted.
    """
    weights = sum(t.numel() * t.element_size() for t in (*net.parameters(), *net.buffers()))
    if image.device.type == "cuda":
        before = torch.cuda.memory_allocated(image.device)
        torch.cuda.reset_peak_memory_stats(image.device)
        net(image)
        torch.cuda.synchronize(image.device)
        forward = torch.cuda.max_memory_allocated(image.device) - before
    else:
        forward = _cpu_forward_peak(net, image)
    return (weights + max(forward, 0)) / MIB


def _cpu_forward_peak(net: nn.Module, image: torch.Tensor) -> int:
    """Bytes held at once by the tensors a CPU forward allocates, op by op (the profiler records
    each operator's own allocations less its frees, and frees outside any operator apart)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        net(image)
    changes = sorted(
        (event.time_range.start, event.self_cpu_memory_usage)
        for event in prof.events()
        if event.self_cpu_memory_usage
    )
    held = peak = 0
    for _, change in changes:
        held += change
        peak = max(peak, held)
    return peak


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
