"""What this machine is: the GPU a profile belongs to (or the CPU when there is none)."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    uuid: str  # a profile file belongs to one physical card, not to a slot
    total_vram_bytes: int
    compute_capability: str  # "9.0"
    driver: str | None = None  # NVIDIA driver version, None when nvidia-smi is absent
    h2d_gbps: float | None = None  # measured pinned host-to-device bandwidth (decimal GB/s)


@dataclass(frozen=True)
class CpuInfo:
    name: str
    cores: int
    ram_bytes: int | None = None


@dataclass(frozen=True)
class DeviceInfo:
    cpu: CpuInfo
    gpu: GpuInfo | None  # None: a CPU-only machine

    @property
    def key(self) -> str:
        """Names the profile file: one per GPU, or one for a CPU-only machine."""
        return f"gpu-{self.gpu.uuid}" if self.gpu else "cpu"

    def describe(self) -> str:
        if self.gpu is None:
            return f"CPU {self.cpu.name} ({self.cpu.cores} cores)"
        gpu = self.gpu
        bandwidth = f", pinned H2D {gpu.h2d_gbps:.1f} GB/s" if gpu.h2d_gbps else ""
        return (
            f"{gpu.name} ({gpu.total_vram_bytes / 1024**3:.1f} GiB, compute {gpu.compute_capability}, "
            f"driver {gpu.driver or 'unknown'}{bandwidth})"
        )


def detect(device_index: int = 0) -> DeviceInfo:
    """The CUDA device `device_index` if torch sees one, else the CPU alone."""
    cpu = detect_cpu()
    if not torch.cuda.is_available():
        return DeviceInfo(cpu=cpu, gpu=None)
    props = torch.cuda.get_device_properties(device_index)
    uuid = str(props.uuid)
    return DeviceInfo(
        cpu=cpu,
        gpu=GpuInfo(
            index=device_index,
            name=props.name,
            uuid=uuid,
            total_vram_bytes=int(props.total_memory),
            compute_capability=f"{props.major}.{props.minor}",
            driver=nvidia_driver_version(uuid),
        ),
    )


def detect_cpu() -> CpuInfo:
    return CpuInfo(name=_cpu_name(), cores=os.cpu_count() or 1, ram_bytes=_ram_bytes())


def nvidia_driver_version(uuid: str) -> str | None:
    """torch reports the CUDA runtime, not the driver: ask nvidia-smi for the card's driver."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        result = subprocess.run(
            [smi, f"--id=GPU-{uuid}", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def _cpu_name() -> str:
    # platform.processor() is empty or just "x86_64" on most Linux systems; cpuinfo has the model.
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not available on this platform
        return None
