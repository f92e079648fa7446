"""tfpipe benchmarks: the pipeline against a bare Keras script, stage by stage, measured side by side in one run.

    python -m bench            # full: full MNIST, the default config end to end (~20-30 min on 2 cores)
    python -m bench --quick    # small subsets (~5 min)

Prints a table and writes bench/results/<date>-<host>.json. Every figure is a ratio of two things timed in this
run (or an absolute figure with its target), with the absolute numbers beside it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench import in_fresh_process
from tasks.distributed.cluster import free_port

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
MNIST_TEST = REPO / "data" / "mnist" / "test.parquet"


def worker(name: str, args: dict, env: dict | None = None) -> dict:
    return in_fresh_process("bench.worker", name, args, env)


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    return seconds, proc.stdout


def bare_keras(train_images: int, epochs: int) -> dict:
    _, out = timed([sys.executable, "-m", "bench.bare_keras", "--train-images", str(train_images), "--epochs", str(epochs)])
    return json.loads(out.strip().splitlines()[-1])


def start_prefect_server(home: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": home, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("prefect server did not start")


def s3_flow(run_cmd: list[str], env: dict, work: Path) -> dict:
    """The same cold flow with its artifact root in an S3 bucket (a moto server on loopback)."""
    import re

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    s3_env = {**env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "bench",
              "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        time.sleep(2)
        subprocess.run([sys.executable, "-c", "import boto3; boto3.client('s3').create_bucket(Bucket='bench')"],
                       env={**os.environ, **s3_env}, check=True)
        cmd = [*run_cmd, "--set", "artifacts.root=s3://bench/flow", "--set", f"artifacts.local_cache={work / 's3-cache'}"]
        started = time.perf_counter()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **s3_env})
        seconds = time.perf_counter() - started
        if proc.returncode != 0:
            raise SystemExit(f"the S3 flow failed:\n{proc.stderr[-4000:]}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    staging = sum(float(t) for t in re.findall(r"staged \d+ shard\(s\) of .* in ([0-9.]+)s", proc.stderr))
    return {"seconds": seconds, "staging_seconds": staging}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small subsets, about 5 minutes")
    parser.add_argument("--train-limit", type=int, help="images per split for the training figures")
    parser.add_argument("--epochs", type=int, help="epochs for the training figures")
    parser.add_argument("--rounds", type=int, help="alternating rounds of the training comparison")
    args = parser.parse_args()
    quick = args.quick
    limit = args.train_limit or (6000 if quick else 12000)
    epochs = args.epochs or (3 if quick else 4)
    flow_sets = ["--set", "data.limit=6000", "--set", "train.epochs=1"] if quick else []
    work = Path(tempfile.mkdtemp(prefix="tfpipe-bench-"))
    figures: list[dict] = []
    raw: dict = {"quick": quick, "train_limit": limit, "epochs": epochs}
    t0 = time.perf_counter()

    def figure(name, value, unit, target=None, ok=None, **detail):
        figures.append({"figure": name, "value": value, "unit": unit, "target": target, "ok": ok, **detail})
        status = "" if ok is None else ("met" if ok else "MISSED")
        print(f"  {name}: {value:.3f} {unit}  {target or ''} {status}  {detail or ''}", flush=True)

    print(f"tfpipe bench ({'quick' if quick else 'full'}), scratch {work}", flush=True)
    # 1. ingestion and the input pipeline
    ing = worker("ingest", {"repeats": 3})
    raw["ingest"] = ing
    figure("ingest full MNIST to TFRecord cache", ing["ingest_images_per_second"], "images/s", ">= 90000",
           ing["ingest_images_per_second"] >= 90000)
    figure("reader / from_tensor_slices in memory", ing["reader_images_per_second"] / ing["in_memory_images_per_second"],
           "x", ">= 1.0", ing["reader_images_per_second"] >= ing["in_memory_images_per_second"],
           reader=ing["reader_images_per_second"], in_memory=ing["in_memory_images_per_second"])

    # Ingest that scales: MNIST x1 and x10 (one Parquet file per split, row groups of 20k rows), one process each.
    scaled = {}
    for factor in (1, 10):
        src = work / f"mnist-x{factor}"
        src.mkdir()
        for split in ("train", "test"):
            table = pq.read_table(REPO / "data" / "mnist" / f"{split}.parquet")
            pq.write_table(pa.concat_tables([table] * factor), src / f"{split}.parquet", row_group_size=20000)
        scaled[factor] = worker("ingest_scale", {"source": str(src)})
    raw["ingest_scale"] = scaled
    figure("ingest MNIST x10 / x1, images/s", scaled[10]["images_per_second"] / scaled[1]["images_per_second"], "x",
           ">= 0.95 (no worse at x10)", scaled[10]["images_per_second"] >= 0.95 * scaled[1]["images_per_second"],
           x1=scaled[1]["images_per_second"], x10=scaled[10]["images_per_second"])
    figure("ingest peak RSS x10 / x1", scaled[10]["peak_rss_mb"] / scaled[1]["peak_rss_mb"], "x", "<= 1.3",
           scaled[10]["peak_rss_mb"] <= 1.3 * scaled[1]["peak_rss_mb"], x1_mb=scaled[1]["peak_rss_mb"],
           x10_mb=scaled[10]["peak_rss_mb"])

    # 2. training: the stage (float32 and auto precision) against the bare script, in one process, alternating
    # runs, every epoch after a run's first one sample (see train_pairs for why two ratios are reported).
    root = str(work / "artifacts")
    pairs = worker("train_pairs", {"root": root, "limit": limit, "epochs": epochs,
                                   "rounds": args.rounds or (2 if quick else 4)})
    for i, r in enumerate(pairs["rounds"]):
        print(f"  round {i + 1} images/s per epoch: " + ", ".join(f"{k} {v}" for k, v in r.items()), flush=True)
    common = [f"data.limit={limit}", f"train.epochs={epochs}"]
    mirrored = worker("train", {"root": root, "overrides": common + ["train.precision=auto", "train.cpu_replicas=2"]})
    single = worker("train", {"root": root, "overrides": common + ["train.precision=auto"]})  # right after, side by side
    auto_rate = pairs["auto"]
    raw.update({"train_pairs": pairs, "train_mirrored": mirrored, "train_single": single})
    figure("train stage float32 / bare Keras float32, whole runs", pairs["float32_over_bare"], "x", ">= 0.95",
           pairs["float32_over_bare"] >= 0.95, stage=pairs["float32"], bare=pairs["bare"])
    fast_ratio = pairs["auto_over_bare_fast_state"]
    figure(f"train stage auto ({pairs['auto_precision']}) / bare Keras float32, fast epochs against fast epochs",
           fast_ratio, "x", ">= 2.0", fast_ratio >= 2.0, stage=pairs["fast_epochs"]["auto"], bare=pairs["fast_epochs"]["bare"])
    figure("  the same, whole runs (slow epochs included, as each side drew them)", pairs["auto_over_bare"], "x",
           "reported", None, stage=pairs["auto"], bare=pairs["bare"])
    if pairs["auto_over_bare_slow_state"] is not None:
        figure("  the same, slow epochs against slow epochs", pairs["auto_over_bare_slow_state"], "x", "reported",
               None, stage=pairs["slow_epochs"]["auto"], bare=pairs["slow_epochs"]["bare"])
    ops = worker("op_profile", {"steps": 20})
    raw["op_profile"] = ops
    figure("one training step float32 / mixed_bfloat16, by op (TF profiler)", ops["step_float32_over_bf16"], "x",
           "reported: the ceiling of precision alone", None, convolutions=ops["conv_float32_over_bf16"],
           other_ops=ops["other_float32_over_bf16"], conv_share_float32=ops["float32"]["conv_ms"] / ops["float32"]["all_ops_ms"])
    figure("input pipeline / training rate", ing["reader_images_per_second"] / auto_rate, "x", ">= 50",
           ing["reader_images_per_second"] >= 50 * auto_rate)
    figure("MirroredStrategy 2 logical CPUs / single device", mirrored["images_per_second"] / single["images_per_second"],
           "x", "reported (replicas share the same cores)", None, mirrored=mirrored["images_per_second"],
           single=single["images_per_second"])

    # 3. prediction throughput and memory
    pred = worker("predict", {"root": root, "model_uri": single["model_uri"], "input": str(MNIST_TEST), "repeats": 3})
    raw["predict"] = pred
    figure("predict stage / raw model.predict", pred["stage_images_per_second"] / pred["raw_images_per_second"], "x",
           ">= 0.9", pred["stage_images_per_second"] >= 0.9 * pred["raw_images_per_second"],
           stage=pred["stage_images_per_second"], raw=pred["raw_images_per_second"])
    figure("predict auto precision / float32", pred["auto_images_per_second"] / pred["float32_images_per_second"], "x",
           "reported, with label agreement", None, auto=pred["auto_images_per_second"],
           float32=pred["float32_images_per_second"], label_agreement=pred["auto_float32_label_agreement"])
    test = pq.read_table(MNIST_TEST)
    big = work / "test-x10.parquet"
    pq.write_table(pa.concat_tables([test] * 10), big, row_group_size=10000)
    one = worker("predict_memory", {"root": root, "model_uri": single["model_uri"], "input": str(MNIST_TEST)})
    ten = worker("predict_memory", {"root": root, "model_uri": single["model_uri"], "input": str(big)})
    raw["predict_memory"] = {"x1": one, "x10": ten}
    figure("predict peak RSS 10x input / 1x input", ten["peak_rss_mb"] / one["peak_rss_mb"], "x", "<= 1.3",
           ten["peak_rss_mb"] <= 1.3 * one["peak_rss_mb"], x1_mb=one["peak_rss_mb"], x10_mb=ten["peak_rss_mb"])

    # 4. the whole flow, cold and re-run, against the bare script doing the same epochs
    home = str(work / "prefect-home")
    flow_root = str(work / "flow-artifacts")
    os.environ.pop("PREFECT_API_URL", None)  # Prefect's temporary server (an empty value confuses its events client)
    env = {"PREFECT_HOME": home}
    run_cmd = [sys.executable, "-m", "flows.cli", "run", "--json", "--set", f"artifacts.root={flow_root}", *flow_sets]
    prefect_start, _ = timed([sys.executable, "-c", "import flows; from prefect import flow\n"
                              "@flow\ndef nothing(): pass\nnothing()"], env)
    cold, out = timed(run_cmd, env)
    summary = json.loads(out)
    bare_flow = bare_keras(summary["dataset"]["counts"]["train"], summary["model"]["epochs"])
    rerun, _ = timed(run_cmd, env)
    server, url = start_prefect_server(home)
    try:
        timed(run_cmd, {**env, "PREFECT_API_URL": url})  # first report to this server (the stages are cached)
        rerun_server, _ = timed(run_cmd, {**env, "PREFECT_API_URL": url})
    finally:
        server.terminate()
        server.wait(timeout=30)
    raw["flow"] = {"cold_seconds": cold, "bare_seconds": bare_flow["wall_seconds"], "prefect_empty_flow_seconds": prefect_start,
                   "rerun_temporary_server_seconds": rerun, "rerun_with_server_seconds": rerun_server,
                   "summary": summary, "bare": bare_flow}
    figure("whole flow cold / bare script, same epochs", cold / bare_flow["wall_seconds"], "x",
           "reported", None, flow_s=cold, bare_s=bare_flow["wall_seconds"], prefect_startup_s=prefect_start)
    figure("whole flow re-run, nothing changed (server running)", rerun_server, "s", "<= 15", rerun_server <= 15,
           temporary_server_s=rerun)
    s3 = s3_flow(run_cmd, env, work)
    raw["flow_s3"] = s3
    figure("whole flow cold, S3 root (moto) / local root", s3["seconds"] / cold, "x", "reported (loopback I/O)", None,
           s3_s=s3["seconds"], local_s=cold, staging_s=s3["staging_seconds"])
    accuracy = summary["evaluation"]["metrics"]["accuracy"]
    figure("test accuracy" + (" (quick subset, not the target run)" if quick else " (default config, full MNIST)"),
           accuracy * 100, "%", ">= 99.3", None if quick else accuracy >= 0.993,
           bare_keras_accuracy=bare_flow["test_accuracy"] * 100, precision=summary["model"]["precision"])

    total = time.perf_counter() - t0
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "host": socket.gethostname(),
              "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "seconds": total,
              "figures": figures, "raw": raw}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{datetime.date.today().isoformat()}-{socket.gethostname()}{'-quick' if quick else ''}.json"
    path.write_text(json.dumps(result, indent=2))
    print("\n| figure | value | target | status |\n| --- | --- | --- | --- |")
    for f in figures:
        status = "reported" if f["ok"] is None else ("met" if f["ok"] else "MISSED")
        print(f"| {f['figure']} | {f['value']:.3f} {f['unit']} | {f['target'] or ''} | {status} |")
    print(f"\nwrote {path} in {total:.0f}s")
    if not quick:  # the README's Performance table comes from the newest full run
        from bench.readme import update_readme

        update_readme(path)
        print("README.md Performance table updated")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
