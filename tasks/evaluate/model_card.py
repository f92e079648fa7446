"""The model card: what a published model is, what data made it, how good it is and where it came from, written
from the manifests (`model_card.json`, and `model_card.md` for people) into the model's directory after every
evaluation, with the evaluation's confusion matrix beside it. The Model Card Toolkit is unmaintained (last
release 2023); the figures here are the run's own."""

from __future__ import annotations

import datetime

from pipeline_config import PipelineConfig
from tasks.errors import PipelineError
from tasks.registry.champion import champion_entries
from tasks.registry.models import resolve_model
from tasks.store import storage
from tasks.store.publish import read_manifest
from tasks.store.refs import DatasetArtifact, EvaluationArtifact, ModelArtifact
from tasks.store.storage import join

CARD_JSON, CARD_MD, CARD_MATRIX = "model_card.json", "model_card.md", "model_card_confusion_matrix.png"


def model_card(cfg: PipelineConfig, dataset: DatasetArtifact, model: ModelArtifact,
               evaluation: EvaluationArtifact) -> dict:
    """The card's content, from the dataset, model and evaluation manifests and the champion history."""
    model_manifest = read_manifest(model.uri) or {}
    trained = model_manifest.get("config", {})
    history = storage.read_json(join(model.uri, model.history_path))
    return {
        "model": {"fingerprint": model.fingerprint, "created": model_manifest.get("created"),
                  "architecture": _architecture(trained.get("model", {})), "parameters": model.parameters,
                  "input": f"uint8 images {model.image_shape}, preprocessed in the model", "classes": model.num_classes,
                  "precision": model.precision, "training": trained.get("train"),
                  "epochs": model.epochs, "best_epoch": model.best_epoch, "stop_reason": model.stop_reason,
                  "training_seconds": history.get("seconds_this_run"), "init_from": model.init_from,
                  "phases": (trained.get("train") or {}).get("phases") or [],
                  "exports": model.exports},
        "data": {"fingerprint": dataset.fingerprint, "source": dataset.source, "source_hash": dataset.source_hash,
                 "counts": dataset.counts, "class_names": dataset.label_names,
                 "class_histograms": dataset.class_histograms, "image_format": dataset.image_format},
        "evaluation": {"fingerprint": evaluation.fingerprint, "uri": evaluation.uri,
                       "metrics": {k: v for k, v in evaluation.metrics.items() if k != "per_class"},
                       "per_class": evaluation.metrics.get("per_class", []),
                       "blessed": evaluation.blessed, "gate": [r.describe() for r in evaluation.reasons],
                       "champion_history": [{"model": e["model_fingerprint"], "accuracy": e.get("accuracy"),
                                             "since": e.get("promoted_at"), "reason": e.get("reason", "gate")}
                                            for e in champion_entries(cfg.artifacts.root)]},
        "lineage": {"dataset": dataset.fingerprint, "model": model.fingerprint, "evaluation": evaluation.fingerprint},
        "card": cfg.model.card.model_dump(mode="json"),
    }


def _architecture(model_config: dict) -> dict:
    """The body as configured: a keras.applications backbone, or the layer stack."""
    if model_config.get("backbone"):
        return {"backbone": model_config["backbone"]}
    return {"layers": model_config.get("layers") or []}


def _body(architecture: dict) -> str:
    if "backbone" in architecture:
        backbone = architecture["backbone"]
        return (f"{backbone['name']} (keras.applications, no top; weights: {backbone['weights'] or 'random'}), "
                f"{backbone['pooling']} pooling, dropout {backbone['dropout']}")
    return "layers " + ", ".join(layer["type"] for layer in architecture["layers"])


def _when(stamp: float | None) -> str:
    return datetime.datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M") if stamp else "-"


def _resizing(image_format: dict) -> str:
    size = image_format.get("image_size")
    if not size:
        return "used at their own size"
    return (f"resized at ingest to {size[0]}x{size[1]} ({image_format['resize']}, {image_format['interpolation']}), "
            "the same in the SavedModel's serve_bytes")


def pixel_parity_line(figures: dict) -> str:
    """How the serving graph's preprocessing compared with ingest's, as the card and the run report say it."""
    exact = figures["equal"] == figures["samples"]
    return (f"- `serve_bytes` feeds the model the pixels ingest cached for {figures['equal']} of {figures['sample']}"
            + ("" if exact else f" (the rest within {figures['max_abs_diff']} level)"))


def card_markdown(card: dict) -> str:
    model, data, ev, about = card["model"], card["data"], card["evaluation"], card["card"]
    names = data["class_names"] or [str(i) for i in range(model["classes"])]
    metrics = ev["metrics"]
    champions = [f"| {e['model'][:12]} | {'-' if e['accuracy'] is None else format(e['accuracy'], '.4f')} | "
                 f"{_when(e['since'])} | {e['reason']} |" for e in ev["champion_history"]] or ["| none yet | | | |"]
    lines = [
        f"# Model card: {model['fingerprint'][:12]}", "",
        f"**Intended use.** {about['intended_use']}", "",
        f"**Limitations.** {about['limitations']}", "",
        f"**Owners.** {', '.join(about['owners']) or 'not stated: set model.card.owners'}", "",
        "## Model",
        f"- {model['parameters'] or 'unknown':,} parameters, input {model['input']}, {model['classes']} classes",
        f"- trained in {model['precision']} for {model['epochs']} epochs"
        + (f" (published: epoch {model['best_epoch']}, {model['stop_reason']})" if model["best_epoch"] else "")
        + (f", {model['training_seconds']:.0f} s" if model["training_seconds"] else ""),
        f"- body: {_body(model['architecture'])}",
        f"- started from: model {model['init_from']['fingerprint'][:12]} (`{model['init_from']['uri']}`)"
        if model["init_from"] else "- started from: its initializers (or the backbone's weights file)",
        *(["- phases: " + "; ".join(f"{p['epochs']} epoch(s) training {p['trainable']}" for p in model["phases"])]
          if model["phases"] else []),
        "- serving formats: " + (", ".join(f"{name} (`{entry['path']}`, agrees with Keras on "
                                          f"{entry['parity']['label_agreement']:.2%})"
                                          for name, entry in model["exports"].items()) or "model.keras only"),
        *([pixel_parity_line(model["exports"]["saved_model"]["parity_pixels"])]
          if "parity_pixels" in model["exports"].get("saved_model", {}) else []),
        "", "## Data",
        f"- source `{data['source']}`, dataset {data['fingerprint'][:12]}",
        f"- examples: {', '.join(f'{split} {count:,}' for split, count in data['counts'].items())}",
        f"- images: {_resizing(data['image_format'])}",
        "", "| class | " + " | ".join(data["class_histograms"]) + " |",
        "| --- |" + " --- |" * len(data["class_histograms"]),
        *[f"| {name} | " + " | ".join(str(h[i]) for h in data["class_histograms"].values()) + " |"
          for i, name in enumerate(names)],
        "", "## How good (test split)",
        f"- accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f}, loss {metrics['loss']:.4f} "
        f"on {metrics['count']:,} images",
        f"- gate: **{'blessed' if ev['blessed'] else 'not blessed'}** ({'; '.join(ev['gate'])})", "",
        "| class | precision | recall | F1 | support |", "| --- | --- | --- | --- | --- |",
        *[f"| {c['name']} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |"
          for c in ev["per_class"]],
        "", f"![confusion matrix]({CARD_MATRIX})", "", "## Champion history (newest first)",
        "| model | accuracy | since | how |", "| --- | --- | --- | --- |",
        *champions,
        "", "## Lineage",
        *[f"- {stage}: `{fp}`" for stage, fp in card["lineage"].items()],
        f"- evaluation output: `{ev['uri']}`", "",
    ]
    return "\n".join(lines)


def write_model_card(cfg: PipelineConfig, dataset: DatasetArtifact, model: ModelArtifact,
                     evaluation: EvaluationArtifact) -> str:
    """Write the card and its confusion matrix into the model's directory (each file whole, replacing the
    card of an earlier evaluation); returns the path of model_card.md."""
    card = model_card(cfg, dataset, model, evaluation)
    with storage.open_file(join(evaluation.uri, "confusion_matrix.png")) as f:
        storage.write_bytes(join(model.uri, CARD_MATRIX), f.read())
    storage.write_bytes(join(model.uri, CARD_MD), card_markdown(card).encode())
    storage.write_json(join(model.uri, CARD_JSON), card)
    return join(model.uri, CARD_MD)


def read_model_card(root: str, model_ref: str, as_json: bool = False) -> str:
    """The card of a published model (`champion`, a directory or a fingerprint), as Markdown or JSON text."""
    uri, manifest = resolve_model(root, model_ref)
    path = join(uri, CARD_JSON if as_json else CARD_MD)
    if not storage.exists(path):
        raise PipelineError(f"model {manifest['fingerprint'][:12]} has no model card yet: it is written when the "
                            "model is evaluated (tfpipe evaluate, or tfpipe run)")
    with storage.open_file(path, "r") as f:
        return f.read()
