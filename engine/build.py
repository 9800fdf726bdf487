"""Assemble an Engine from a config: device, target (resident + streamed layers), drafter."""

from __future__ import annotations

import dataclasses
import functools
import gc
from typing import Callable

import torch

from engine.config import COMPILE_MODES, METHODS, EngineConfig, method_unavailable, row_invariant_by_default
from engine.drafters import Drafter, EagleDrafter, TreeDrafter, VanillaDrafter
from engine.eagle import load_eagle_head
from engine.engine import Engine
from engine.errors import EngineError
from engine.generate import Target
from engine.graphs import DraftGraphs
from engine.loading import LoadedModel, encoded_cache_file, load_model, substitute_cache_file
from engine.model import Transformer
from engine.offload import LayerStack, linear_tensors, measure_h2d_gbps
from engine.pointwise import CPU_ROWS, EAGER, GPU_ROWS, Pointwise, compiled_pointwise, row_invariant
from engine.substitute import build_substitute

Progress = Callable[[str], None]


def build_engine(config: EngineConfig, progress: Progress | None = None) -> Engine:
    say = progress or (lambda _msg: None)
    _check_config(config)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    if config.method == "classic_sd":
        _check_draft_vocabulary(config)
    return engine_from_model(config, load_model(config.llm_path, dtype, say), say)


def engine_from_model(config: EngineConfig, loaded: LoadedModel, progress: Progress | None = None) -> Engine:
    """An Engine around a model already in host memory (benchmarks build random-weight ones)."""
    say = progress or (lambda _msg: None)
    _check_config(config)
    device = resolve_device(config.device)
    dtype = loaded.model.dtype
    if device.type == "cuda" and config.vram_limit_gb:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, config.vram_limit_gb * 2**30 / total), device)
    try:
        return _assemble(config, loaded, device, dtype, say)
    except torch.cuda.OutOfMemoryError:
        raise EngineError(
            f"{loaded.name} does not fit the GPU memory with this plan: keep fewer layers on the "
            "GPU (--keep-first-n-layers-on-gpu) or lower --max-length"
        ) from None


def _assemble(config: EngineConfig, loaded: LoadedModel, device: torch.device, dtype: torch.dtype, say: Progress) -> Engine:
    hf = loaded.model
    max_length = min(config.max_length, getattr(hf.config, "max_position_embeddings", config.max_length))
    layers = [linear_tensors(layer) for layer in hf.model.layers]
    keep_on_gpu = _keep_on_gpu(config, device, len(layers))
    transformer = Transformer(hf, device, max_length)
    substitute = None
    if config.method == "subspec_sd":
        say(f"quantizing the substitute ({config.substitute_bits}-bit, group {config.substitute_group_size})")
        cache_file = substitute_cache_file(loaded.folder, config, dtype) if loaded.folder else None
        substitute = build_substitute(
            layers, device, dtype, config.substitute_bits, config.substitute_group_size, cache_file,
            config.substitute_kernel,
        )
    say(f"placing {keep_on_gpu} of {len(layers)} layers on {device.type}")
    if config.compressed_streaming and dtype != torch.bfloat16:
        raise EngineError(f"--compressed-streaming codes bfloat16 weights, and this model runs in {dtype} "
                          "(--dtype bfloat16)")
    if config.compressed_streaming and keep_on_gpu < len(layers):
        say(f"compressing the {len(layers) - keep_on_gpu} streamed layers (once: kept in the cache)")
    stack = LayerStack(
        layers, device, keep_on_gpu, config.offload_slots, stream=True if config.emulate_offload else None,
        nvtx=config.nvtx_profiling, compressed=config.compressed_streaming,
        encoded_cache=encoded_cache_file(loaded.folder) if loaded.folder and config.compressed_streaming else None,
    )
    del layers, hf
    gc.collect()
    cache = transformer.new_cache(max_length)
    row_invariant = config.row_invariant if config.row_invariant is not None else row_invariant_by_default(dtype.itemsize)
    target = Target(transformer, stack, cache, stack.take_transfer_ms,
                    target_pointwise(device, transformer.head_dim) if row_invariant else EAGER)
    drafter: Drafter = VanillaDrafter()
    details = {
        "method": config.method,
        "model": loaded.name,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "row_invariant": row_invariant,
        "layers_total": stack.num_layers,
        "layers_on_gpu": stack.keep_on_gpu,
        "stream_buffers": stack.num_slots,  # 0 when every layer is resident
        "offloaded_bytes": stack.offloaded_bytes,
        "offloaded_weight_bytes": stack.weight_bytes,
        "max_length": max_length,
    }
    if substitute is not None:
        drafter = TreeDrafter(transformer, substitute, cache, owns_cache=False, config=config)
        details |= {"substitute_bits": config.substitute_bits, "substitute_bytes": substitute.nbytes,
                    "substitute_kernel": substitute.kernel}
    elif config.method == "classic_sd":
        drafter = _classic_drafter(config, device, dtype, max_length, say)
        details["draft_model"] = config.draft_model_path
    elif config.method == "eagle_sd":
        say(f"loading the EAGLE head {config.draft_model_path}")
        drafter = EagleDrafter(load_eagle_head(config.draft_model_path, transformer), config, max_length)
        details["draft_model"] = config.draft_model_path
    if isinstance(drafter, TreeDrafter):
        drafter.graphs = _draft_graphs(config, drafter, max_length, device)
        if config.compile_mode == "auto" and device.type == "cuda":
            drafter.pointwise = draft_pointwise(dtype, transformer.head_dim)
        details["draft_pointwise"] = "compiled" if drafter.pointwise is not EAGER else "eager"
        details["draft_graphs"] = "off" if drafter.graphs is None else (
            "cuda-graphs" if drafter.graphs.capture else "fixed-shape, eager")
    gbps = measure_h2d_gbps(device) if stack.offloaded_bytes and device.type == "cuda" else None
    stream_bound_ms = stack.offloaded_bytes / (gbps * 1e9) * 1e3 if gbps else None
    details |= {"h2d_gbps": gbps, "stream_bound_ms": stream_bound_ms}
    return Engine(config, loaded.name, loaded.tokenizer, target, drafter, _eos_ids(loaded), stream_bound_ms, details)


def _classic_drafter(config: EngineConfig, device: torch.device, dtype: torch.dtype, max_length: int, say: Progress) -> TreeDrafter:
    say(f"loading the draft model {config.draft_model_path}")
    draft = load_model(config.draft_model_path, dtype, say)
    layers = [linear_tensors(layer) for layer in draft.model.model.layers]
    transformer = Transformer(draft.model, device, max_length)
    stack = LayerStack(layers, device, keep_on_gpu=len(layers))
    return TreeDrafter(transformer, stack, transformer.new_cache(max_length), owns_cache=True, config=config)


def target_pointwise(device: torch.device, head_dim: int) -> Pointwise:
    """The row-invariant target's functions. A GPU runs 128-row chunks (one row costs what it did
    alone, a 289-node tree's matmuls twice what they did whole, hidden under the layer stream) and
    the Triton attention kernel; the CPU, whose matmuls cost by the row, 32-row chunks and an
    attention that walks the rows one by one, waiting on the device for each."""
    if device.type != "cuda":
        return row_invariant(CPU_ROWS)
    from engine import row_attention_kernel  # Triton: imported only where a GPU runs it

    if row_attention_kernel.supported(head_dim):
        return row_invariant(GPU_ROWS, row_attention_kernel.row_invariant_attention)
    return row_invariant(GPU_ROWS)


def draft_pointwise(dtype: torch.dtype, head_dim: int, backend: str = "inductor") -> Pointwise:
    """A GPU draft step's functions between matmuls: compiled element-wise math that adds the
    projections' partial sums, and the Triton kernels for the rotary embedding (with the cache
    write) and attention where the head size suits them."""
    from engine import attention_kernel, rotary_kernel  # Triton: a CPU-only install has none

    kernels = {}
    if rotary_kernel.supported(head_dim):
        kernels["store_attention_inputs"] = rotary_kernel.store_attention_inputs
    if attention_kernel.supported(head_dim):
        kernels["attend"] = attention_kernel.draft_attention
    return dataclasses.replace(compiled_pointwise(backend, dtype), **kernels)


def _draft_graphs(config: EngineConfig, drafter: TreeDrafter, max_length: int, device: torch.device) -> DraftGraphs | None:
    if config.compile_mode is None or (config.compile_mode == "auto" and device.type != "cuda"):
        return None
    fixed_shape_step = functools.partial(drafter.log_probs, fixed_shape=True)
    return DraftGraphs(fixed_shape_step, max_length, device, capture=device.type == "cuda")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise EngineError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EngineError("--device cuda was asked for but this torch build sees no CUDA GPU")
    if device.type not in ("cpu", "cuda"):
        raise EngineError(f"unsupported device {name!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # memory caps need an index
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise EngineError(f"unknown dtype {name!r}: use auto, {', '.join(dtypes)}")
    return dtypes[name]


def _keep_on_gpu(config: EngineConfig, device: torch.device, num_layers: int) -> int:
    """Resident layers: the config's N on a GPU (or the fake device), all of them otherwise."""
    n = config.keep_first_n_layers_on_gpu
    if n is None or (device.type == "cpu" and not config.emulate_offload):
        return num_layers
    if not 0 <= n <= num_layers:
        raise EngineError(f"--keep-first-n-layers-on-gpu must be between 0 and {num_layers}, got {n}")
    return n


def _check_config(config: EngineConfig) -> None:
    if config.method not in METHODS:
        raise EngineError(f"unknown method {config.method!r}: use one of {', '.join(METHODS)}")
    if (problem := method_unavailable(config.method, config.draft_model_path)) is not None:
        raise EngineError(problem)
    if config.compile_mode not in COMPILE_MODES:
        raise EngineError(f"unknown compile mode {config.compile_mode!r}: use auto, cuda-graphs or none")
    if config.max_length < 2:
        raise EngineError(f"--max-length must be at least 2, got {config.max_length}")
    if config.offload_slots < 1:
        raise EngineError(f"offload_slots must be at least 1, got {config.offload_slots}")
    if config.max_depth < 0 or config.topk_len < 1:
        raise EngineError("--max-depth must be >= 0 and --topk-len >= 1")
    if config.draft_batch is not None and config.draft_batch < 1:
        raise EngineError(f"--draft-batch must be at least 1, got {config.draft_batch}")
    if config.min_draft_prob is not None and not 0 <= config.min_draft_prob < 1:
        raise EngineError(f"--min-draft-prob must be in [0, 1), got {config.min_draft_prob}")
    if config.draft_temperature <= 0:
        raise EngineError("the draft temperature must be > 0")


def _check_draft_vocabulary(config: EngineConfig) -> None:
    """A draft must speak the target's vocabulary: compare tokenizers before loading any weight."""
    from engine.loading import load_tokenizer

    target = load_tokenizer(config.llm_path)
    draft = load_tokenizer(config.draft_model_path)
    if target.get_vocab() != draft.get_vocab():
        raise EngineError(
            f"the draft model's vocabulary differs from the target's ({len(draft.get_vocab())} vs "
            f"{len(target.get_vocab())} tokens): classic_sd needs a draft of the same tokenizer"
        )


def _eos_ids(loaded: LoadedModel) -> set[int]:
    ids: set[int] = set()
    for source in (loaded.model.generation_config, loaded.model.config, loaded.tokenizer):
        value = getattr(source, "eos_token_id", None)
        ids |= set(value) if isinstance(value, (list, tuple)) else ({value} if value is not None else set())
    return ids
