"""`tfpipe gc`: removes what no run needs, keeps what a champion or a live run needs."""

import os
import time

from tasks.data.ingest import ingest
from tasks.evaluate.stage import evaluate
from tasks.train.stage import train
from tests.conftest import invoke_cli, make_config


def test_gc_dry_run_lists_and_gc_removes_only_what_nobody_needs(tmp_path):
    root = tmp_path / "artifacts"
    sets = ["data.limit=200", "train.epochs=1", "train.batch_size=50", "evaluate.min_accuracy=0.0",
            "artifacts.keep_last=1"]
    old_dataset = ingest(make_config(root, *sets, "data.limit=100").data, str(root))  # older, no model uses it
    time.sleep(0.05)
    cfg = make_config(root, *sets)
    dataset = ingest(cfg.data, cfg.artifacts.root)
    champion = train(cfg, dataset)
    assert evaluate(cfg, dataset, champion).blessed
    time.sleep(0.05)
    newer = [train(make_config(root, *sets, f"train.seed={seed}"), dataset) for seed in (1, 2)]  # not evaluated
    dead_tmp = root / "train" / f".tmp-{newer[0].fingerprint[:16]}-999999-deadbeef"
    dead_tmp.mkdir()
    (dead_tmp / "partial").write_bytes(b"x" * 1000)
    stale_work = root / "train" / (".work-" + "e" * 64)
    stale_work.mkdir()
    (stale_work / "history.json").write_text("{}")
    old = time.time() - 48 * 3600
    os.utime(stale_work / "history.json", (old, old))
    os.utime(stale_work, (old, old))
    fresh_work = root / "train" / (".work-" + "d" * 64)  # a run in progress an hour ago: resumable, kept
    fresh_work.mkdir()
    (fresh_work / "history.json").write_text("{}")

    args = ["gc", "--set", f"artifacts.root={root}", "--set", "artifacts.keep_last=1"]
    code, out, err = invoke_cli(*args, "--dry-run")
    assert code == 0, err
    assert dead_tmp.exists() and stale_work.exists()  # a dry run removes nothing
    listed = {line.split()[2] for line in out.splitlines() if line.startswith("would remove ")}
    expected = {str(dead_tmp), str(stale_work), newer[0].uri, old_dataset.uri}
    leases = {str(p) for p in (root / ".leases").glob("*.lock")}
    assert listed == expected | leases, (listed, expected)
    assert champion.uri not in listed and newer[1].uri not in listed and dataset.uri not in listed
    assert str(fresh_work) not in listed
    assert out.strip().splitlines()[-1].startswith("would free ")

    code, out, err = invoke_cli(*args)
    assert code == 0, err
    assert not dead_tmp.exists() and not stale_work.exists() and not os.path.exists(newer[0].uri)
    assert fresh_work.exists() and os.path.exists(champion.uri) and os.path.exists(newer[1].uri)
    assert os.path.exists(dataset.uri) and not os.path.exists(old_dataset.uri)
    assert not list((root / ".leases").glob("*"))
    code, out, _ = invoke_cli(*args, "--dry-run")
    assert out.strip().splitlines() == [f"would free 0.0 MB in 0 item(s) under {root}"]


def test_gc_after_promoting_a_model_that_was_never_evaluated(tmp_path):
    """`tfpipe promote` of a model without an evaluation records evaluation_uri None: gc keeps that model (the
    champion), its dataset and the newest model, and removes the model nobody needs."""
    root = tmp_path / "artifacts"
    sets = ["data.limit=200", "train.epochs=1", "train.batch_size=50", "artifacts.keep_last=1"]
    cfg = make_config(root, *sets)
    dataset = ingest(cfg.data, cfg.artifacts.root)
    chosen = train(cfg, dataset)
    time.sleep(0.05)
    other = [train(make_config(root, *sets, f"train.seed={seed}"), dataset) for seed in (1, 2)]  # newer
    code, _, err = invoke_cli("promote", chosen.fingerprint, "--reason", "no evaluation yet", "--set", f"artifacts.root={root}")
    assert code == 0, err
    code, out, err = invoke_cli("gc", "--set", f"artifacts.root={root}", "--set", "artifacts.keep_last=1")
    assert code == 0, err + out
    assert (root / "train" / chosen.fingerprint).exists() and (root / "ingest" / dataset.fingerprint).exists()
    assert (root / "train" / other[1].fingerprint).exists() and not (root / "train" / other[0].fingerprint).exists()
