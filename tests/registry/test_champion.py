"""The champion registry from the CLI: models, promote, rollback; and --rerun of a stage."""

import json

from tasks.data.ingest import ingest
from tasks.evaluate.stage import evaluate
from tasks.registry.champion import read_champion
from tasks.registry.decisions import user_name
from tasks.train.stage import train
from tests.conftest import MNIST, invoke_cli, make_config

SETS = ["data.limit=300", "train.epochs=1", "train.batch_size=50", "evaluate.min_accuracy=0",
        "evaluate.max_regression=1"]


def predicted_by(root, tmp_path, name: str) -> str:
    code, out, err = invoke_cli("predict", "--input", str(MNIST / "test.parquet"), "--output", str(tmp_path / name),
                                "--set", f"artifacts.root={root}", "--set", "data.limit=300", "--json")
    assert code == 0, err
    return json.loads(out)["model_fingerprint"]


def test_models_promote_and_rollback(root, tmp_path):
    cfg_a, cfg_b = make_config(root, *SETS, "train.seed=1"), make_config(root, *SETS, "train.seed=2")
    dataset = ingest(cfg_a.data, cfg_a.artifacts.root)
    a = train(cfg_a, dataset)
    evaluated_a = evaluate(cfg_a, dataset, a)
    assert evaluated_a.blessed
    b = train(cfg_b, dataset)
    evaluated_b = evaluate(cfg_b, dataset, b)
    assert evaluated_b.champion_after == b.fingerprint
    code, out, _ = invoke_cli("models", "--set", f"artifacts.root={root}", "--json")
    rows = json.loads(out)
    assert code == 0 and [r["fingerprint"] for r in rows] == [b.fingerprint, a.fingerprint]
    assert [r["champion"] for r in rows] == [True, False] and all(r["gate"] == "blessed" for r in rows)
    assert [(r["test_accuracy"], r["macro_f1"]) for r in rows] == [
        (e.metrics["accuracy"], e.metrics["macro_f1"]) for e in (evaluated_b, evaluated_a)]
    assert [r["precision"] for r in rows] == [b.precision, a.precision]
    code, out, _ = invoke_cli("models", "--set", f"artifacts.root={root}")
    assert f"* {b.fingerprint[:12]}" in out and f"  {a.fingerprint[:12]}" in out

    code, out, err = invoke_cli("rollback", "--set", f"artifacts.root={root}")
    assert code == 0 and a.fingerprint in out, err
    assert predicted_by(root, tmp_path, "1.parquet") == a.fingerprint  # prediction follows at once
    champion = read_champion(str(root))
    assert champion["current"]["decision"] == "rollback" and champion["current"]["user"] == user_name()
    assert [h["model_fingerprint"] for h in champion["history"]] == [b.fingerprint, a.fingerprint]
    assert b.fingerprint in champion["demoted"]
    # the gate does not bring a rolled-back model back ...
    rerun = make_config(root, *SETS, "train.seed=2", "rerun=evaluate")
    assert evaluate(rerun, dataset, b).champion_after == a.fingerprint
    # ... a person can, with a reason
    code, out, err = invoke_cli("promote", b.fingerprint[:10], "--reason", "fixes the label-7 drift",
                                "--set", f"artifacts.root={root}")
    assert code == 0, err
    assert predicted_by(root, tmp_path, "2.parquet") == b.fingerprint
    current = read_champion(str(root))["current"]
    assert current["decision"] == "manual" and current["reason"] == "fixes the label-7 drift"
    assert current["user"] == user_name() and current["accuracy"] == evaluated_b.metrics["accuracy"]
    assert current["evaluation_uri"] == evaluated_b.uri and b.fingerprint not in read_champion(str(root))["demoted"]

    code, _, err = invoke_cli("promote", b.fingerprint, "--reason", "again", "--set", f"artifacts.root={root}")
    assert code == 1 and err.strip() == f"tfpipe: error: model {b.fingerprint[:12]} is already the champion"
    code, _, err = invoke_cli("rollback", "--to", "ffff", "--set", f"artifacts.root={root}")
    assert code == 1 and "--to 'ffff' is not a former champion" in err and len(err.strip().splitlines()) == 1
    code, _, err = invoke_cli("promote", "0000", "--reason", "x", "--set", f"artifacts.root={root}")
    assert code == 1 and "matches no model" in err


def test_rerun_train_retrains_while_ingest_stays_a_cache_hit(root, caplog):
    args = ["--set", f"artifacts.root={root}", *[a for s in SETS for a in ("--set", s)], "--json"]
    code, out, err = invoke_cli("train", *args)
    assert code == 0, err
    first = json.loads(out)
    manifest = json.load(open(f"{first['uri']}/manifest.json"))
    caplog.clear()
    code, out, err = invoke_cli("evaluate", *args, "--rerun", "train")
    assert code == 0, err
    logs = caplog.text
    assert "ingest cache hit" in logs and "--rerun train: rebuilding" in logs and "model published" in logs
    again = json.load(open(f"{first['uri']}/manifest.json"))
    assert again["created"] > manifest["created"] and again["fingerprint"] == manifest["fingerprint"]
    assert not [p for p in (root / "train").iterdir() if p.name.startswith(".tmp")]
    code, out, err = invoke_cli("train", *args)  # and without --rerun it is a cache hit again
    assert code == 0 and json.loads(out)["cache_hit"] is True
    code, _, err = invoke_cli("train", *args, "--rerun", "model")
    assert code == 2 and err.startswith("tfpipe: config error: rerun: Input should be")
