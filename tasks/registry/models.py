"""The published models and how a command names one: `champion`, a model directory, or a fingerprint (or a unique
prefix of one); the list of models with their latest evaluations and which one is the champion."""

from __future__ import annotations

from tasks.errors import PipelineError
from tasks.registry.champion import current_champion
from tasks.store import storage
from tasks.store.publish import published_outputs, read_manifest
from tasks.store.storage import join


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
