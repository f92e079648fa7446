"""How the champion changes, each change recorded with who, when and why: the gate's promotion, a promotion by
hand past the gate (`tfpipe promote`) and a rollback (`tfpipe rollback`, which demotes the model it replaces). Every
change reads, changes and writes `champion.json` under the champion's lease, so two concurrent decisions cannot
lose one."""

from __future__ import annotations

import getpass
import logging
import os
import time

from tasks.errors import PipelineError
from tasks.registry.champion import CHAMPION_FILE, read_champion
from tasks.registry.models import latest_evaluation, resolve_model
from tasks.store import storage
from tasks.store.lease import stage_lease
from tasks.store.storage import join

log = logging.getLogger("tfpipe.champion")


def user_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for the uid (containers)
        return f"uid {os.getuid()}"


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
