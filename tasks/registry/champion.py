"""The champion pointer: which published model is the champion, the champions it replaced, and what they keep
(blessed models for prediction, what gc must not remove). How it changes is in decisions.py.

`<root>/champion.json` holds `current` (the champion's entry), `history` (the champions it replaced, newest
first) and `demoted` (models a rollback took away: the gate does not bring them back, `tfpipe promote` can).
Every entry says how the model became champion (`decision`: gate | manual | rollback), when, by whom and why.
The file is changed under the champion's lease and replaced atomically: a reader sees the old pointer or the
new one, whole, and prediction with `--model champion` follows it at once.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from tasks.errors import PipelineError
from tasks.store import storage
from tasks.store.storage import join

CHAMPION_FILE = "champion.json"


def read_champion(root: str) -> dict | None:
    try:
        return storage.read_json(join(root, CHAMPION_FILE))
    except FileNotFoundError:
        return None


def current_champion(root: str) -> dict | None:
    """The champion's entry (model_fingerprint, model_uri, dataset_fingerprint, accuracy, ...), or None."""
    return (read_champion(root) or {}).get("current")


def champion_entries(root: str) -> list[dict]:
    """The champion's entry and those of the champions it replaced, newest first."""
    champion = read_champion(root) or {}
    return ([champion["current"]] if champion.get("current") else []) + champion.get("history", [])


def blessed_models(root: str) -> set[str]:
    """Fingerprints of every model the gate ever blessed (the champion and those it replaced)."""
    return {e["model_fingerprint"] for e in champion_entries(root)}


def require_blessed(root: str, model_fingerprint: str, allow_unblessed: bool) -> None:
    """Prediction uses a model the gate blessed, unless the caller allows another (raises PipelineError)."""
    if not allow_unblessed and model_fingerprint not in blessed_models(root):
        raise PipelineError(f"model {model_fingerprint[:12]} was not blessed by the evaluation gate: use the "
                            "champion, or pass --allow-unblessed to predict with it anyway")


def needed_by_champions(root: str) -> set[str]:
    """Fingerprints (of any stage) that the champion and its history point at: models, datasets, evaluations."""
    needed = set()
    for entry in champion_entries(root):
        # a model promoted by hand before any evaluation has evaluation_uri None (and may lack the others)
        needed.update({entry["model_fingerprint"], entry.get("dataset_fingerprint") or "",
                       PurePosixPath(entry.get("evaluation_uri") or "").name})
    return needed - {""}
