"""A model source (what `--llm-path` names) -> its profile key, a cheap fingerprint, its config."""

from __future__ import annotations

import hashlib
from pathlib import Path

from engine.loading import BUNDLED_NAME, bundled_gguf_path, read_config
from profiles.store import ProfileError


def model_key(source: str | None) -> str:
    """How a model is named in a profile file: stable across working directories."""
    if source is None:
        return f"bundled:{BUNDLED_NAME}"
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def config_fingerprint(source: str | None) -> str:
    """Changes when the model at `source` changes; cheap enough to check on every start."""
    file = _identity_file(source)
    if file is None:
        return "unknown"
    if file.suffix == ".gguf":  # large: its size and mtime identify it, as the engine's cache does
        stat = file.stat()
        data = f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    else:
        data = file.read_bytes()
    return hashlib.sha256(data).hexdigest()[:16]


def model_config(source: str | None, download: bool = False) -> dict:
    """The model's config.json content, without loading weights (GGUF: parsed by transformers).
    A hub model not on this machine is an error, or with `download` its config.json alone is fetched."""
    file = _identity_file(source)
    if file is None and download:
        file = _download_config(source)
    if file is None:
        raise ProfileError(f"{source} is not in the local Hugging Face cache: download it first")
    if file.suffix != ".gguf":
        return read_config(file.parent)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(file.parent, gguf_file=file.name).to_dict()
    except Exception as err:  # the GGUF parser raises a zoo of types on a bad file
        raise ProfileError(f"cannot read the config of {file}: {str(err).splitlines()[0] if str(err) else err!r}") from None


def _download_config(repo_id: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, "config.json"))
    except LocalEntryNotFoundError:
        raise ProfileError(f"{repo_id} is not on this machine and the hub is unreachable (offline?)") from None
    except HfHubHTTPError as err:
        raise ProfileError(f"cannot fetch the config of {repo_id}: {str(err).splitlines()[0]}") from None


def _identity_file(source: str | None) -> Path | None:
    """The file that identifies a model: its GGUF, or its config.json (None: hub id not cached)."""
    if source is None:
        return bundled_gguf_path()
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ProfileError(f"model file not found: {path}")
        return path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ProfileError(f"not a model folder (no config.json): {path}")
        return path / "config.json"
    if path.is_file():
        raise ProfileError(f"{source} is a file but not a model: give a model folder (with config.json), a .gguf file or a hub id")
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(source, "config.json")
    except ValueError:  # not a valid repo id
        raise ProfileError(f"model path not found: {source}") from None
    return Path(cached) if isinstance(cached, str) else None

