"""Profiles on disk: one human-readable TOML file per GPU (or `cpu.toml`), atomic and self-healing.

    schema_version = 2
    [gpu]                       # absent on a CPU-only machine
    name = "NVIDIA H200"  uuid = "..."  total_vram_bytes = ...  compute_capability = "9.0"
    driver = "570.86"  h2d_gbps = 55.1
    [cpu]
    name = "..."  cores = 16  ram_bytes = ...
    [models."Qwen/Qwen2.5-7B-Instruct".subspec_sd]
    method = "subspec_sd"  layers_on_gpu = 0  layers_total = 28  stream_buffers = 3  ...
    verify_ms_by_nodes = { 1 = 212.0, 64 = 213.1, ... }

TOML has no null: a field that does not apply is left out. Writes go to a temporary file in the
same folder, are fsynced and renamed over the old file, under a lock file, so a kill never leaves
half a profile and concurrent writers never lose each other's models. A file that does not parse,
lacks fields or has another schema version is moved aside to `<name>.bad-<timestamp>` and the
profile is measured again.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import tomllib
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import tomli_w
from filelock import FileLock, Timeout
from platformdirs import user_config_dir

from engine import EngineError
from profiles.hardware import CpuInfo, DeviceInfo, GpuInfo

# 2: plans record `stream_buffers`. A version-1 plan does not say how many buffers its measured
# peak was taken with (the engine's default went from 2 to 3 while version 1 was written), so it
# is moved aside and measured again rather than guessed.
SCHEMA_VERSION = 2
LOCK_TIMEOUT_S = 30.0

log = logging.getLogger(__name__)


class ProfileError(EngineError):
    """An expected profile failure (cannot save, does not fit...): one line for the user."""


def profiles_dir() -> Path:
    """SUBSPEC_CONFIG_DIR overrides the platform config dir (tests, portable installs)."""
    base = os.environ.get("SUBSPEC_CONFIG_DIR") or user_config_dir("subspec-chat")
    return Path(base) / "profiles"


@dataclass
class ModelPlan:
    """A measured plan for one model + method on one device: what to pass to the engine."""

    method: str  # the method to run (on a CPU: the fastest one measured)
    device: str  # "cuda" or "cpu"
    layers_on_gpu: int
    layers_total: int
    max_context: int
    stream_buffers: int  # device buffers the streamed layers rotate through (offload_slots); 0: none stream
    config_fingerprint: str  # a changed model at the same path invalidates the plan
    measured_at: datetime
    vram_limit_gb: float | None = None  # the cap asked for; part of what the plan is valid for
    vram_budget_bytes: int | None = None  # bytes planned for: the cap or the free VRAM
    substitute_bits: int | None = None
    substitute_group: int | None = None
    tree_policy: str | None = None
    max_depth: int | None = None
    topk_len: int | None = None
    node_budget: int | None = None
    draft_batch: int | None = None  # best_first nodes per draft forward; None = topk_len
    min_draft_prob: float | None = None  # best_first's floor (0 = none); None: plans measured before it
    # Streamed layers cross PCIe Huffman-coded (engine.compress): measured faster than bf16 here.
    compressed_streaming: bool = False
    estimated_peak_bytes: int | None = None
    measured_peak_bytes: int | None = None
    verify_ms_by_nodes: dict[int, float] = field(default_factory=dict)  # forward cost by tokens
    # What was tried: methods and trees (CPU), tree budgets and draft widths (GPU).
    tok_per_s_by_candidate: dict[str, float] = field(default_factory=dict)
    machine_load: float | None = None  # other programs' CPU use per core while measuring: a busy machine's timings are suspect

    def engine_overrides(self) -> dict[str, Any]:
        """EngineConfig fields this plan decides (a front end applies them over its defaults)."""
        overrides: dict[str, Any] = {"method": self.method, "max_length": self.max_context}
        if self.device == "cuda":
            overrides |= {"keep_first_n_layers_on_gpu": self.layers_on_gpu, "vram_limit_gb": self.vram_limit_gb}
        if self.stream_buffers:
            # The measured peak includes exactly this many buffers: 3 where they fit (measured on an
            # H200, 2 slots stream at 0.82 of the PCIe bound, 3 at 1.00), fewer only to fit at all.
            # With every layer resident nothing streams and the engine's own default is moot.
            overrides["offload_slots"] = self.stream_buffers
            overrides["compressed_streaming"] = self.compressed_streaming
        for name, key in (
            ("substitute_bits", "substitute_bits"),
            ("substitute_group", "substitute_group_size"),
            ("tree_policy", "tree_policy"),
            ("max_depth", "max_depth"),
            ("topk_len", "topk_len"),
            ("node_budget", "node_budget"),
            ("draft_batch", "draft_batch"),
            ("min_draft_prob", "min_draft_prob"),
        ):
            if getattr(self, name) is not None:
                overrides[key] = getattr(self, name)
        return overrides

    def to_toml(self) -> dict[str, Any]:
        data = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        data["verify_ms_by_nodes"] = {str(n): ms for n, ms in self.verify_ms_by_nodes.items()}
        return data

    @classmethod
    def from_toml(cls, data: dict[str, Any]) -> ModelPlan:
        """Raises KeyError/TypeError/ValueError on a malformed table (the caller moves the file aside)."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["verify_ms_by_nodes"] = {int(n): float(ms) for n, ms in data.get("verify_ms_by_nodes", {}).items()}
        values["tok_per_s_by_candidate"] = {
            str(k): float(v) for k, v in data.get("tok_per_s_by_candidate", {}).items()
        }
        plan = cls(**values)
        for name in ("layers_on_gpu", "layers_total", "max_context", "stream_buffers"):
            if not isinstance(getattr(plan, name), int):
                raise TypeError(f"{name} is not an integer")
        if not isinstance(plan.compressed_streaming, bool):
            raise TypeError("compressed_streaming is not true or false")
        if plan.machine_load is not None and not isinstance(plan.machine_load, (int, float)):
            raise TypeError("machine_load is not a number")
        if not isinstance(plan.measured_at, datetime) or plan.device not in ("cuda", "cpu"):
            raise TypeError("measured_at or device has the wrong type")
        streams = plan.device == "cuda" and plan.layers_on_gpu < plan.layers_total
        if streams != (plan.stream_buffers > 0) or plan.stream_buffers < 0:
            raise ValueError(
                f"stream_buffers = {plan.stream_buffers} does not match a {plan.device} plan with "
                f"{plan.layers_on_gpu} of {plan.layers_total} layers on the GPU"
            )
        return plan

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["measured_at"] = self.measured_at.isoformat()
        return data


@dataclass
class ProfileFile:
    """One file's content: the device and its plans, model -> method -> plan."""

    device: DeviceInfo
    plans: dict[str, dict[str, ModelPlan]] = field(default_factory=dict)

    def to_toml(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
        if self.device.gpu is not None:
            doc["gpu"] = {k: v for k, v in dataclasses.asdict(self.device.gpu).items() if v is not None}
        doc["cpu"] = {k: v for k, v in dataclasses.asdict(self.device.cpu).items() if v is not None}
        doc["models"] = {
            model: {method: plan.to_toml() for method, plan in methods.items()}
            for model, methods in self.plans.items()
        }
        return doc

    @classmethod
    def from_toml(cls, doc: dict[str, Any]) -> ProfileFile:
        gpu = doc.get("gpu")
        device = DeviceInfo(cpu=CpuInfo(**doc["cpu"]), gpu=GpuInfo(**gpu) if gpu is not None else None)
        plans = {
            str(model): {str(method): ModelPlan.from_toml(plan) for method, plan in methods.items()}
            for model, methods in doc.get("models", {}).items()
        }
        return cls(device=device, plans=plans)


class ProfileStore:
    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory or profiles_dir()

    def path(self, device_key: str) -> Path:
        return self.directory / f"{device_key}.toml"

    def read(self, device_key: str) -> tuple[ProfileFile | None, list[str]]:
        """The file for `device_key` (None when absent or unusable) and messages for the user
        (a corrupt or outdated file moved aside)."""
        path = self.path(device_key)
        with self._lock(path):
            return self._read_unlocked(path, device_key)

    def save_plan(self, device: DeviceInfo, model: str, method_key: str, plan: ModelPlan) -> tuple[Path, list[str]]:
        """Add or replace one plan, keeping the file's other models. Raises ProfileError (one
        line) when the folder is not writable."""
        path = self.path(device.key)
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with self._lock(path):
                current, messages = self._read_unlocked(path, device.key)
                plans = current.plans if current else {}
                plans.setdefault(model, {})[method_key] = plan
                # The device facts are rewritten each time: a new driver or bandwidth replaces the old.
                _atomic_write(path, tomli_w.dumps(ProfileFile(device, plans).to_toml()).encode())
        except OSError as err:
            raise ProfileError(f"cannot save the profile to {path}: {err.strerror or err}") from None
        return path, messages

    def _read_unlocked(self, path: Path, device_key: str) -> tuple[ProfileFile | None, list[str]]:
        try:
            text = path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            return None, []
        except (OSError, UnicodeDecodeError) as err:
            return None, [self._move_aside(path, f"unreadable ({err})")]
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            return None, [self._move_aside(path, f"not valid TOML ({err})")]
        version = doc.get("schema_version")
        if version != SCHEMA_VERSION:
            return None, [self._move_aside(path, f"schema version {version!r}, this version reads {SCHEMA_VERSION}")]
        try:
            loaded = ProfileFile.from_toml(doc)
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            return None, [self._move_aside(path, f"malformed ({type(err).__name__}: {err})")]
        if loaded.device.key != device_key:
            return None, [self._move_aside(path, f"describes another device ({loaded.device.key})")]
        return loaded, []

    def _move_aside(self, path: Path, why: str) -> str:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        backup = path.with_name(f"{path.name}.bad-{stamp}")
        try:
            os.replace(path, backup)
        except OSError as err:
            message = f"profile {path} is {why} and could not be moved aside ({err.strerror or err}): ignoring it"
        else:
            message = f"profile {path} was {why}: moved to {backup.name}, measuring again"
        log.warning(message)
        return message

    @contextmanager
    def _lock(self, path: Path) -> Iterator[None]:
        """Serialise read-modify-write across processes. A folder where no lock file can be created
        (read-only) cannot be written either, so reading it unlocked is safe."""
        lock = FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S)
        try:
            lock.acquire()
            locked = True
        except Timeout:
            raise ProfileError(f"the profile {path} is locked by another process (waited {LOCK_TIMEOUT_S:.0f} s)") from None
        except OSError:
            locked = False
        try:
            yield
        finally:
            if locked:
                lock.release()


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    # The rename itself is durable only once the directory entry is flushed (POSIX).
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
