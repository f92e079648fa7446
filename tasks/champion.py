"""The champion registry: which published model is the champion, and every model the gate ever blessed.

`<root>/champion.json` holds `current` (the champion's entry) and `history` (the champions it replaced, newest
first). It is replaced atomically, so a reader sees the old pointer or the new one, whole.
"""

from __future__ import annotations

import os

from tasks import storage
from tasks.artifacts import join, read_json, read_manifest, write_json_atomic
from tasks.errors import PipelineError
from tasks.lease import stage_lease

CHAMPION_FILE = "champion.json"


def read_champion(root: str) -> dict | None:
    try:
        return read_json(join(root, CHAMPION_FILE))
    except FileNotFoundError:
        return None


def current_champion(root: str) -> dict | None:
    """The champion's entry (model_fingerprint, model_uri, dataset_fingerprint, accuracy, ...), or None."""
    return (read_champion(root) or {}).get("current")


def blessed_models(root: str) -> set[str]:
    """Fingerprints of every model the gate ever blessed (the champion and those it replaced)."""
    champion = read_champion(root) or {}
    entries = ([champion["current"]] if champion.get("current") else []) + champion.get("history", [])
    return {e["model_fingerprint"] for e in entries}


def promote(root: str, entry: dict) -> None:
    """Make `entry` the champion; the one it replaces moves to the history. Read, change and write under the
    champion's lease, so two concurrent gate decisions cannot lose one."""
    with stage_lease(root, "champion", "pointer"):
        champion = read_champion(root) or {"current": None, "history": []}
        current = champion.get("current")
        if current and current["model_fingerprint"] == entry["model_fingerprint"]:
            return
        history = ([current] if current else []) + champion.get("history", [])
        write_json_atomic(join(root, CHAMPION_FILE), {"current": entry, "history": history})


def resolve_model(root: str, ref: str) -> tuple[str, dict]:
    """(model directory, its manifest) for `champion`, a model directory, or a fingerprint (or unique prefix)."""
    if ref == "champion":
        champion = current_champion(root)
        if not champion:
            raise PipelineError(f"no champion under {root}: run the pipeline (tfpipe run) so a model is blessed, "
                                "or pass --model with a model directory or fingerprint")
        uri = champion["model_uri"]
    elif os.path.exists(ref) or ("://" in ref and storage.exists(ref)):
        uri = ref.rsplit("/", 1)[0] if ref.endswith(".keras") else ref.rstrip("/")
    else:
        base = join(root, "train")
        matches = [name for name in storage.listdir(base) if name.startswith(ref) and not name.startswith(".")]
        if len(matches) != 1:
            problem = "matches no model" if not matches else f"matches {len(matches)} models"
            raise PipelineError(f"--model {ref!r} {problem} under {base}: pass champion, a model directory or a full fingerprint")
        uri = join(base, matches[0])
    manifest = read_manifest(uri)
    if manifest is None or manifest.get("stage") != "train":
        raise PipelineError(f"{uri} is not a published model (no complete train manifest.json): pass a directory "
                            "written by the train stage")
    return uri, manifest
