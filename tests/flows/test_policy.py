"""The served-call policy: normalised paths, fixed keys, allowed overrides (no Prefect needed)."""

import json
import os

import pytest

from flows.policy import POLICY_ENV, ServePolicy, served_call
from tasks.errors import PipelineError
from tests.conftest import make_config


@pytest.fixture
def policy(tmp_path, monkeypatch):
    root, data = tmp_path / "artifacts", tmp_path / "data"
    data.mkdir()
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", data / "link")
    cfg = make_config(root, f"serve.allowed_inputs=[{data}, s3://inbox/uploads]",
                      f"serve.allowed_outputs=[{data}]")
    served = ServePolicy.of(cfg, None, {"artifacts.root": str(root), "train.batch_size": 64})
    monkeypatch.setenv(POLICY_ENV, served.to_env())
    return tmp_path


def test_paths_must_lie_under_the_allowed_places(policy):
    data, root = policy / "data", policy / "artifacts"
    served_call(None, None, model="champion", input=str(data / "x.parquet"), output=str(root / "p.parquet"))
    served_call(None, None, input="s3://inbox/uploads/a/b.parquet", output=str(data / "sub" / "p.parquet"))
    served_call(None, None, input="cache:abc123/test", output=str(data / "p.parquet"))
    refused = {
        "input": [str(data / ".." / "outside" / "x.parquet"), str(data / "link" / "x.parquet"), "/etc/hostname",
                  "s3://inbox/uploads/../secrets/x.parquet", "s3://inbox/uploads-other/x.parquet", "s3://other/x"],
        "output": ["/tmp/elsewhere.parquet", str(data / ".." / "p.parquet"), str(data / "link" / "p.parquet")],
        "model": ["/tmp/some/model.keras", str(data / "model")],
    }
    for name, values in refused.items():
        for value in values:
            with pytest.raises(PipelineError) as caught:
                served_call(None, None, **{"input": str(data / "x.parquet"), "output": str(data / "p.parquet"),
                                           "model": "champion", name: value})
            message = str(caught.value)
            assert message.startswith(f"served run refused: parameter {name}={value!r} is outside the allowed places (")
            assert "\n" not in message


def test_overrides_and_config_file(policy):
    root = str(policy / "artifacts")
    config_file, overrides = served_call(None, {"train.epochs": 2, "artifacts.root": root})
    assert config_file is None
    assert overrides == {"artifacts.root": root, "train.batch_size": 64, "train.epochs": 2}
    for bad, word in [({"artifacts.root": "/tmp/x"}, "artifacts.root, which a caller cannot change"),
                      ({"serve.allowed_inputs": ["/"]}, "serve.allowed_inputs, which a caller cannot change"),
                      ({"data.source": "npz:/etc/passwd"}, "data.source; callers may set only train.epochs, data.limit"),
                      ({"train": {"epochs": 1}}, "sets train; callers may set only")]:
        with pytest.raises(PipelineError, match=word):
            served_call(None, bad)
    with pytest.raises(PipelineError, match="parameter config_file cannot be set by a caller"):
        served_call(str(policy / "my.yaml"), None)


def test_every_served_flow_parameter_goes_through_the_policy(policy):
    """A caller cannot force rebuilds (rerun) or predict with a model the gate refused (allow_unblessed), and a
    flow parameter the policy has no rule for cannot be passed at all."""
    import inspect

    from flows.policy import PARAMETER_RULES
    from flows.prediction import batch_prediction
    from flows.training import training_pipeline

    for served in (training_pipeline, batch_prediction):
        names = set(inspect.signature(served.fn).parameters) - {"config_file", "overrides"}
        assert names <= set(PARAMETER_RULES), names - set(PARAMETER_RULES)
    for name, value in [("rerun", "all"), ("rerun", "train"), ("allow_unblessed", True)]:
        with pytest.raises(PipelineError) as caught:
            served_call(None, None, **{name: value})
        assert str(caught.value).startswith(f"served run refused: parameter {name}={value!r} cannot be set by a caller")
    assert served_call(None, None, rerun=None, allow_unblessed=False, overwrite=True)[0] is None
    with pytest.raises(TypeError, match="no rule for flow parameter"):
        served_call(None, None, retries=3)


def test_a_served_training_run_refuses_rerun_before_any_work(policy, prefect_server):
    from flows.training import training_pipeline

    state = training_pipeline(rerun="all", return_state=True)
    assert state.is_failed()
    assert state.message.endswith("served run refused: parameter rerun='all' cannot be set by a caller (a served run "
                                  "reuses published outputs; rebuild with tfpipe run --rerun on the serving side)")
    assert not (policy / "artifacts").exists()


def test_no_policy_outside_serve(monkeypatch):
    monkeypatch.delenv(POLICY_ENV, raising=False)
    assert served_call("/any.yaml", {"artifacts.root": "/x"}, input="/etc/hostname", output="/tmp/x") == (
        "/any.yaml", {"artifacts.root": "/x"})


def test_serve_prints_the_policy_for_a_work_pool(tmp_path):
    import flows.deployments  # noqa: F401  (Prefect sets up its logging here, not inside the captured CLI run)
    from tests.conftest import invoke_cli

    code, out, _ = invoke_cli("serve", "--print-policy", "--set", f"artifacts.root={tmp_path}",
                              "--set", "serve.allowed_overrides=[train.epochs]")
    policy = ServePolicy(**json.loads(out))
    assert code == 0 and policy.root == str(tmp_path) and policy.allowed_overrides == ["train.epochs"]
    assert policy.overrides["artifacts.root"] == str(tmp_path)
