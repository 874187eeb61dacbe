"""Latency measurement and the record of the machine it ran on.

What the paper calls "s/image" is measured here the way it should be: warm-up
calls excluded, the GPU synchronised before and after every timed call (CUDA
kernels run asynchronously, so an unsynchronised clock measures only the
launch), and the distribution reported (mean, median, p95), not one number.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from spinedet.detect.engine import synchronize


def timed_calls(step: Callable[[int], object], warmup: int, iterations: int,
                device: torch.device) -> list[float]:
    """Seconds taken by `step(i)` for i = warmup .. warmup + iterations - 1,
    after `warmup` untimed calls."""
    for i in range(warmup):
        step(i)
    seconds = []
    for i in range(warmup, warmup + iterations):
        synchronize(device)
        start = time.perf_counter()
        step(i)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def latency_stats(seconds: list[float]) -> dict:
    """Mean, median and 95th percentile of per-call seconds."""
    values = np.asarray(seconds, dtype=float)
    if values.size == 0:
        raise ValueError("no timed calls")
    return {
        "mean": float(values.mean()),
        "median": float(np.median(values)),
        "p95": float(np.percentile(values, 95)),
        "min": float(values.min()),
        "max": float(values.max()),
        "n": int(values.size),
    }


class MachineLoad:
    """What else the machine was doing while a block ran: the 1-minute load
    average before and after (every runnable process, this one included), and
    this process's CPU seconds against wall seconds."""

    def __enter__(self) -> "MachineLoad":
        self._load_before = load_average()
        self._cpu = time.process_time()
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self._wall
        own_cpus = (time.process_time() - self._cpu) / wall if wall > 0 else 0.0
        load_after = load_average()
        self.record = {
            "load_average_1min_before": self._load_before,
            "load_average_1min_after": load_after,
            "logical_cpus": os.cpu_count(),
            "process_cpu_s": round(own_cpus * wall, 3),
            "wall_s": round(wall, 3),
            "process_cpus_busy": round(own_cpus, 3),
            "shared": shared_machine(load_after, own_cpus),
        }


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # not on this platform
        return None


def shared_machine(load_after: float | None, own_cpus: float) -> bool | None:
    """Whether other processes wanted the CPUs while this one was timed: the
    1-minute load average at the end exceeds the CPUs this process kept busy by
    more than one. The load average before is recorded but not judged: it still
    carries the previous job (it decays with a 1-minute time constant). None
    where the platform has no load average."""
    if load_after is None:
        return None
    return load_after > own_cpus + 1.0


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


# /proc/cpuinfo flags that decide how fast (and, trained from scratch, with which
# numbers) the CPU runs: oneDNN picks its kernels by them.
CPU_FEATURES = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX512-BF16", "amx_tile": "AMX"}


def cpu_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's vector instruction sets that matter here, e.g. 'AVX2, AVX-512, AVX512-BF16';
    'unknown' where /proc/cpuinfo is not readable, 'none of AVX2, ...' where it lists none."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return "unknown"
    flags = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags.update(value.split())
            break
    found = [name for flag, name in CPU_FEATURES.items() if flag in flags]
    return ", ".join(found) if found else "none of " + ", ".join(CPU_FEATURES.values())


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment(device: torch.device) -> dict:
    """Hardware and software of this run (no host name: it can identify a site)."""
    on_cuda = device.type == "cuda"
    return {
        "hardware": {
            "cpu": cpu_model(),
            "cpu_features": cpu_features(),
            "logical_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": device.type,
            "gpu": torch.cuda.get_device_name(device) if on_cuda else None,
            "gpu_memory_gib": (round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
                               if on_cuda else None),
        },
        "software": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "torchvision": package_version("torchvision"),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "numpy": np.__version__,
        },
    }
