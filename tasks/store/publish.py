"""Publishing a stage's output: the one reuse-or-publish path, the names published files are found by.

Each stage output lives in `<root>/<stage>/<fingerprint>/`, with `manifest.json` written last: the manifest is
the commit, and an output without a complete one is never reused. On a local root the files are written into a
temporary sibling directory that one rename publishes. On an object store (`s3://`, `gs://`: no atomic
directory rename) the files are written locally, uploaded under the final prefix while this run holds the
fingerprint's lease, and the manifest is created last with a conditional create; it lists every file with its
size, and a reader trusts the output only when all of them are there. Every path goes through tasks/store/storage.py.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from typing import Callable

from tasks.errors import CorruptArtifact, PipelineError, environment_error
from tasks.store import storage
from tasks.store.lease import stage_lease
from tasks.store.storage import is_local, join

log = logging.getLogger("tfpipe.artifacts")

# The names every published output is found by, in one place.
MANIFEST = "manifest.json"  # a stage output's commit, written last
# A Dask prediction's directory of parts: the leading underscore makes Parquet dataset readers (pyarrow, Spark,
# Dask) skip it when they read the directory as one table.
PARTS_MANIFEST = "_manifest.json"
MODEL_FILE = "model.keras"  # the published model, in a train output


def stage_dir(root: str, stage: str, fingerprint: str) -> str:
    return join(root, stage, fingerprint)


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
