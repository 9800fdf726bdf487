"""Run settings for the headless front ends: method preset < YAML (`--config`) < command line.

Every layer is a flat mapping of keys named after the fields of `engine.EngineConfig`,
`engine.SamplingConfig` and `RunOptions`. Each value is checked against the field's type, so a
typo or a wrong type is a one-line `ConfigError` naming the key and where it came from.
A YAML file may start from another with `extends: other.yaml` (relative to the file).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from engine import EngineConfig, SamplingConfig

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"
METHOD_PRESETS_DIR = CONFIGS_DIR / "methods"
DEFAULT_METHOD = "subspec_sd"
EXTENDS_KEY = "extends"


class ConfigError(Exception):
    """A bad configuration value or file: the message is one line naming the key and its source."""


@dataclass
class RunOptions:
    """What a headless run needs besides the engine and sampling settings."""

    warmup_iter: int = 0
    detailed_analysis: bool = False
    nsys_output: str | None = None


@dataclass
class Settings:
    engine: EngineConfig = field(default_factory=EngineConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    run: RunOptions = field(default_factory=RunOptions)
    # Keys the user set (YAML file or command line): a measured plan never overrides them.
    explicit: frozenset[str] = frozenset()

    def as_dict(self) -> dict[str, Any]:
        return {
            "engine": dataclasses.asdict(self.engine),
            "sampling": dataclasses.asdict(self.sampling),
            "run": dataclasses.asdict(self.run),
        }


_SECTIONS: dict[str, type] = {"engine": EngineConfig, "sampling": SamplingConfig, "run": RunOptions}


def _schema() -> dict[str, tuple[str, Any]]:
    """key -> (section, resolved type hint) for every settable key."""
    schema: dict[str, tuple[str, Any]] = {}
    for section, cls in _SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            schema[f.name] = (section, hints[f.name])
    return schema


SCHEMA = _schema()


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        parts = [a for a in typing.get_args(hint) if a is not type(None)]
        return " or ".join(_type_name(a) for a in parts) + " or null"
    if origin is list:
        item = typing.get_args(hint)[0]
        return "a list of " + {str: "strings", int: "integers", float: "numbers"}.get(item, str(item))
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _matches(value: Any, hint: Any) -> tuple[bool, Any]:
    """(does `value` fit `hint`, the value converted for it: ints widen to float)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        if value is None:
            return type(None) in typing.get_args(hint), None
        for arg in typing.get_args(hint):
            ok, converted = _matches(value, arg)
            if ok:
                return True, converted
        return False, value
    if origin is Literal:
        return value in typing.get_args(hint), value
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            return False, value
        converted = [_matches(v, item) for v in value]
        return all(ok for ok, _ in converted), [v for _, v in converted]
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    return False, value


# Lowest allowed value (inclusive) of numeric keys; anything lower is a clear error, not a crash later.
MINIMUMS: dict[str, float] = {
    "max_length": 1,
    "prefill_chunk": 1,
    "max_depth": 1,
    "topk_len": 1,
    "node_budget": 1,
    "draft_batch": 1,
    "min_draft_prob": 0.0,
    "max_new_tokens": 1,
    "max_samples": 1,  # run-benchmark
    "substitute_bits": 1,
    "substitute_group_size": 1,
    "keep_first_n_layers_on_gpu": 0,
    "window_size": 0,
    "warmup_iter": 0,
    "top_k": 0,
    "temperature": 0.0,
    "draft_temperature": 0.0,
    "threshold": 0.0,
    "top_p": 0.0,
    "vram_limit_gb": 0.0,
}
_STRICTLY_ABOVE_MINIMUM = {"vram_limit_gb", "top_p"}


def check_range(key: str, value: Any) -> str | None:
    """Why `value` is out of range for `key`, or None when it is fine."""
    low = MINIMUMS.get(key)
    if low is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    if key in _STRICTLY_ABOVE_MINIMUM and value <= low:
        return f"must be greater than {low:g}"
    if value < low:
        return f"must be at least {low:g}"
    if key == "top_p" and value > 1:
        return "must be at most 1"
    if key == "min_draft_prob" and value >= 1:
        return "must be below 1"
    return None


def _normalize(key: str, value: Any) -> Any:
    # The reference's configs spell "no compilation" as the string none.
    if key == "compile_mode" and isinstance(value, str) and value.strip().lower() in {"none", "null", ""}:
        return None
    return value


def validate(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Check every key and value of one layer; `source` names the layer in error messages."""
    checked: dict[str, Any] = {}
    for key, value in values.items():
        if key not in SCHEMA:
            close = difflib.get_close_matches(str(key), SCHEMA, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(sorted(SCHEMA))}"
            raise ConfigError(f"{source}: unknown key '{key}' ({hint})")
        value = _normalize(key, value)
        hint = SCHEMA[key][1]
        ok, converted = _matches(value, hint)
        if not ok:
            raise ConfigError(f"{source}: key '{key}' must be {_type_name(hint)}, got {value!r}")
        if (problem := check_range(key, converted)) is not None:
            raise ConfigError(f"{source}: key '{key}' {problem}, got {value!r}")
        checked[key] = converted
    return checked


def load_yaml(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The validated keys of one YAML file, with any `extends:` chain merged underneath."""
    path = path.expanduser().resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'extends' loops back to itself")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(err, "problem", None) or "syntax error"
        raise ConfigError(f"{path}: not valid YAML{at}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    base: dict[str, Any] = {}
    parent = data.pop(EXTENDS_KEY, None)
    if parent is not None:
        if not isinstance(parent, str):
            raise ConfigError(f"{path}: key '{EXTENDS_KEY}' must be a file name, got {parent!r}")
        base = load_yaml(path.parent / parent, (*_seen, path))
    return {**base, **validate(data, str(path))}


def method_preset(method: str) -> dict[str, Any]:
    """The shipped preset of a method (configs/methods/<method>.yaml)."""
    path = METHOD_PRESETS_DIR / f"{method}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in METHOD_PRESETS_DIR.glob("*.yaml"))
        raise ConfigError(f"no preset for method '{method}' in {METHOD_PRESETS_DIR} (found: {', '.join(known)})")
    return load_yaml(path)


def resolve_settings(
    config_path: Path | None = None, overrides: dict[str, Any] | None = None, plan: dict[str, Any] | None = None,
    plan_source: str = "the plan",
) -> Settings:
    """Merge the layers: preset of the chosen method < `plan` (profiles.choose_plan's values) <
    YAML file < `overrides` (the command line).

    The method is the command line's, else the YAML file's, else the plan's, else DEFAULT_METHOD."""
    cli = validate(overrides or {}, "command line")
    from_file = load_yaml(config_path) if config_path is not None else {}
    planned = validate(plan or {}, plan_source)
    method = cli.get("method") or from_file.get("method") or planned.get("method") or DEFAULT_METHOD
    merged = {**method_preset(method), **planned, **from_file, **cli, "method": method}
    per_section: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    for key, value in merged.items():
        per_section[SCHEMA[key][0]][key] = value
    return Settings(
        engine=EngineConfig(**per_section["engine"]),
        sampling=SamplingConfig(**per_section["sampling"]),
        run=RunOptions(**per_section["run"]),
        explicit=frozenset(from_file) | frozenset(cli),
    )
