"""Dotted keys (`train.epochs`): parsing `--set KEY=VALUE`, setting a key in a nested mapping with the schema's
known keys checked on the way, and the one-line message for a key or value the schema refuses. The schema is a
parameter (`schema`), so this module needs none of the sections."""

from __future__ import annotations

import difflib
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipeline_config.base import ConfigError


def parse_override(item: str) -> tuple[list[str], Any]:
    """`KEY=VALUE` as (the key's parts, the value read as YAML)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.epochs=2")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected a dotted key such as train.epochs")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _known_keys(model: type[BaseModel], path: list[str]) -> list[str] | None:
    """The field names at `path` inside the schema, or None when the path is not a section."""
    for part in path:
        field = model.model_fields.get(part)
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return list(model.model_fields)


def set_dotted(schema: type[BaseModel], tree: dict, parts: list[str], value: Any) -> None:
    """tree[parts[0]][parts[1]]... = value, refusing (ConfigError) a key the schema has no section or field of."""
    node = tree
    for i, part in enumerate(parts[:-1]):
        known = _known_keys(schema, parts[:i])
        if known is not None and part not in known:
            raise ConfigError(_unknown_key_message(".".join(parts[: i + 1]), known))
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    known = _known_keys(schema, parts[:-1])
    if known is not None and parts[-1] not in known:
        raise ConfigError(_unknown_key_message(".".join(parts), known))
    node[parts[-1]] = value


def _unknown_key_message(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else f" (known keys: {', '.join(known)})"
    return f"config error: {key}: unknown key{hint}"


def validation_message(schema: type[BaseModel], exc: ValidationError) -> str:
    """The first problem pydantic found, as one line naming the key (a misspelt key: the closest known one)."""
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"])
    if not key:  # a check across sections: its message names the keys
        return f"config error: {err['msg'].removeprefix('Value error, ')}"
    if err["type"] == "extra_forbidden":
        parent = [str(p) for p in err["loc"][:-1]]
        known = _known_keys(schema, parent) or []
        return _unknown_key_message(key, known)
    msg = err["msg"].removeprefix("Value error, ")
    if "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], (dict, list)):
        msg = f"{msg} (got {err['input']!r})"
    return f"config error: {key}: {msg}"
