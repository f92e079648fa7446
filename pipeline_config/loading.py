"""Loading a config: the default YAML, then a user's file merged over it, then the environment (TFPIPE__SECTION__KEY),
then `--set` overrides, validated; and what a user set, without the defaults (the body of a preset)."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline_config.base import ConfigError
from pipeline_config.keys import parse_override, set_dotted, validation_message
from pipeline_config.schema import PipelineConfig

DEFAULT_CONFIG_PATH = Path(__file__).with_name("default.yaml")


def _merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "layers":
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config error: config file {path} not found: pass an existing YAML file to --config")
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config error: {path}{where} is not valid YAML: fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config error: {path} must hold a mapping of sections (data, model, train, ...)")
    return data


def user_settings(path: str | Path | None, overrides: dict[str, Any]) -> dict:
    """What a user set (a config file, then dotted overrides) as one nested mapping, without the defaults: the
    body of a preset that gives the same config through --config."""
    tree = _read_yaml(Path(path)) if path else {}
    for key, value in overrides.items():
        set_dotted(PipelineConfig, tree, key.split("."), value)
    return tree


ENV_PREFIX = "TFPIPE__"


def environment_overrides() -> dict[str, tuple[list[str], Any]]:
    """Settings from the environment, as a container or a scheduler sets them: TFPIPE__TRAIN__EPOCHS=3 is
    `--set train.epochs=3` (the value read as YAML, sections joined by a double underscore); by variable name.
    TFPIPE_ARTIFACTS, the older spelling of TFPIPE__ARTIFACTS__ROOT, comes first (the value as it is)."""
    items = {}
    if os.environ.get("TFPIPE_ARTIFACTS"):
        items["TFPIPE_ARTIFACTS"] = (["artifacts", "root"], os.environ["TFPIPE_ARTIFACTS"])
    for name, raw in sorted(os.environ.items()):
        if name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX):
            key = ".".join(name[len(ENV_PREFIX):].lower().split("__"))
            try:
                items[name] = parse_override(f"{key}={raw}")
            except ConfigError:
                raise ConfigError(f"config error: environment variable {name}: expected TFPIPE__SECTION__KEY=VALUE, "
                                  "e.g. TFPIPE__TRAIN__EPOCHS=3") from None
    return items


def load_config(path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None) -> PipelineConfig:
    """Default YAML, then `path` merged over it, then the environment (TFPIPE_ARTIFACTS, TFPIPE__SECTION__KEY),
    then dotted overrides; validated.

    Raises ConfigError with one line naming the offending key.
    """
    tree = _read_yaml(DEFAULT_CONFIG_PATH)
    if path:
        tree = _merge(tree, _read_yaml(Path(path)))
    items: list[tuple[list[str], Any]]
    if isinstance(overrides, dict):
        items = [(k.split("."), v) for k, v in overrides.items()]
    else:
        items = [parse_override(o) for o in overrides or []]
    environment = environment_overrides()  # the environment beats the files, an explicit --set beats it
    for name, (parts, value) in environment.items():
        try:
            set_dotted(PipelineConfig, tree, parts, value)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (set by the environment variable {name})") from None
    for parts, value in items:
        set_dotted(PipelineConfig, tree, parts, value)
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        where = ".".join(str(p) for p in exc.errors()[0]["loc"])
        named = [name for name, (parts, _) in environment.items() if f"{where}.".startswith(".".join(parts) + ".")]
        raise ConfigError(validation_message(PipelineConfig, exc) + (f" (set by the environment variable {named[0]})" if named
                                                     else "")) from None
