"""The champion registry: which published model is the champion, how each champion got there, and the list of
published models.

`<root>/champion.json` holds `current` (the champion's entry), `history` (the champions it replaced, newest
first) and `demoted` (models a rollback took away: the gate does not bring them back, `tfpipe promote` can).
Every entry says how the model became champion (`decision`: gate | manual | rollback), when, by whom and why.
The file is changed under the champion's lease and replaced atomically: a reader sees the old pointer or the
new one, whole, and prediction with `--model champion` follows it at once.
"""

from __future__ import annotations

import getpass
import logging
import os
import time
from pathlib import PurePosixPath

from tasks import storage
from tasks.artifacts import published_outputs, read_manifest
from tasks.errors import PipelineError
from tasks.lease import stage_lease
from tasks.storage import join

CHAMPION_FILE = "champion.json"
log = logging.getLogger("tfpipe.champion")


def user_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for the uid (containers)
        return f"uid {os.getuid()}"


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


def promote(root: str, entry: dict) -> bool:
    """The gate blessed `entry`: make it the champion (the one it replaces moves to the history), unless it is
    already, or a rollback demoted it. Read, change and write under the champion's lease, so two concurrent
    decisions cannot lose one. True when the champion changed."""
    with stage_lease(root, "champion", "pointer"):
        champion = read_champion(root) or {"current": None, "history": []}
        fp = entry["model_fingerprint"]
        if fp in champion.get("demoted", {}):
            log.warning("model %s passed the gate but stays demoted (%s): tfpipe promote %s makes it the champion",
                        fp[:12], champion["demoted"][fp], fp[:12])
            return False
        return _replace_current(root, champion, {"decision": "gate", "user": user_name(), **entry})


def _replace_current(root: str, champion: dict, entry: dict) -> bool:
    current = champion.get("current")
    if current and current["model_fingerprint"] == entry["model_fingerprint"]:
        return False
    history = ([current] if current else []) + champion.get("history", [])
    demoted = {k: v for k, v in champion.get("demoted", {}).items() if k != entry["model_fingerprint"]}
    storage.write_json(join(root, CHAMPION_FILE), {"current": entry, "history": history, "demoted": demoted})
    return True


def promote_by_hand(root: str, ref: str, reason: str) -> dict:
    """`tfpipe promote`: make a published model the champion past the gate; returns its entry."""
    if not reason.strip():
        raise PipelineError("tfpipe promote needs --reason TEXT: it is recorded in the champion history")
    uri, manifest = resolve_model(root, ref)
    evaluation = latest_evaluation(root, manifest["fingerprint"])
    entry = {"model_fingerprint": manifest["fingerprint"], "model_uri": uri,
             "dataset_fingerprint": (evaluation or manifest)["dataset_fingerprint"],
             "accuracy": evaluation["metrics"]["accuracy"] if evaluation else None,
             "evaluation_uri": evaluation["uri"] if evaluation else None, "promoted_at": time.time(),
             "decision": "manual", "user": user_name(), "reason": reason}
    with stage_lease(root, "champion", "pointer"):
        if not _replace_current(root, read_champion(root) or {}, entry):
            raise PipelineError(f"model {manifest['fingerprint'][:12]} is already the champion")
    return entry


def rollback(root: str, to: str | None = None, reason: str | None = None) -> dict:
    """`tfpipe rollback`: the previous champion (or the former champion `to` names) becomes the champion again;
    the one it replaces is demoted. Returns the new entry."""
    with stage_lease(root, "champion", "pointer"):
        champion = read_champion(root) or {}
        current, history = champion.get("current"), champion.get("history", [])
        if not current:
            raise PipelineError(f"no champion under {root}: nothing to roll back")
        candidates = [h for h in history if h["model_fingerprint"] != current["model_fingerprint"]
                      and (to is None or h["model_fingerprint"].startswith(to))]
        if not candidates:
            raise PipelineError(f"--to {to!r} is not a former champion under {root} (see tfpipe models): use "
                                "tfpipe promote for a model that never was" if to else
                                f"the champion {current['model_fingerprint'][:12]} has no predecessor to roll back to")
        target = candidates[0]
        entry = {**{k: v for k, v in target.items() if k not in ("user", "reason")}, "promoted_at": time.time(),
                 "decision": "rollback", "user": user_name(),
                 "reason": reason or f"rolled back from {current['model_fingerprint'][:12]}"}
        champion.setdefault("demoted", {})[current["model_fingerprint"]] = (
            f"rolled back by {entry['user']} at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime())}")
        _replace_current(root, champion, entry)
    return entry


def latest_evaluation(root: str, model_fp: str) -> dict | None:
    """The newest published evaluation of a model (its manifest, with `uri`), or None."""
    found = [m for m in evaluations(root) if m["model_fingerprint"] == model_fp]
    return max(found, key=lambda m: m["created"]) if found else None


def evaluations(root: str) -> list[dict]:
    return [{**manifest, "uri": uri} for uri, manifest in published_outputs(root, "evaluate")]


def list_models(root: str) -> list[dict]:
    """Every published model, newest first, with its latest evaluation and whether it is the champion."""
    champion = current_champion(root) or {}
    latest: dict[str, dict] = {}
    for ev in sorted(evaluations(root), key=lambda m: m["created"]):
        latest[ev["model_fingerprint"]] = ev
    rows = []
    for uri, manifest in published_outputs(root, "train"):
        ev = latest.get(manifest["fingerprint"])
        rows.append({"fingerprint": manifest["fingerprint"], "created": manifest["created"],
                     "dataset_fingerprint": manifest["dataset_fingerprint"], "precision": manifest["precision"],
                     "epochs": manifest["epochs"],
                     "test_accuracy": ev["metrics"]["accuracy"] if ev else None,
                     "macro_f1": ev["metrics"]["macro_f1"] if ev else None,
                     "gate": None if ev is None else ("blessed" if ev["blessed"] else "not blessed"),
                     "champion": manifest["fingerprint"] == champion.get("model_fingerprint"),
                     "uri": uri})
    return sorted(rows, key=lambda r: r["created"], reverse=True)


def resolve_model(root: str, ref: str) -> tuple[str, dict]:
    """(model directory, its manifest) for `champion`, a model directory, or a fingerprint (or unique prefix)."""
    if ref == "champion":
        champion = current_champion(root)
        if not champion:
            raise PipelineError(f"no champion under {root}: run the pipeline (tfpipe run) so a model is blessed, "
                                "or pass --model with a model directory or fingerprint")
        uri = champion["model_uri"]
    elif storage.exists(ref):
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
