"""Pinned host-to-device bandwidth: what one offloaded layer costs to stream (DESIGN.md section 5)."""

from __future__ import annotations

import torch

PROBE_BYTES = 256 * 1024**2  # large enough that launch latency is noise next to the copy
PROBE_REPEATS = 5


def measure_h2d_gbps(device: torch.device | str | None = None, nbytes: int = PROBE_BYTES) -> float | None:
    """Best of a few pinned -> GPU copies timed with CUDA events, in decimal GB/s; None without CUDA.

    The best, not the mean: the link's capability is what the streaming bound needs, and a
    neighbour's burst of traffic should not lower the profile for good.
    """
    if not torch.cuda.is_available():
        return None
    target = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    gpu = torch.empty(nbytes, dtype=torch.uint8, device=target)
    stream = torch.cuda.Stream(device=target)
    best_ms = float("inf")
    with torch.cuda.stream(stream):
        gpu.copy_(host, non_blocking=True)  # warm-up: first copy pays for mapping the pinned pages
        for _ in range(PROBE_REPEATS):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record(stream)
            gpu.copy_(host, non_blocking=True)
            end.record(stream)
            end.synchronize()
            best_ms = min(best_ms, start.elapsed_time(end))
    del host, gpu
    torch.cuda.empty_cache()
    return nbytes / (best_ms / 1000.0) / 1e9
