"""The TOML profile store: round trip, bad files moved aside, concurrent writers, read-only folder."""

from __future__ import annotations

import dataclasses

import multiprocessing
import os
import tomllib
from datetime import datetime, timezone
from pathlib import Path

import pytest
import tomli_w

from engine import EngineConfig
from profiles.hardware import CpuInfo, DeviceInfo, GpuInfo
from profiles.store import SCHEMA_VERSION, ModelPlan, ProfileError, ProfileFile, ProfileStore, profiles_dir

GPU_DEVICE = DeviceInfo(
    cpu=CpuInfo(name="Test CPU", cores=16, ram_bytes=128 * 2**30),
    gpu=GpuInfo(
        index=0, name="NVIDIA H200", uuid="0b1c2d3e-aaaa-bbbb-cccc-123456789abc",
        total_vram_bytes=150_000_000_000, compute_capability="9.0", driver="570.86", h2d_gbps=55.2,
    ),
)
CPU_DEVICE = DeviceInfo(cpu=CpuInfo(name="Test CPU", cores=2, ram_bytes=None), gpu=None)


def gpu_plan(layers: int = 1, stream_buffers: int = 3) -> ModelPlan:
    return ModelPlan(
        method="subspec_sd", device="cuda", layers_on_gpu=layers, layers_total=28, max_context=2048,
        stream_buffers=stream_buffers,
        config_fingerprint="abc123", measured_at=datetime(2025, 5, 1, 12, 0, tzinfo=timezone.utc),
        vram_limit_gb=8.0, vram_budget_bytes=8 * 2**30, substitute_bits=4, substitute_group=64,
        tree_policy="best_first", max_depth=32, topk_len=6, node_budget=192, draft_batch=16,
        estimated_peak_bytes=7_500_000_000, measured_peak_bytes=7_100_000_000,
        verify_ms_by_nodes={1: 212.5, 193: 214.0, 385: 260.0},
    )


def test_profiles_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBSPEC_CONFIG_DIR", str(tmp_path))
    assert profiles_dir() == tmp_path / "profiles"
    assert ProfileStore().directory == tmp_path / "profiles"


def test_round_trip_keeps_every_field_and_other_models(tmp_path):
    store = ProfileStore(tmp_path)
    path, messages = store.save_plan(GPU_DEVICE, "Qwen/Qwen2.5-7B-Instruct", "subspec_sd", gpu_plan())
    store.save_plan(GPU_DEVICE, "/models/llama 3.1 [8B]", "vanilla", gpu_plan(layers=9))
    assert messages == []
    assert path == tmp_path / f"gpu-{GPU_DEVICE.gpu.uuid}.toml"

    loaded, messages = store.read(GPU_DEVICE.key)
    assert messages == []
    assert loaded.device == GPU_DEVICE
    assert loaded.plans["Qwen/Qwen2.5-7B-Instruct"]["subspec_sd"] == gpu_plan()
    assert loaded.plans["/models/llama 3.1 [8B]"]["vanilla"].layers_on_gpu == 9
    # Human-readable: the sections of the documented schema, no null placeholders.
    doc = tomllib.loads(path.read_text())
    assert doc["schema_version"] == SCHEMA_VERSION
    assert doc["gpu"]["h2d_gbps"] == 55.2
    assert doc["models"]["Qwen/Qwen2.5-7B-Instruct"]["subspec_sd"]["verify_ms_by_nodes"]["193"] == 214.0
    assert doc["models"]["Qwen/Qwen2.5-7B-Instruct"]["subspec_sd"]["stream_buffers"] == 3


def test_the_streaming_form_round_trips_and_older_plans_stream_bf16(tmp_path):
    store = ProfileStore(tmp_path)
    compressed = dataclasses.replace(gpu_plan(), compressed_streaming=True)
    path, _ = store.save_plan(GPU_DEVICE, "m", "subspec_sd", compressed)
    assert tomllib.loads(path.read_text())["models"]["m"]["subspec_sd"]["compressed_streaming"] is True
    assert store.read(GPU_DEVICE.key)[0].plans["m"]["subspec_sd"] == compressed
    assert compressed.engine_overrides()["compressed_streaming"] is True
    # A plan stored before the field existed was measured streaming bf16.
    path.write_text(path.read_text().replace("compressed_streaming = true\n", ""))
    assert store.read(GPU_DEVICE.key)[0].plans["m"]["subspec_sd"].compressed_streaming is False
    path.write_text(path.read_text().replace('method = "subspec_sd"', 'method = "subspec_sd"\ncompressed_streaming = "yes"'))
    profile, messages = store.read(GPU_DEVICE.key)
    assert "m" not in (profile.plans if profile else {}) and messages and _backups(tmp_path)


def test_cpu_profile_omits_what_does_not_apply(tmp_path):
    store = ProfileStore(tmp_path)
    plan = ModelPlan(method="vanilla", device="cpu", layers_on_gpu=0, layers_total=30, max_context=2048,
                     stream_buffers=0, config_fingerprint="f", measured_at=datetime(2025, 5, 1, tzinfo=timezone.utc),
                     tok_per_s_by_candidate={"vanilla": 31.5, "subspec_sd depth 6 top-2": 20.0})
    path, _ = store.save_plan(CPU_DEVICE, "bundled:SmolLM2-135M-Instruct", "subspec_sd", plan)
    assert path.name == "cpu.toml"
    doc = tomllib.loads(path.read_text())
    assert "gpu" not in doc and "ram_bytes" not in doc["cpu"]
    assert "vram_limit_gb" not in doc["models"]["bundled:SmolLM2-135M-Instruct"]["subspec_sd"]
    loaded, _ = store.read("cpu")
    assert loaded.plans["bundled:SmolLM2-135M-Instruct"]["subspec_sd"] == plan
    assert plan.engine_overrides() == {"method": "vanilla", "max_length": 2048}


def test_engine_overrides_name_engine_config_fields():
    overrides = gpu_plan().engine_overrides()
    EngineConfig(**overrides)  # every key is a real EngineConfig field
    assert overrides["keep_first_n_layers_on_gpu"] == 1
    assert overrides["substitute_group_size"] == 64
    assert (overrides["tree_policy"], overrides["node_budget"], overrides["draft_batch"]) == ("best_first", 192, 16)


@pytest.mark.parametrize("buffers", [3, 2, 1])
def test_engine_overrides_carry_the_planned_stream_buffers(buffers):
    overrides = gpu_plan(layers=0, stream_buffers=buffers).engine_overrides()
    assert overrides["offload_slots"] == buffers
    assert EngineConfig(**overrides).offload_slots == buffers


def test_engine_overrides_leave_the_slots_alone_when_nothing_streams():
    # Every layer resident: no buffer is budgeted, and 0 is not a valid offload_slots.
    overrides = gpu_plan(layers=28, stream_buffers=0).engine_overrides()
    assert "offload_slots" not in overrides
    assert overrides["keep_first_n_layers_on_gpu"] == 28


def _backups(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.toml.bad-*"))


@pytest.mark.parametrize(
    "content, why",
    [
        (b"schema_version = 2\n[gpu\nname = ", "not valid TOML"),
        (b"\xff\xfe\x00garbage", "unreadable"),
        (b'schema_version = 2\n[cpu]\nname = "x"\n', "malformed"),  # cores missing
    ],
    ids=["syntax", "binary", "missing-field"],
)
def test_corrupt_file_is_moved_aside_and_regenerated(tmp_path, content, why):
    store = ProfileStore(tmp_path)
    path = store.path("cpu")
    path.write_bytes(content)
    loaded, messages = store.read("cpu")
    assert loaded is None
    assert len(messages) == 1 and why in messages[0] and "moved to cpu.toml.bad-" in messages[0]
    [backup] = _backups(tmp_path)
    assert backup.read_bytes() == content  # nothing is lost
    assert not path.exists()
    store.save_plan(GPU_DEVICE, "m", "subspec_sd", gpu_plan())  # regenerating works


def test_half_written_file_is_moved_aside(tmp_path):
    store = ProfileStore(tmp_path)
    path, _ = store.save_plan(GPU_DEVICE, "m", "subspec_sd", gpu_plan())
    full = path.read_bytes()
    path.write_bytes(full[: len(full) // 2])  # as if a non-atomic writer had been killed
    loaded, messages = store.read(GPU_DEVICE.key)
    assert loaded is None and "moved to" in messages[0]
    assert _backups(tmp_path)[0].read_bytes() == full[: len(full) // 2]


def version_1_file() -> bytes:
    """What the previous version wrote: no stream_buffers, so no way to know the slots it measured."""
    doc = ProfileFile(GPU_DEVICE, {"m": {"subspec_sd": gpu_plan()}}).to_toml()
    del doc["models"]["m"]["subspec_sd"]["stream_buffers"]
    return tomli_w.dumps({**doc, "schema_version": 1}).encode()


def test_older_schema_is_moved_aside_then_upgraded(tmp_path):
    store = ProfileStore(tmp_path)
    path = store.path(GPU_DEVICE.key)
    old = version_1_file()
    path.write_bytes(old)
    loaded, messages = store.read(GPU_DEVICE.key)
    assert loaded is None
    assert "schema version 1, this version reads 2" in messages[0]
    _, save_messages = store.save_plan(GPU_DEVICE, "m", "subspec_sd", gpu_plan())
    assert save_messages == []  # the old file was already moved aside by the read
    assert tomllib.loads(path.read_text())["schema_version"] == SCHEMA_VERSION
    assert _backups(tmp_path)[0].read_bytes() == old


@pytest.mark.parametrize(
    "layers, buffers",
    [(1, 0), (28, 2), (1, -1)],
    ids=["streams-without-buffers", "buffers-without-streaming", "negative"],
)
def test_hand_edited_stream_buffers_that_cannot_run_are_moved_aside(tmp_path, layers, buffers):
    store = ProfileStore(tmp_path)
    path = store.path(GPU_DEVICE.key)
    doc = ProfileFile(GPU_DEVICE, {"m": {"subspec_sd": gpu_plan(layers, buffers)}}).to_toml()
    path.write_text(tomli_w.dumps(doc))
    loaded, messages = store.read(GPU_DEVICE.key)
    assert loaded is None
    assert f"stream_buffers = {buffers} does not match a cuda plan with {layers} of 28 layers" in messages[0]
    assert "moved to" in messages[0]


def test_file_of_another_device_is_not_trusted(tmp_path):
    store = ProfileStore(tmp_path)
    path, _ = store.save_plan(GPU_DEVICE, "m", "subspec_sd", gpu_plan())
    os.replace(path, store.path("gpu-someone-else"))
    loaded, messages = store.read("gpu-someone-else")
    assert loaded is None and "another device" in messages[0]


def _writer(directory: str, worker: int, rounds: int) -> None:
    store = ProfileStore(Path(directory))
    for round_ in range(rounds):
        store.save_plan(GPU_DEVICE, f"model-{worker}", "subspec_sd", gpu_plan(layers=round_))


def _reader(directory: str, stop, failures) -> None:
    path = ProfileStore(Path(directory)).path(GPU_DEVICE.key)
    while not stop.is_set():
        try:
            tomllib.loads(path.read_text())
        except FileNotFoundError:
            continue
        except (tomllib.TOMLDecodeError, UnicodeDecodeError):
            failures.value += 1


def test_concurrent_writers_never_leave_a_broken_file_nor_lose_a_model(tmp_path):
    context = multiprocessing.get_context("fork")
    stop, failures = context.Event(), context.Value("i", 0)
    reader = context.Process(target=_reader, args=(str(tmp_path), stop, failures))
    reader.start()
    writers = [context.Process(target=_writer, args=(str(tmp_path), worker, 8)) for worker in range(4)]
    for process in writers:
        process.start()
    for process in writers:
        process.join(timeout=120)
    stop.set()
    reader.join(timeout=30)
    assert all(process.exitcode == 0 for process in writers)
    assert failures.value == 0  # the reader never saw half a file
    loaded, messages = ProfileStore(tmp_path).read(GPU_DEVICE.key)
    assert messages == []
    assert {model: methods["subspec_sd"].layers_on_gpu for model, methods in loaded.plans.items()} == {
        f"model-{worker}": 7 for worker in range(4)  # every writer's last round, none lost
    }
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def test_read_only_folder_gives_one_clear_error(tmp_path, monkeypatch):
    store = ProfileStore(tmp_path / "profiles")
    store.directory.mkdir()
    store.directory.chmod(0o555)
    if os.geteuid() == 0:
        # root writes through mode bits: make the write fail the way a read-only folder does.
        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr("profiles.store.tempfile.mkstemp", refuse)
    try:
        with pytest.raises(ProfileError, match=r"^cannot save the profile to .*gpu-.*\.toml: Permission denied$"):
            store.save_plan(GPU_DEVICE, "m", "subspec_sd", gpu_plan())
        assert store.read(GPU_DEVICE.key) == (None, [])  # reading still works
    finally:
        store.directory.chmod(0o755)
