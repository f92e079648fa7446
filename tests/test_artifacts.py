import json
import os

import pytest

from tasks.artifacts import MANIFEST, find_published, publish, read_manifest


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
