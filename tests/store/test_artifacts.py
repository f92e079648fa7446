import json
import os

import pytest

from tasks.store.publish import MANIFEST, find_published, publish, read_manifest


def test_publish_writes_manifest_last_and_renames(tmp_path):
    root = str(tmp_path / "root")
    seen = {}

    def write(tmp):
        seen["tmp"] = tmp
        assert not os.path.exists(os.path.join(tmp, MANIFEST))
        with open(os.path.join(tmp, "data.txt"), "w") as f:
            f.write("hello")
        return {"answer": 42}

    manifest = publish(root, "stage", "abc", write)
    assert manifest["complete"] is True and manifest["answer"] == 42 and manifest["fingerprint"] == "abc"
    assert not os.path.exists(seen["tmp"])  # renamed away
    assert open(tmp_path / "root/stage/abc/data.txt").read() == "hello"
    assert find_published(root, "stage", "abc")["answer"] == 42


def test_failed_write_leaves_nothing_behind(tmp_path):
    root = tmp_path / "root"

    def write(tmp):
        open(os.path.join(tmp, "partial"), "w").close()
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        publish(str(root), "stage", "abc", write)
    assert not root.exists()


def test_directory_without_complete_manifest_is_not_reused(tmp_path):
    root = tmp_path / "root"
    stale = root / "stage" / "abc"
    stale.mkdir(parents=True)
    (stale / "junk").write_text("from a crashed run")
    assert find_published(str(root), "stage", "abc") is None
    (stale / MANIFEST).write_text(json.dumps({"complete": False}))
    assert read_manifest(str(stale)) is None
    (stale / MANIFEST).write_text("{not json")
    assert read_manifest(str(stale)) is None
    publish(str(root), "stage", "abc", lambda tmp: {"fresh": True})
    assert not (stale / "junk").exists()
    assert find_published(str(root), "stage", "abc")["fresh"] is True


def test_a_full_disk_gives_one_line_and_publishes_nothing(tmp_path):
    """The artifact root on a small tmpfs (a private mount namespace): ingest that does not fit, then training
    whose checkpoints do not fit. Each fails with one line, exit 1, and nothing published."""
    import subprocess
    import sys

    from tests.conftest import REPO

    root = tmp_path / "small"
    root.mkdir()
    tfpipe = f"{sys.executable} -m flows.cli"
    script = (f"mount -t tmpfs -o size=200k none {root} && {tfpipe} ingest --set artifacts.root={root} "
              f"--set data.limit=300; echo ingest-exit $?; echo left:$(ls -A {root}); umount {root}; "
              f"mount -t tmpfs -o size=1m none {root} && {tfpipe} train --set artifacts.root={root} "
              f"--set data.limit=300 --set train.epochs=1; echo train-exit $?; find {root} -name manifest.json")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    out, err = proc.stdout.splitlines(), [line for line in proc.stderr.splitlines() if line.startswith("tfpipe: ")]
    assert "ingest-exit 1" in out and "train-exit 1" in out, proc.stdout + proc.stderr[-3000:]
    assert "left:" in out  # the refused ingest left the root as it found it: empty, no .leases/ either
    for stage, line in zip(("ingest", "train"), err, strict=True):
        assert line == (f"tfpipe: error: no space left on the device while writing the {stage} output under {root}: "
                        "free space there, or point artifacts.root (TFPIPE_ARTIFACTS) at a larger disk; nothing "
                        "partial was published")
    assert "Traceback" not in proc.stderr
    manifests = [line for line in out if line.endswith("manifest.json")]
    assert len(manifests) == 1 and "/ingest/" in manifests[0]  # the second mount's ingest fitted; no model


def test_a_rerun_removes_temporary_dirs_of_killed_attempts(tmp_path):
    from tasks.store.publish import reuse_or_publish

    root = tmp_path / "root"
    dead = [root / "stage" / f".tmp-{'a' * 16}-{pid}-0000" for pid in (11, 12)]
    for d in dead:
        d.mkdir(parents=True)
        (d / "partial").write_text("left by a killed run")
    other = root / "stage" / f".tmp-{'b' * 16}-13-0000"  # another fingerprint's attempt: not ours to judge
    other.mkdir()
    published = reuse_or_publish(str(root), "stage", "a" * 64, lambda tmp: {"fresh": True})
    assert not published.cache_hit and published.manifest["fresh"] is True
    assert not any(d.exists() for d in dead) and other.exists()


def test_a_rebuild_swaps_the_new_output_in_without_an_instant_of_none(tmp_path, monkeypatch):
    """--rerun replaces a published output: a reader at any moment finds the old output or the new one, whole."""
    from tasks.store import storage

    root = str(tmp_path / "root")

    def write(text):
        def fill(tmp):
            with open(os.path.join(tmp, "data.txt"), "w") as f:
                f.write(text)
            return {"text": text}
        return fill

    publish(root, "stage", "abc", write("old"))
    final = os.path.join(root, "stage", "abc")
    readers_saw = []

    def then_read(step):  # after each step that moves directories, a reader looks at the output
        def wrapped(*args, **kwargs):
            result = step(*args, **kwargs)
            readers_saw.append(read_manifest(final))
            return result
        return wrapped

    for name in ("rename", "replace", "rmdir"):
        monkeypatch.setattr(os, name, then_read(getattr(os, name)))
    monkeypatch.setattr(storage, "exchange", then_read(storage.exchange))
    assert publish(root, "stage", "abc", write("new"), replace=True)["text"] == "new"
    assert readers_saw and all(m is not None for m in readers_saw), readers_saw
    assert open(os.path.join(final, "data.txt")).read() == "new" and read_manifest(final)["text"] == "new"
    assert os.listdir(os.path.join(root, "stage")) == ["abc"]  # the old output is gone


def test_exchange_swaps_two_directories(tmp_path):
    from tasks.store.storage import exchange

    for side in ("a", "b"):
        (tmp_path / side).mkdir()
        (tmp_path / side / f"from-{side}").touch()
    assert exchange(str(tmp_path / "a"), str(tmp_path / "b"))
    assert os.listdir(tmp_path / "a") == ["from-b"] and os.listdir(tmp_path / "b") == ["from-a"]
    with pytest.raises(FileNotFoundError):
        exchange(str(tmp_path / "a"), str(tmp_path / "missing"))
