"""Device set-up, strategies and the mixed-precision policy (tasks/distributed/devices.py, tasks/model/precision.py), and training in each precision."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from tasks.data.ingest import ingest
from tasks.distributed.devices import make_strategy
from tasks.errors import PipelineError
from tasks.model.precision import HardwareProbe, resolve_precision
from tasks.model.published import load_model
from tasks.train.optimization import make_optimizer
from tasks.train.stage import train
from tests.conftest import REPO, make_config


@pytest.mark.parametrize("probe, expected", [
    (HardwareProbe({"avx2", "avx512_bf16"}, []), "mixed_bfloat16"),
    (HardwareProbe({"avx2", "amx_bf16", "amx_tile"}, []), "mixed_bfloat16"),
    (HardwareProbe({"avx2", "avx512f"}, []), "float32"),
    (HardwareProbe(set(), [(8, 0)]), "mixed_bfloat16"),
    (HardwareProbe(set(), [(9, 0), (8, 6)]), "mixed_bfloat16"),
    (HardwareProbe({"avx512_bf16"}, [(7, 5)]), "mixed_float16"),   # the GPUs train, not the CPU
    (HardwareProbe(set(), [(8, 0), (7, 0)]), "mixed_float16"),     # the weakest GPU decides
    (HardwareProbe(set(), [(6, 1)]), "float32"),
])
def test_auto_precision_follows_the_hardware(probe, expected):
    policy, reason = resolve_precision("auto", probe)
    assert policy == expected and reason.startswith("auto: ")


def test_explicit_precision_wins():
    assert resolve_precision("float32", HardwareProbe({"avx512_bf16"}, [])) == ("float32", "train.precision=float32 set in config")


def onednn_has_bf16() -> bool:
    """An oracle independent of tfpipe's rule: the instruction set oneDNN itself reports for this CPU."""
    script = "import tensorflow as tf; tf.nn.conv2d(tf.ones([1, 4, 4, 1]), tf.ones([2, 2, 1, 1]), 1, 'SAME')"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "ONEDNN_VERBOSE": "1", "CUDA_VISIBLE_DEVICES": ""})
    isa = [line for line in (proc.stdout + proc.stderr).splitlines() if ",isa:" in line]
    assert isa, "oneDNN printed no isa line"
    return "bfloat16" in isa[0].lower() or "amx" in isa[0].lower()


def test_tfpipe_train_logs_the_precision_auto_picks_on_this_machine(tmp_path):
    """The issue's done-when, through the real entry point: on a CPU with AVX512_BF16 (this machine and CI),
    `tfpipe train` logs mixed_bfloat16 chosen by `auto`, and the ModelArtifact records it with the reason. GPUs
    are hidden from the run: their branches are covered by the injected probes above."""
    expected = "mixed_bfloat16" if onednn_has_bf16() else "float32"
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "train", "--json", "--set", f"artifacts.root={tmp_path}",
                           "--set", "data.limit=300", "--set", "train.epochs=1", "--set", "train.batch_size=32"],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # the CPU branch, GPU or not
    assert proc.returncode == 0, proc.stderr[-2000:]
    artifact = json.loads(proc.stdout)
    assert artifact["precision"] == expected and artifact["precision_reason"].startswith("auto: ")
    assert f"tfpipe.train: precision {expected} ({artifact['precision_reason']});" in proc.stderr


def test_strategies(tmp_path):
    cfg = make_config(tmp_path, "train.strategy=mirrored", "train.devices=['/cpu:0', '/cpu:1']")
    assert make_strategy(cfg.train).num_replicas_in_sync == 2
    assert make_strategy(make_config(tmp_path, "train.strategy=one_device").train).num_replicas_in_sync == 1
    assert make_strategy(make_config(tmp_path).train).num_replicas_in_sync == 1  # auto, no GPU: one device
    with pytest.raises(PipelineError, match="'/gpu:3' does not exist"):
        make_strategy(make_config(tmp_path, "train.strategy=mirrored", "train.devices=['/gpu:3']").train)
    with pytest.raises(PipelineError, match="cpu_replicas=3 but only 2 CPU device"):
        make_strategy(make_config(tmp_path, "train.cpu_replicas=3").train)


# fp16 in both styles (each scales the loss its own way); float32 and bf16 in one style each
@pytest.mark.parametrize("precision, mode", [("float32", "fit"), ("mixed_bfloat16", "custom"),
                                             ("mixed_float16", "fit"), ("mixed_float16", "custom")])
def test_each_precision_trains_under_two_replicas(tmp_path, precision, mode):
    cfg = make_config(tmp_path, "data.limit=160", "train.cpu_replicas=2", "train.batch_size=32", "train.epochs=1",
                      f"train.mode={mode}", f"train.precision={precision}")
    artifact = train(cfg, ingest(cfg.data, cfg.artifacts.root))
    assert artifact.replicas == 2 and np.isfinite(artifact.final_metrics["loss"])
    model = load_model(f"{artifact.uri}/model.keras")
    hidden = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)][0]
    compute = {"float32": "float32", "mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}[precision]
    assert hidden.compute_dtype == compute and hidden.kernel.dtype == "float32"  # the body computes in it ...
    assert hidden(np.zeros((1, 28, 28, 1), np.float32)).dtype == compute
    assert model.layers[-1].dtype_policy.name == "float32"  # ... the softmax in float32
    out = model(np.zeros((2, 28, 28, 1), np.float32))
    assert out.dtype == "float32"
    scaled = isinstance(make_optimizer(cfg, precision), keras.optimizers.LossScaleOptimizer)
    assert scaled == (precision == "mixed_float16")  # fp16 gradients need loss scaling, bf16 and fp32 do not


def test_bf16_model_loads_and_predicts_in_a_float32_only_process(tmp_path):
    cfg = make_config(tmp_path, "data.limit=160", "train.batch_size=32", "train.epochs=1", "train.precision=mixed_bfloat16",
                      "export.formats=[saved_model]")
    artifact = train(cfg, ingest(cfg.data, cfg.artifacts.root))
    x = np.random.default_rng(0).integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)  # the pixels a client has
    expected = load_model(f"{artifact.uri}/model.keras").predict(x, verbose=0)
    np.save(tmp_path / "x.npy", x)
    script = f"""
import json, numpy as np, keras, tensorflow as tf
assert keras.config.dtype_policy().name == "float32"
x = np.load("{tmp_path}/x.npy")
model = keras.saving.load_model("{artifact.uri}/model.keras", compile=False, safe_mode=True)
y = model.predict(x, verbose=0)
served = tf.saved_model.load("{artifact.uri}/saved_model")
fn = served.signatures["serving_default"]
spec = list(fn.structured_input_signature[1].values())[0]
out = fn(images=tf.constant(x))["probabilities"]
print(json.dumps({{"y": y.tolist(), "dtype": str(y.dtype), "input": spec.dtype.name, "output": out.dtype.name,
                  "served": out.numpy().tolist()}}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["dtype"] == "float32" and result["input"] == "uint8" and result["output"] == "float32"
    np.testing.assert_allclose(np.array(result["y"]), expected, atol=1e-6)
    np.testing.assert_allclose(np.array(result["served"]), expected, atol=1e-2)


def test_predict_can_recast_the_model(trained, tmp_path):
    from tasks.model.precision import with_dtype_policy

    _, _, artifact = trained
    model = load_model(f"{artifact.uri}/model.keras")
    bf16 = with_dtype_policy(model, "mixed_bfloat16")
    f32 = with_dtype_policy(model, "float32")
    x = np.random.default_rng(1).integers(0, 256, (64, 28, 28, 1), dtype=np.uint8)
    assert bf16.layers[1].dtype_policy.name == "mixed_bfloat16" and bf16.layers[-1].dtype_policy.name == "float32"
    assert f32.layers[1].dtype_policy.name == "float32"
    p16, p32 = bf16.predict(x, verbose=0), f32.predict(x, verbose=0)
    assert p16.dtype == np.float32 and np.abs(p16 - p32).max() < 0.05
