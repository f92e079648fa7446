"""The artifact store and the typed references the stages hand each other.

Each stage output lives in `<root>/<stage>/<fingerprint>/`, with `manifest.json` written last: the manifest is
the commit, and an output without a complete one is never reused. On a local root the files are written into a
temporary sibling directory that one rename publishes. On an object store (`s3://`, `gs://`: no atomic
directory rename) the files are written locally, uploaded under the final prefix while this run holds the
fingerprint's lease, and the manifest is created last with a conditional create; it lists every file with its
size, and a reader trusts the output only when all of them are there. Every path goes through tasks/storage.py.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict

from tasks import storage
from tasks.errors import CorruptArtifact, PipelineError, environment_error
from tasks.storage import is_local, join

log = logging.getLogger("tfpipe.artifacts")

# The names every published output is found by, in one place.
MANIFEST = "manifest.json"  # a stage output's commit, written last
# A Dask prediction's directory of parts: the leading underscore makes Parquet dataset readers (pyarrow, Spark,
# Dask) skip it when they read the directory as one table.
PARTS_MANIFEST = "_manifest.json"
MODEL_FILE = "model.keras"  # the published model, in a train output


def stage_dir(root: str, stage: str, fingerprint: str) -> str:
    return join(root, stage, fingerprint)


def class_names(label_names: list[str] | None, num_classes: int) -> list[str]:
    """The dataset's label names, or the class indices as text when it has none."""
    return list(label_names) if label_names else [str(i) for i in range(num_classes)]


def read_manifest(directory: str) -> dict | None:
    """The manifest of a published output, or None when it is missing, incomplete, or (on an object store)
    names a file that is not there with its size."""
    try:
        manifest = storage.read_json(join(directory, MANIFEST))
    except (FileNotFoundError, ValueError, OSError):
        return None
    if not (isinstance(manifest, dict) and manifest.get("complete") is True):
        return None
    listed = manifest.get("files")
    if listed is not None and not is_local(directory):
        present = storage.files_under(directory)
        if any(present.get(name) != size for name, size in listed.items()):
            return None
    return manifest


def find_published(root: str, stage: str, fingerprint: str) -> dict | None:
    return read_manifest(stage_dir(root, stage, fingerprint))


def published_outputs(root: str, stage: str) -> list[tuple[str, dict]]:
    """(directory, manifest) of every published output of a stage (temporary and work dirs left out)."""
    found = []
    for name in storage.listdir(join(root, stage)):
        manifest = None if name.startswith(".") else read_manifest(join(root, stage, name))
        if manifest is not None:
            found.append((join(root, stage, name), manifest))
    return found


def publish(root: str, stage: str, fingerprint: str, write: Callable[[str], dict], replace: bool = False) -> dict:
    """Run `write(tmp_dir)`, which fills a local directory and returns the manifest body, then publish it.
    `replace` removes a published output of the same fingerprint first (one that failed verification).

    On any failure the temporary directory is removed and directories this call created are pruned, so a failed
    stage leaves nothing behind under the root.
    """
    if not is_local(root):
        return _publish_to_store(root, stage, fingerprint, write)
    created = [d for d in (root, join(root, stage)) if not os.path.exists(d)]
    final = stage_dir(root, stage, fingerprint)
    tmp = join(root, stage, f".tmp-{fingerprint[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        manifest = _manifest(write(tmp), stage, fingerprint)
        storage.write_json(join(tmp, MANIFEST), manifest)  # last: it marks the directory complete
        if os.path.exists(final):
            if read_manifest(final) is not None and not replace:  # another run published the same content first
                shutil.rmtree(tmp)
                return read_manifest(final)
            # A leftover without a complete manifest, or the output a rebuild replaces: swapped with the new one in
            # one step, so readers see one whole output or the other, then deleted. Where the filesystem cannot
            # swap: moved aside and the new one renamed in (for an instant, no output).
            if storage.exchange(tmp, final):
                shutil.rmtree(tmp, ignore_errors=True)
                return manifest
            old = f"{tmp}-replaced"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
            return manifest
        os.rename(tmp, final)
        return manifest
    except BaseException:
        remove_tree(tmp)
        storage.prune_empty(*reversed(created))
        raise


def _manifest(body: dict, stage: str, fingerprint: str) -> dict:
    return {**body, "stage": stage, "fingerprint": fingerprint, "created": time.time(), "complete": True}


def _publish_to_store(root: str, stage: str, fingerprint: str, write: Callable[[str], dict]) -> dict:
    """Object stores: write locally, upload the files under the final prefix, create the manifest last."""
    final = stage_dir(root, stage, fingerprint)
    with tempfile.TemporaryDirectory(prefix=f"tfpipe-{stage}-") as tmp:
        manifest = _manifest(write(tmp), stage, fingerprint)
        manifest["files"] = {os.path.relpath(os.path.join(d, f), tmp).replace(os.sep, "/"): os.path.getsize(os.path.join(d, f))
                             for d, _, names in os.walk(tmp) for f in names}
        storage.remove(final)  # what a dead attempt left, or an output that failed verification (we hold the lease)
        storage.upload(tmp, final)
        try:
            storage.write_json(join(final, MANIFEST), manifest, create_only=True)
        except FileExistsError:  # another run committed first: theirs stands
            return read_manifest(final) or manifest
    return manifest


@dataclass
class Published:
    """A stage output in the store: where, its manifest, and whether this call reused it."""

    uri: str
    manifest: dict
    cache_hit: bool


def reuse_or_publish(root: str, stage: str, fingerprint: str, write: Callable[[str], dict],
                     verify: Callable[[str, dict], None] | None = None, rebuild: bool = False) -> Published:
    """The one reuse-or-publish path of every stage: the published output of `fingerprint` when there is one,
    else `write` it into a temporary directory and publish that, holding the fingerprint's lease meanwhile (a
    concurrent run of the same work waits, then reuses it). `verify` raises CorruptArtifact when a published
    output cannot be trusted: it is then rebuilt, with a warning. `rebuild` (--rerun) writes a new output even
    when one is published, and it replaces the old one."""
    from tasks.lease import stage_lease

    uri = stage_dir(root, stage, fingerprint)
    manifest = None if rebuild else _trusted(uri, find_published(root, stage, fingerprint), verify)
    if manifest is not None:
        return Published(uri, manifest, cache_hit=True)
    try:
        with stage_lease(root, stage, fingerprint):
            published = find_published(root, stage, fingerprint)  # another run may have published it meanwhile
            manifest = None if rebuild else _trusted(uri, published, verify)
            if rebuild and published is not None:
                log.info("--rerun %s: rebuilding %s; the new output replaces it", stage, uri)
            if manifest is not None:
                return Published(uri, manifest, cache_hit=True)
            remove_dead_attempts(root, stage, fingerprint)
            return Published(uri, publish(root, stage, fingerprint, write, replace=published is not None), False)
    except Exception as exc:  # OSError, and TensorFlow's I/O errors (tf.errors.OpError)
        translated = None if isinstance(exc, PipelineError) else environment_error(exc, f"writing the {stage} output under {root}")
        if translated is None:
            raise
        raise translated from None


def _trusted(uri: str, manifest: dict | None, verify: Callable[[str, dict], None] | None) -> dict | None:
    if manifest is None or verify is None:
        return manifest
    try:
        verify(uri, manifest)
    except CorruptArtifact as exc:
        log.warning("%s: it is derived data, rebuilding it", exc)
        return None
    return manifest


def remove_dead_attempts(root: str, stage: str, fingerprint: str) -> None:
    """Temporary directories of earlier attempts at this output (local roots). Called under its lease: whoever
    wrote them is gone (killed before it could clean up)."""
    if not is_local(root):
        return  # object stores: the attempt wrote under the final prefix, which publish clears
    prefix = f".tmp-{fingerprint[:16]}-"
    for name in storage.listdir(join(root, stage)):
        if name.startswith(prefix):
            log.info("removing %s, left by an attempt that did not finish", join(root, stage, name))
            remove_tree(join(root, stage, name))


def remove_tree(path: str) -> None:
    if is_local(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        storage.remove(path)


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
    image_format: dict = {}  # how ingest made the images one shape (tasks/decoding.py ImageFormat.settings)
    encoding: str = "raw"  # how the records hold the pixels: raw, png or jpeg (data.cache_encoding)


class ModelArtifact(ArtifactRef):
    dataset_fingerprint: str
    model_path: str
    saved_model_path: str | None = None  # None when export.formats leaves the SavedModel out
    parameters: int | None = None  # None: a model published before manifests counted them
    init_from: dict | None = None  # train.init_from: the published model the weights started from
    exports: dict[str, dict] = {}  # format -> path, settings and parity figures (tasks/export.py)
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
    drift: bool | None = None  # inputs unlike the model's data (tasks/drift.py); None: too few images to judge
    drift_path: str | None = None

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)


# ---------------------------------------------------------------- local copies of what lives in a bucket

def local_dataset(dataset: DatasetArtifact, cache_dir: str) -> DatasetArtifact:
    """The dataset with its shards on local disk, where tf.data reads them: the artifact itself on a local root;
    from a bucket, copies in `cache_dir` (`artifacts.local_cache`), each verified by its sha256 and reused by
    later runs while it still matches."""
    if is_local(dataset.uri):
        return dataset
    manifest = read_manifest(dataset.uri)
    if manifest is None:
        raise PipelineError(f"{dataset.uri} is not a published dataset (no complete manifest): re-run ingest")
    local = os.path.join(os.path.expanduser(cache_dir), "ingest", dataset.fingerprint)
    staged, started = 0, time.perf_counter()
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            path = os.path.join(local, shard["file"])
            if os.path.exists(path) and storage.sha256(path) == shard["sha256"]:
                continue
            storage.download(join(dataset.uri, shard["file"]), path)
            staged += 1
            if storage.sha256(path) != shard["sha256"]:
                os.remove(path)
                raise CorruptArtifact(f"shard {join(dataset.uri, shard['file'])} fails its sha256 check: re-run ingest "
                                      "(tfpipe ingest) to rebuild the dataset")
    if staged:
        log.info("staged %d shard(s) of %s into %s in %.2fs", staged, dataset.uri, local, time.perf_counter() - started)
    return dataset.model_copy(update={"uri": local})


def local_file(path: str, cache_dir: str) -> str:
    """A local copy of a file in a bucket (a model TensorFlow or Keras must open), or the path itself."""
    if is_local(path):
        return path
    digest = storage.sha256_text(path)
    local = os.path.join(os.path.expanduser(cache_dir), "files", digest[:24], path.rsplit("/", 1)[-1])
    if not os.path.exists(local):
        storage.download(path, local)
    return local
