"""Local copies of what lives in a bucket: the shards tf.data reads and the model files Keras opens (TensorFlow 2.21
has no S3 filesystem), each verified and reused while it still matches."""

from __future__ import annotations

import logging
import os
import time

from tasks.errors import CorruptArtifact, PipelineError
from tasks.store import storage
from tasks.store.publish import read_manifest
from tasks.store.refs import DatasetArtifact
from tasks.store.storage import is_local, join

log = logging.getLogger("tfpipe.artifacts")


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
