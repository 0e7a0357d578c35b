"""Typed configs from YAML: pydantic models, strict keys, ``a.b=value`` overrides.

Used by the jobs (fine-tuning, evaluation, serving) so that every config is code
with defaults that run, and a typo in a key, or a value of the wrong type, is an
error naming the dotted key when the config is loaded (in the job's driver),
not a failure later inside a Ray worker.

- Sections are ``Settings`` subclasses (pydantic ``BaseModel``, unknown keys
  forbidden); stdlib dataclasses such as ``GazeConfig`` can be field types too
  (pydantic validates their fields and runs their ``__post_init__``).
- Values are checked and converted by pydantic's (lax) rules: ``1e-5``, which
  PyYAML reads as a string, becomes the float a ``float`` field asks for.
- ``--set key.sub=value`` overrides are parsed to the type of the field they
  name: as YAML when that fits the field (``null``, ``[1, 6, 6]``, ``true``),
  else as the plain string (``run.name=123`` is the name "123").
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    """A config that does not fit its schema; the message names every bad dotted key."""


class Settings(BaseModel):
    """Base of every config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


def validate(cls: type[T], data: Any, *, source: str = "config") -> T:
    """``cls`` built from ``data``; a ``ConfigError`` naming each bad key otherwise."""
    try:
        return cls.model_validate({} if data is None else data)
    except ValidationError as err:
        raise ConfigError(f"{source}: {describe(err)}") from None


def describe(err: ValidationError) -> str:
    """One line per problem: ``dotted.key: what is wrong (got VALUE)``."""
    lines = []
    for item in err.errors(include_url=False):
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = item["msg"]
        if item["type"] == "extra_forbidden" or "Unexpected keyword argument" in message:
            message = "unknown key"
        elif "input" in item and not isinstance(item["input"], dict):
            message += f" (got {item['input']!r})"
        lines.append(f"{key}: {message}")
    return "invalid config:\n  " + "\n  ".join(lines)


def to_dict(obj: BaseModel) -> dict[str, Any]:
    """A plain, JSON-ready dict (tuples as lists) that ``validate`` reads back."""
    return obj.model_dump(mode="json")


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for MLflow params)."""
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def apply_overrides(cls: type[BaseModel], data: dict[str, Any], overrides: Iterable[str]) -> dict:
    """Apply ``key.sub=value`` strings to the nested dict ``data`` of a ``cls`` config.

    Each key must name a field of ``cls`` (or a key inside a free-form dict field), and
    each value is parsed to that field's type (see the module doc)."""
    data = yaml.safe_load(yaml.safe_dump(data or {}))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        parts = key.split(".")
        hint = field_type(cls, parts)
        node = data
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: depth + 1])} is a value")
        node[parts[-1]] = parse_value(hint, raw)
    return data


def parse_value(hint: Any, raw: str) -> Any:
    """``raw`` as YAML when the result fits ``hint``, else the plain string."""
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if hint is Any:
        return value
    adapter = TypeAdapter(hint)
    try:
        adapter.validate_python(value)
        return value
    except ValidationError:
        # a string field given 123 or 1.5, a tuple given "a,b": validation reports the rest
        return raw


def field_type(cls: Any, parts: list[str]) -> Any:
    """The annotation of the field that the dotted key ``parts`` names in ``cls``."""
    hint: Any = cls
    for depth, part in enumerate(parts):
        fields = _fields(_section(hint))
        if fields is None:
            # inside a free-form mapping (e.g. tiny_options): any value, parsed as YAML
            return Any
        if part not in fields:
            where = ".".join(parts[:depth]) or "the config"
            raise ConfigError(
                f"unknown key {'.'.join(parts[: depth + 1])!r}: {where} has {sorted(fields)}"
            )
        hint = fields[part]
    return hint


def _section(hint: Any) -> Any:
    """The model or dataclass inside ``hint`` (``X | None`` -> ``X``), else ``hint``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        sections = [a for a in inner if _fields(a) is not None]
        return sections[0] if sections else hint
    return hint


def _fields(hint: Any) -> dict[str, Any] | None:
    if isinstance(hint, type) and issubclass(hint, BaseModel):
        return {name: f.annotation for name, f in hint.model_fields.items()}
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        hints = typing.get_type_hints(hint)
        return {f.name: hints[f.name] for f in dataclasses.fields(hint) if f.init}
    return None


def load_yaml(cls: type[T], path: str | Path | None, overrides: Iterable[str] = ()) -> T:
    """Read ``path`` (or the defaults when None), apply overrides, build and check ``cls``."""
    data: Any = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        text = Path(path).read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ConfigError(
                f"{source}: expected a mapping of sections, got {type(data).__name__}"
            )
    overrides = list(overrides)
    if overrides:
        data = apply_overrides(cls, data, overrides)
        source += " with --set " + " ".join(overrides)
    return validate(cls, data, source=source)
