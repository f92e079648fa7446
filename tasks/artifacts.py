"""The artifact store and the typed references the stages hand each other.

Each stage output lives in `<root>/<stage>/<fingerprint>/`. It is written into a temporary sibling
directory, `manifest.json` is written last, and the directory is published by one rename. A directory
without a complete manifest is never reused. File operations go through `tf.io.gfile`, so a `gs://` root is
the natural extension (object stores do not rename directories atomically: that is the work left there).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict

from tasks.errors import CorruptArtifact, PipelineError, environment_error

log = logging.getLogger("tfpipe.artifacts")

MANIFEST = "manifest.json"


def _gfile():
    import tensorflow as tf  # imported late: config errors must not wait for TensorFlow

    return tf.io.gfile


def join(*parts: str) -> str:
    return "/".join([parts[0].rstrip("/")] + [p.strip("/") for p in parts[1:]])


def is_local(path: str) -> bool:
    return "://" not in path


def stage_dir(root: str, stage: str, fingerprint: str) -> str:
    return join(root, stage, fingerprint)


def class_names(label_names: list[str] | None, num_classes: int) -> list[str]:
    """The dataset's label names, or the class indices as text when it has none."""
    return list(label_names) if label_names else [str(i) for i in range(num_classes)]


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with _gfile().GFile(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def read_json(path: str) -> Any:
    with _gfile().GFile(path, "r") as f:
        return json.load(f)


def write_json_atomic(path: str, value: Any) -> None:
    """Write JSON next to `path` and rename it over `path`: readers see the old or the new file, whole."""
    gfile = _gfile()
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with gfile.GFile(tmp, "w") as f:
        f.write(json.dumps(value, indent=2, sort_keys=True))
    gfile.rename(tmp, path, overwrite=True)


def read_manifest(directory: str) -> dict | None:
    """The manifest of a published directory, or None when it is missing or incomplete."""
    path = join(directory, MANIFEST)
    gfile = _gfile()
    if not gfile.exists(path):
        return None
    try:
        manifest = read_json(path)
    except (ValueError, OSError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("complete") is True else None


def find_published(root: str, stage: str, fingerprint: str) -> dict | None:
    return read_manifest(stage_dir(root, stage, fingerprint))


def publish(root: str, stage: str, fingerprint: str, write: Callable[[str], dict], replace: bool = False) -> dict:
    """Run `write(tmp_dir)`, which fills the directory and returns the manifest body, then publish. `replace`
    removes a published output of the same fingerprint first (one that failed verification).

    On any failure the temporary directory is removed and directories this call created are pruned, so
    a failed stage leaves nothing behind under the root.
    """
    gfile = _gfile()
    created = [d for d in (root, join(root, stage)) if not gfile.exists(d)]
    final = stage_dir(root, stage, fingerprint)
    tmp = join(root, stage, f".tmp-{fingerprint[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    gfile.makedirs(tmp)
    try:
        body = write(tmp)
        manifest = {**body, "stage": stage, "fingerprint": fingerprint, "created": time.time(), "complete": True}
        write_json_atomic(join(tmp, MANIFEST), manifest)  # last: it marks the directory complete
        if gfile.exists(final):
            if read_manifest(final) is not None and not replace:  # another run published the same content first
                gfile.rmtree(tmp)
                return read_manifest(final)
            gfile.rmtree(final)  # a leftover without a complete manifest is never reused
        gfile.rename(tmp, final)
        return manifest
    except BaseException:
        remove_tree(tmp)
        prune_empty(*reversed(created))
        raise


@dataclass
class Published:
    """A stage output in the store: where, its manifest, and whether this call reused it."""

    uri: str
    manifest: dict
    cache_hit: bool


def reuse_or_publish(root: str, stage: str, fingerprint: str, write: Callable[[str], dict],
                     verify: Callable[[str, dict], None] | None = None) -> Published:
    """The one reuse-or-publish path of every stage: the published output of `fingerprint` when there is one,
    else `write` it into a temporary directory and publish that, holding the fingerprint's lease meanwhile (a
    concurrent run of the same work waits, then reuses it). `verify` raises CorruptArtifact when a published
    output cannot be trusted: it is then rebuilt, with a warning."""
    from tasks.lease import stage_lease

    uri = stage_dir(root, stage, fingerprint)
    manifest = _trusted(uri, find_published(root, stage, fingerprint), verify)
    if manifest is not None:
        return Published(uri, manifest, cache_hit=True)
    try:
        with stage_lease(root, stage, fingerprint):
            published = find_published(root, stage, fingerprint)  # another run may have published it meanwhile
            manifest = _trusted(uri, published, verify)
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
    """Temporary directories of earlier attempts at this output. Called under its lease: whoever wrote them is
    gone (killed before it could clean up)."""
    gfile = _gfile()
    for leftover in gfile.glob(join(root, stage, f".tmp-{fingerprint[:16]}-*")):
        log.info("removing %s, left by an attempt that did not finish", leftover)
        remove_tree(leftover)


def remove_tree(path: str) -> None:
    gfile = _gfile()
    if gfile.exists(path):
        if is_local(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            gfile.rmtree(path)


def prune_empty(*directories: str) -> None:
    """Remove each directory if it is empty (children first)."""
    for d in directories:
        if is_local(d):
            try:
                os.rmdir(d)
            except OSError:
                pass


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


class ModelArtifact(ArtifactRef):
    dataset_fingerprint: str
    model_path: str
    saved_model_path: str
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
    final_metrics: dict[str, float]
    image_shape: list[int]
    num_classes: int
    label_names: list[str] | None = None
    loss: str


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

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)
