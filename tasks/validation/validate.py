"""The validate stage: the dataset's statistics (statistics.py, computed at ingest) checked against a schema
and against the champion's data, before anything trains on it.

The schema (image shape, classes, the least images a class may have, the range of mean brightness) is inferred
from the champion's dataset (from this dataset when there is no champion yet) or read from `validate.schema`, a
YAML file: the schema.yaml every validation writes, edited. Anomalies come in kinds (leakage, schema, drift,
duplicates, blank); `validate.on_anomaly` says per kind whether the stage fails (one line naming each anomaly,
nothing published) or warns (the anomalies are published with the validation, shown on the dashboard, and
`evaluate.block_on_anomalies` makes the gate refuse the model).
"""

from __future__ import annotations

import logging

import numpy as np
import yaml

from pipeline_config import PipelineConfig, fingerprint
from tasks.errors import PipelineError
from tasks.registry.champion import current_champion
from tasks.store import storage
from tasks.store.publish import find_published, reuse_or_publish
from tasks.store.refs import DatasetArtifact, ValidationArtifact
from tasks.store.storage import join
from tasks.validation.statistics import histogram_js, psi

log = logging.getLogger("tfpipe.validate")

STAGE = "validate"
VALIDATE_CODE_VERSION = "1"
REPORT, SCHEMA_FILE, PLOT = "validation.json", "schema.yaml", "brightness.png"


def statistics(root: str, dataset_fingerprint: str) -> dict | None:
    """A published dataset's statistics.json (None for a dataset ingested before they were kept)."""
    manifest = find_published(root, "ingest", dataset_fingerprint)
    path = manifest and manifest.get("statistics_path")
    return storage.read_json(join(root, "ingest", dataset_fingerprint, path)) if path else None


def infer_schema(dataset: dict, stats: dict) -> dict:
    """What later data must keep: the shape, the classes, at least half the smallest class's training images, and
    a mean brightness within 25% (at least 10 levels) of this data's."""
    train = stats["splits"]["train"]
    brightness = train["brightness_mean"]
    margin = max(10.0, 0.25 * brightness)
    return {"image_shape": dataset["image_shape"], "num_classes": dataset["num_classes"],
            "label_names": dataset.get("label_names"), "min_train_images_per_class": int(min(train["class_histogram"]) // 2),
            "brightness_mean": [round(max(0.0, brightness - margin), 2), round(min(255.0, brightness + margin), 2)]}


def schema_anomalies(schema: dict, dataset: DatasetArtifact, stats: dict) -> list[dict]:
    out = []
    if list(schema["image_shape"]) != list(dataset.image_shape):
        out.append(_anomaly("schema", "image_shape", f"images are {dataset.image_shape}, the schema says {schema['image_shape']}"))
    if schema["num_classes"] != dataset.num_classes:
        out.append(_anomaly("schema", "num_classes", f"{dataset.num_classes} classes, the schema says {schema['num_classes']}"))
    names = dataset.label_names or [str(i) for i in range(dataset.num_classes)]
    train = stats["splits"]["train"]
    for label, count in enumerate(train["class_histogram"][: schema["num_classes"]]):
        if count < schema["min_train_images_per_class"]:
            out.append(_anomaly("schema", f"class {names[label]}", f"class {names[label]} has {count} training images, "
                                f"the schema wants at least {schema['min_train_images_per_class']}",
                                count, schema["min_train_images_per_class"]))
    low, high = schema["brightness_mean"]
    if not low <= train["brightness_mean"] <= high:
        out.append(_anomaly("schema", "brightness_mean", f"mean brightness {train['brightness_mean']:.1f} is outside the "
                            f"schema's [{low}, {high}]", train["brightness_mean"], high))
    return out


def drift_anomalies(cfg: PipelineConfig, stats: dict, reference: dict) -> list[dict]:
    """Each split's class proportions and image-statistic histograms against the champion's data."""
    vc, out = cfg.validate, []
    for split, now in stats["splits"].items():
        then = reference["splits"].get(split)
        if then is None:
            continue
        for figure, label in (("class_histogram", "class proportions"), ("brightness_histogram", "brightness"),
                              ("contrast_histogram", "contrast")):
            js, index = histogram_js(then[figure], now[figure]), psi(then[figure], now[figure])
            if js > vc.max_js_distance or index > vc.max_psi:
                out.append(_anomaly("drift", f"{split} {label}", f"{split} {label} moved from the champion's data: "
                                    f"Jensen-Shannon distance {js:.3f} (max {vc.max_js_distance}), PSI {index:.3f} "
                                    f"(max {vc.max_psi})", js, vc.max_js_distance))
    return out


def data_anomalies(cfg: PipelineConfig, stats: dict) -> list[dict]:
    """Leakage between splits, duplicates and near-blank images within them."""
    vc, out = cfg.validate, []
    for pair, count in stats["leakage"].items():
        if count:
            a, b = pair.split("/")
            out.append(_anomaly("leakage", pair, f"{count} images are in both {a} and {b} (same pixels): the model "
                                "would be measured on images it trained on; remove them from one split", count, 0))
    for split, s in stats["splits"].items():
        for kind, key, what, limit in (("duplicates", "duplicate_images", "exact duplicates", vc.max_duplicate_fraction),
                                       ("blank", "blank_images", "near-blank images", vc.max_blank_fraction)):
            share = s[key] / max(s["count"], 1)
            if share > limit:
                out.append(_anomaly(kind, f"{split} {kind}", f"{s[key]} {what} in {split} ({share:.1%}, max {limit:.1%})",
                                    share, limit))
    return out


def _anomaly(kind: str, name: str, message: str, value: float | None = None, threshold: float | None = None) -> dict:
    return {"kind": kind, "name": name, "message": message, "value": value, "threshold": threshold}


def reference_of(cfg: PipelineConfig, dataset: DatasetArtifact) -> tuple[str | None, dict | None]:
    """The champion's dataset and its statistics, when there is a champion trained on other data."""
    champion = current_champion(cfg.artifacts.root) or {}
    fp = champion.get("dataset_fingerprint")
    if not fp or fp == dataset.fingerprint:
        return None, None
    return fp, statistics(cfg.artifacts.root, fp)


def load_schema(cfg: PipelineConfig, dataset: DatasetArtifact, stats: dict, reference: tuple) -> tuple[dict, str]:
    """(schema, where it came from)."""
    if cfg.validate.schema:
        try:
            with storage.open_file(cfg.validate.schema, "r") as f:
                return yaml.safe_load(f), cfg.validate.schema
        except (OSError, yaml.YAMLError) as exc:
            raise PipelineError(f"validate.schema={cfg.validate.schema} cannot be read ({exc}): point it at a schema "
                                "YAML (a validation's schema.yaml)") from None
    ref_fp, ref_stats = reference
    if ref_stats is not None:
        manifest = find_published(cfg.artifacts.root, "ingest", ref_fp)
        return infer_schema(manifest, ref_stats), f"inferred from the champion's dataset {ref_fp[:12]}"
    return infer_schema(dataset.model_dump(), stats), "inferred from this dataset (no champion yet)"


def validate(cfg: PipelineConfig, dataset: DatasetArtifact) -> ValidationArtifact:
    """Check the dataset; fail on the anomalies `validate.on_anomaly` says fail, publish the rest."""
    root = cfg.artifacts.root
    stats = statistics(root, dataset.fingerprint)
    if stats is None:
        raise PipelineError(f"dataset {dataset.fingerprint[:12]} has no statistics.json (ingested by an older tfpipe): "
                            "run again with --rerun ingest")
    reference = reference_of(cfg, dataset)
    schema, schema_source = load_schema(cfg, dataset, stats, reference)
    fp = fingerprint({"dataset": dataset.fingerprint, "reference": reference[0], "schema": schema,
                      "validate": cfg.validate.model_dump(mode="json", exclude={"schema"}), "code": VALIDATE_CODE_VERSION})

    def check(out: str) -> dict:
        anomalies = data_anomalies(cfg, stats) + schema_anomalies(schema, dataset, stats)
        if reference[1] is not None:
            anomalies += drift_anomalies(cfg, stats, reference[1])
        for a in anomalies:
            a["action"] = cfg.validate.on_anomaly[a["kind"]]
            log.warning("data anomaly (%s, %s): %s", a["kind"], a["action"], a["message"])
        failing = [a for a in anomalies if a["action"] == "fail"]
        if failing:
            raise PipelineError(f"data validation failed: {failing[0]['message']}"
                                + (f" (and {len(failing) - 1} more failing anomalies above)" if len(failing) > 1 else "")
                                + "; validate.on_anomaly.<kind>=warn lets a run go on")
        storage.write_bytes(join(out, SCHEMA_FILE), ("# tfpipe data schema: edit, then pass as validate.schema\n"
                                                     + yaml.safe_dump(schema, sort_keys=False)).encode())
        plot_brightness(stats, reference[1], join(out, PLOT))
        manifest = find_published(root, "ingest", dataset.fingerprint) or {}
        report = {"dataset_fingerprint": dataset.fingerprint, "reference_fingerprint": reference[0],
                  "schema_source": schema_source, "anomalies": anomalies, "statistics": stats["splits"],
                  "leakage": stats["leakage"], "source_sizes": manifest.get("source_sizes")}
        storage.write_json(join(out, REPORT), report)
        return {"dataset_fingerprint": dataset.fingerprint, "reference_fingerprint": reference[0],
                "anomalies": anomalies, "schema_source": schema_source, "report_path": REPORT,
                "schema_path": SCHEMA_FILE, "plot_path": PLOT}

    published = reuse_or_publish(root, STAGE, fp, check, rebuild=cfg.rebuilds(STAGE))
    m = published.manifest
    if published.cache_hit:
        for a in m["anomalies"]:
            log.warning("data anomaly (%s, %s): %s", a["kind"], a["action"], a["message"])
    log.info("validated dataset %s: %d anomalies (schema %s)", dataset.fingerprint[:12], len(m["anomalies"]),
             m["schema_source"])
    return ValidationArtifact(uri=published.uri, fingerprint=fp, cache_hit=published.cache_hit,
                              dataset_fingerprint=dataset.fingerprint, reference_fingerprint=m["reference_fingerprint"],
                              anomalies=m["anomalies"], schema_source=m["schema_source"], report_path=m["report_path"],
                              schema_path=m["schema_path"], plot_path=m["plot_path"])


def plot_brightness(stats: dict, reference: dict | None, path: str) -> None:
    """Each split's brightness histogram (share of images), the champion's training data dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for split, s in stats["splits"].items():
        hist = np.asarray(s["brightness_histogram"], np.float64)
        ax.plot(np.linspace(0, 255, len(hist)), hist / max(hist.sum(), 1), label=split)
    if reference is not None:
        hist = np.asarray(reference["splits"]["train"]["brightness_histogram"], np.float64)
        ax.plot(np.linspace(0, 255, len(hist)), hist / max(hist.sum(), 1), "k--", label="champion's train")
    ax.set_xlabel("mean pixel of an image")
    ax.set_ylabel("share of images")
    ax.legend()
    fig.tight_layout()
    with storage.open_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
