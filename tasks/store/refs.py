"""The typed references the stages hand each other: small, JSON-serialisable descriptions of published outputs
(never a TensorFlow object), read back from their manifests; and `cache:` references to a published dataset's
split or shard."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from tasks.errors import PipelineError
from tasks.store import storage
from tasks.store.publish import read_manifest
from tasks.store.storage import join


def class_names(label_names: list[str] | None, num_classes: int) -> list[str]:
    """The dataset's label names, or the class indices as text when it has none."""
    return list(label_names) if label_names else [str(i) for i in range(num_classes)]


class ArtifactRef(BaseModel):
    """A small, JSON-serialisable reference to a published stage output."""

    model_config = ConfigDict(extra="forbid")
    uri: str
    fingerprint: str
    cache_hit: bool = False

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


class DatasetArtifact(ArtifactRef):
    source: str
    source_hash: str
    counts: dict[str, int]
    image_shape: list[int]
    num_classes: int
    label_names: list[str] | None = None
    shards: dict[str, list[str]]  # split -> shard file names relative to uri
    class_histograms: dict[str, list[int]] = {}  # split -> examples per class
    image_format: dict = {}  # how ingest made the images one shape (tasks/preprocess/image_format.py settings())
    encoding: str = "raw"  # how the records hold the pixels: raw, png or jpeg (data.cache_encoding)
    test_files: dict = {}  # a folder source's first test records' files: {root, paths} (the serving graph's check)


class ModelArtifact(ArtifactRef):
    dataset_fingerprint: str
    model_path: str
    saved_model_path: str | None = None  # None when export.formats leaves the SavedModel out
    parameters: int | None = None  # None: a model published before manifests counted them
    init_from: dict | None = None  # train.init_from: the published model the weights started from
    exports: dict[str, dict] = {}  # format -> path, settings and parity figures (tasks/serve/export.py)
    history_path: str
    tensorboard_dir: str
    mode: str
    strategy: str
    devices: list[str]
    replicas: int
    global_batch_size: int
    per_replica_batch_size: int
    precision: str
    precision_reason: str
    epochs: int
    resumed_from_epoch: int = 0
    best_epoch: int | None = None  # with train.early_stopping: the epoch whose weights were published
    stop_reason: str | None = None
    final_metrics: dict[str, float]
    image_shape: list[int]
    num_classes: int
    label_names: list[str] | None = None
    loss: str
    input_pixels: str | None = None  # RAW_PIXELS; None: a model from before, which takes [0, 1] floats
    image_format: dict = {}  # the dataset's, for images a prediction reads from files


def model_artifact(uri: str, manifest: dict, cache_hit: bool) -> ModelArtifact:
    """The reference to a published model, from its manifest."""
    fields = {k: manifest[k] for k in ModelArtifact.model_fields if k in manifest and k not in ("uri", "cache_hit")}
    return ModelArtifact(uri=uri, cache_hit=cache_hit, **fields)


def dataset_artifact(uri: str, manifest: dict, cache_hit: bool) -> DatasetArtifact:
    """The reference to a published dataset, from its manifest."""
    return DatasetArtifact(
        uri=uri, fingerprint=manifest["fingerprint"], cache_hit=cache_hit,
        source=manifest["source"], source_hash=manifest["source_hash"],
        counts={s: info["count"] for s, info in manifest["splits"].items()},
        image_shape=manifest["image_shape"], num_classes=manifest["num_classes"],
        label_names=manifest["label_names"],
        shards={s: [sh["file"] for sh in info["shards"]] for s, info in manifest["splits"].items()},
        class_histograms={s: info["class_histogram"] for s, info in manifest["splits"].items()},
        image_format=manifest.get("image_format") or {}, encoding=manifest.get("encoding", "raw"),
        test_files=manifest.get("test_files") or {},
    )


CACHE_PREFIX = "cache:"


@dataclass
class CacheRef:
    """`cache:FINGERPRINT[/SPLIT[/SHARD]]`, resolved: a split of a published dataset (split `test` when none is
    named), or one shard file of it (what the Dask engine scores as one part)."""

    dataset: DatasetArtifact
    split: str
    shard: str | None = None

    @property
    def shards(self) -> list[str]:
        return [self.shard] if self.shard else self.dataset.shards[self.split]

    def of_shard(self, shard: str) -> str:
        """The reference to one shard of this split."""
        return f"{CACHE_PREFIX}{self.dataset.fingerprint}/{self.split}/{shard}"


def resolve_cache_ref(root: str, ref: str) -> CacheRef:
    """The published dataset a `cache:` reference names by its fingerprint (or a unique prefix of it)."""
    name, _, rest = ref.removeprefix(CACHE_PREFIX).partition("/")
    split, _, shard = rest.partition("/")
    base = join(root, "ingest")
    matches = [n for n in storage.listdir(base) if name and n.startswith(name) and not n.startswith(".")]
    manifest = read_manifest(join(base, matches[0])) if len(matches) == 1 else None
    if manifest is None:
        problem = "matches no published dataset" if not matches else f"matches {len(matches)} datasets"
        raise PipelineError(f"{ref} {problem} under {base}: pass a full dataset fingerprint (tfpipe ingest --json "
                            "prints it)")
    dataset = dataset_artifact(join(base, matches[0]), manifest, cache_hit=True)
    split = split or "test"
    if split not in dataset.shards:
        raise PipelineError(f"{ref}: the dataset has no split {split!r} (splits: {', '.join(dataset.shards)})")
    if shard and shard not in dataset.shards[split]:
        raise PipelineError(f"{ref}: the {split} split has no shard {shard!r}")
    return CacheRef(dataset, split, shard or None)


class ValidationArtifact(ArtifactRef):
    dataset_fingerprint: str
    reference_fingerprint: str | None  # the champion's dataset it was compared with
    anomalies: list[dict]  # kind, name, message, value, threshold, action (warn: the ones that failed nothing)
    schema_source: str
    report_path: str
    schema_path: str
    plot_path: str


class GateReason(BaseModel):
    model_config = ConfigDict(extra="forbid")
    check: str
    metric: str
    threshold: float
    observed: float
    passed: bool

    def describe(self) -> str:
        """`min_accuracy: accuracy 0.9812 >= 0.9000`, the one way a gate check is written out."""
        return f"{self.check}: {self.metric} {self.observed:.4f} {'>=' if self.passed else '<'} {self.threshold:.4f}"


class EvaluationArtifact(ArtifactRef):
    model_fingerprint: str
    dataset_fingerprint: str
    metrics: dict[str, Any]
    blessed: bool
    reasons: list[GateReason]
    champion_before: str | None = None
    champion_after: str | None = None
    metrics_path: str
    plots: list[str]


class PredictionArtifact(BaseModel):
    model_config = ConfigDict(extra="forbid")
    output: str
    rows: int
    sha256: str
    model_fingerprint: str
    input: str
    seconds: float
    uri: str | None = None  # the store directory, for the pipeline's own batch predictions
    cache_hit: bool = False
    drift: bool | None = None  # inputs unlike the model's data (tasks/validation/drift.py); None: too few images to judge
    drift_path: str | None = None

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)
