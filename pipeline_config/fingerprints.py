"""Fingerprints: the sha256 of a value's canonical JSON, what every stage output is keyed by."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel


def fingerprint(value: Any) -> str:
    """sha256 of the canonical JSON of a config section (or any JSON-able value)."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()
