"""Garbage collection of an artifact root: what no run needs any more.

Removed: temporary directories of attempts that did not finish, training work directories nobody resumes
(their model is published, or nobody touched them for `artifacts.stale_work_hours`), lease files nobody holds,
and published outputs beyond the newest `artifacts.keep_last` of each stage that no champion-history entry
needs (a champion's model, its dataset and its evaluation stay). Anything a live run holds the lease of stays.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from pipeline_config import STAGES, ArtifactsConfig
from tasks.store.lease import LEASES, is_held, remove_free_lease
from tasks.store.publish import published_outputs, read_manifest


@dataclass
class Removal:
    path: Path
    bytes: int
    why: str


def size_of(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _held_prefix(root: str, stage: str, prefix: str) -> bool:
    """Whether a live run holds a lease of `stage` whose fingerprint starts with `prefix`."""
    leases = Path(root) / LEASES
    return any(is_held(root, stage, lock.name[len(stage) + 1: -len(".lock")])
               for lock in leases.glob(f"{stage}-{prefix}*.lock"))


def _old_outputs(root: str, keep_last: int, needed: set[str]) -> list[Removal]:
    kept_models = []
    found = []
    for stage in STAGES:
        published = [(manifest.get("created", 0), Path(uri), manifest) for uri, manifest in published_outputs(root, stage)]
        published.sort(key=lambda item: item[0], reverse=True)
        for rank, (_, d, manifest) in enumerate(published):
            if rank < keep_last or d.name in needed:
                if stage == "train":
                    kept_models.append(manifest.get("dataset_fingerprint"))
                continue
            found.append((stage, d))
    keep = needed | set(kept_models)  # a kept model keeps its dataset
    return [Removal(d, size_of(d), f"published {stage} output older than the newest {keep_last}")
            for stage, d in found if d.name not in keep and not _held_prefix(root, stage, d.name)]


def plan(root: str, cfg: ArtifactsConfig, keep: set[str]) -> list[Removal]:
    """What `tfpipe gc` removes under `root`, with sizes and reasons; published outputs whose fingerprints are in
    `keep` stay (what the champions need: tasks/registry/champion.py `needed_by_champions`)."""
    base = Path(root)
    removals = []
    for stage in STAGES:
        for tmp in (base / stage).glob(".tmp-*"):
            prefix = tmp.name.split("-")[1]
            if not _held_prefix(root, stage, prefix):
                removals.append(Removal(tmp, size_of(tmp), "temporary directory of an attempt that did not finish"))
    for work in (base / "train").glob(".work-*"):
        fp = work.name.removeprefix(".work-")
        published = read_manifest(str(base / "train" / fp)) is not None
        idle_hours = (time.time() - max((p.stat().st_mtime for p in work.rglob("*")), default=work.stat().st_mtime)) / 3600
        if not is_held(root, "train", fp) and (published or idle_hours > cfg.stale_work_hours):
            why = "work directory of a published model" if published else f"work directory idle for {idle_hours:.0f} h"
            removals.append(Removal(work, size_of(work), why))
    removals += _old_outputs(root, cfg.keep_last, keep)
    for lock in (base / LEASES).glob("*.lock"):
        stage, _, fp = lock.name.removesuffix(".lock").partition("-")
        if not is_held(root, stage, fp):
            removals.append(Removal(lock, size_of(lock), "lease nobody holds"))
    return removals


def remove(removals: list[Removal]) -> int:
    """Remove what `plan` found; returns the bytes freed."""
    for r in removals:
        if r.path.is_dir():
            shutil.rmtree(r.path, ignore_errors=True)
        elif r.path.suffix == ".lock":
            remove_free_lease(str(r.path))  # as a holder does: never the file a run locked since plan() looked
        else:
            r.path.unlink(missing_ok=True)
    return sum(r.bytes for r in removals)
