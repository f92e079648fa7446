"""What a caller of the served deployments may ask for.

`tfpipe serve` exposes training and prediction to whoever can reach the Prefect API. It writes a ServePolicy
(its config file, its own overrides, the `serve` section and the artifact root) into the environment its flow
runs inherit, where no caller's parameter can reach it; the flows check every call against it before any work:
paths are normalised (symlinks resolved, `..` collapsed, URLs parsed) and must lie under an allowed place, the
config file and the artifact root are the served ones, and `overrides` may set only `serve.allowed_overrides`.
A refusal is one PipelineError line naming the parameter and what is allowed. Runs started from the CLI on the
user's own machine carry no policy.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

from pipeline_config import PipelineConfig
from tasks.errors import PipelineError
from tasks.store.storage import is_local

POLICY_ENV = "TFPIPE_SERVE_POLICY"
FIXED_KEYS = ("artifacts.root", "artifacts.local_cache", "serve", "rerun")  # never from a caller


@dataclass
class ServePolicy:
    config_file: str | None
    overrides: dict[str, Any]  # the serving side's own --set values, applied under every caller's
    root: str
    allowed_inputs: list[str]
    allowed_outputs: list[str]
    allowed_overrides: list[str]

    @classmethod
    def of(cls, cfg: PipelineConfig, config_file: str | None, overrides: dict[str, Any]) -> "ServePolicy":
        return cls(os.path.abspath(config_file) if config_file else None, overrides, cfg.artifacts.root,
                   cfg.serve.allowed_inputs, cfg.serve.allowed_outputs, cfg.serve.allowed_overrides)

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls) -> "ServePolicy | None":
        raw = os.environ.get(POLICY_ENV)
        return cls(**json.loads(raw)) if raw else None

    def admit(self, config_file: str | None, overrides: dict[str, Any] | None) -> tuple[str | None, dict[str, Any]]:
        """The config file and overrides a served run uses: the caller's, checked, over the serving side's."""
        if config_file is not None and os.path.abspath(config_file) != self.config_file:
            raise PipelineError(f"served run refused: parameter config_file cannot be set by a caller (the served "
                                f"config is {self.config_file or 'the default'})")
        for key, value in (overrides or {}).items():
            if key in self.overrides and self.overrides[key] == value:
                continue  # the serving side's own value, passed back
            if any(key == fixed or key.startswith(fixed + ".") for fixed in FIXED_KEYS):
                raise PipelineError(f"served run refused: parameter overrides sets {key}, which a caller cannot "
                                    f"change (the served artifact root is {self.root})")
            if key not in self.allowed_overrides:
                raise PipelineError(f"served run refused: parameter overrides sets {key}; callers may set only "
                                    f"{', '.join(self.allowed_overrides) or 'nothing'} (serve.allowed_overrides)")
        return self.config_file, {**self.overrides, **(overrides or {})}

    def check_input(self, name: str, value: str) -> None:
        if value.startswith("cache:"):  # a split of a dataset in the served artifact root
            return
        self._check_place(name, value, [self.root, *self.allowed_inputs], "serve.allowed_inputs")

    def check_output(self, name: str, value: str) -> None:
        self._check_place(name, value, [self.root, *self.allowed_outputs], "serve.allowed_outputs")

    def check_model(self, value: str) -> None:
        """A model given as a path must be a published one under the artifact root (a name or fingerprint is)."""
        if value == "champion" or "/" not in value:
            return
        self._check_place("model", value, [self.root], "the artifact root")

    def _check_place(self, name: str, value: str, places: list[str], setting: str) -> None:
        target = normalise(value)
        if not any(under(target, normalise(place)) for place in places):
            raise PipelineError(f"served run refused: parameter {name}={value!r} is outside the allowed places "
                                f"({', '.join(places)}); allow more with {setting} on the serving side")


def served_call(config_file: str | None, overrides: dict[str, Any] | None,
                **parameters: Any) -> tuple[str | None, dict[str, Any] | None]:
    """A flow's parameters as it may use them: unchanged outside `tfpipe serve`; under it, checked against the
    policy (raises PipelineError, before any work) and merged over the serving side's overrides. A flow passes
    every one of its parameters: one this policy has no rule for is a programming error (TypeError), so a new
    flow parameter cannot bypass it."""
    unknown = set(parameters) - set(PARAMETER_RULES)
    if unknown:
        raise TypeError(f"served_call has no rule for flow parameter(s) {', '.join(sorted(unknown))}")
    policy = ServePolicy.from_env()
    if policy is None:
        return config_file, overrides
    config_file, overrides = policy.admit(config_file, overrides)
    for name, value in parameters.items():
        PARAMETER_RULES[name](policy, name, value)
    return config_file, overrides


def _caller_may_not_set(default: Any, why: str):
    def check(policy: ServePolicy, name: str, value: Any) -> None:
        if value != default:
            raise PipelineError(f"served run refused: parameter {name}={value!r} cannot be set by a caller ({why})")
    return check


# One rule per flow parameter a served caller can pass (config_file and overrides: ServePolicy.admit).
PARAMETER_RULES = {
    "model": lambda policy, name, value: policy.check_model(value),
    "input": lambda policy, name, value: policy.check_input(name, value),
    "output": lambda policy, name, value: policy.check_output(name, value),
    "overwrite": lambda policy, name, value: None,  # replaces only what tfpipe wrote, under serve.allowed_outputs
    "rerun": _caller_may_not_set(None, "a served run reuses published outputs; rebuild with tfpipe run --rerun "
                                       "on the serving side"),
    "allow_unblessed": _caller_may_not_set(False, "the serving side's predict.allow_unblessed decides"),
}


def normalise(path: str) -> str:
    """A comparable form: URLs as scheme://host/normalised-path, local paths absolute with symlinks resolved."""
    if not is_local(path):
        parts = urlsplit(path)
        clean = posixpath.normpath("/" + parts.path.lstrip("/")) if parts.path else "/"
        return f"{parts.scheme.lower()}://{parts.netloc.lower()}{clean}"
    return os.path.realpath(os.path.expanduser(path.removeprefix("file://")))


def under(target: str, place: str) -> bool:
    return target == place or target.startswith(place.rstrip("/") + "/")
