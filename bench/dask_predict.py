"""Batch prediction on Dask against the local engine, measured side by side in one run.

    python -m bench.dask_predict [--files 40]

Scores full MNIST's test split x4 (40,000 images) split into `--files` Parquet files: the local engine on one file
of all rows, then `predict.engine=dask` with 2 workers on the files (cold: the LocalCluster starts inside), then
a re-run with 10% of the parts deleted, then the worker memory with a tenth of the files. Prints the figures and
writes bench/results/<date>-<host>-dask.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from bench.run import REPO, RESULTS, start_prefect_server, timed, worker

MNIST_TEST = REPO / "data" / "mnist" / "test.parquet"


def predict(model: str, root: str, source: str, output: str, env: dict, *sets: str) -> float:
    seconds, _ = timed([sys.executable, "-m", "flows.cli", "predict", "--model", model, "--allow-unblessed",
                        "--set", f"artifacts.root={root}", "--input", source, "--output", output, *sets], env)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=40)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tfpipe-bench-dask-"))
    root = str(work / "artifacts")
    trained = worker("train", {"root": root, "overrides": ["data.limit=2000", "train.epochs=1"]})
    table = pa.concat_tables([pq.read_table(MNIST_TEST)] * 4)
    whole, parts_dir, tenth_dir = work / "all.parquet", work / "in", work / "in-tenth"
    pq.write_table(table, whole)
    per = len(table) // args.files
    for directory, count in ((parts_dir, args.files), (tenth_dir, max(1, args.files // 10))):
        directory.mkdir()
        for i in range(count):
            pq.write_table(table.slice(i * per, per), directory / f"part{i:03d}.parquet")
    server, url = start_prefect_server(str(work / "prefect-home"))
    env = {"PREFECT_API_URL": url, "PREFECT_HOME": str(work / "prefect-home")}
    dask = ["--set", "predict.engine=dask", "--set", "predict.dask_workers=2"]
    model = trained["model_uri"]
    try:
        local_s = predict(model, root, str(whole), str(work / "local.parquet"), env)
        dask_s = predict(model, root, str(parts_dir), str(work / "out"), env, *dask)
        one_s = predict(model, root, str(parts_dir / "part000.parquet"), str(work / "out-one"), env, *dask)
        for i in range(0, args.files, 10):  # 10% of the parts lost
            (work / "out" / f"part-part{i:03d}.parquet").unlink()
        resume_s = predict(model, root, str(parts_dir), str(work / "out"), env, *dask)
        predict(model, root, str(tenth_dir), str(work / "out-tenth"), env, *dask)
    finally:
        server.terminate()
        server.wait(timeout=30)

    def worker_rss(out: str) -> float:
        manifest = json.loads((work / out / "_manifest.json").read_text())
        return max(p["worker_peak_rss_mb"] for p in manifest["parts"] if "worker_peak_rss_mb" in p)

    rows = len(table)
    figures = {
        "dask 2 workers / local engine, images/s (cold, cluster start included)": local_s / dask_s,
        "dask fixed cost (one file, cluster start), s": one_s,
        "dask per-file cost beyond the fixed cost, s": (dask_s - one_s) / max(args.files - 1, 1),
        "worker peak RSS, 10x files / 1x files": worker_rss("out") / worker_rss("out-tenth"),
        "resume with 10% of parts missing / full run, time": resume_s / dask_s,
    }
    raw = {"rows": rows, "files": args.files, "local_s": local_s, "dask_s": dask_s, "one_file_s": one_s,
           "resume_s": resume_s, "worker_rss_mb": {"x10": worker_rss("out"), "x1": worker_rss("out-tenth")}}
    for name, value in figures.items():
        print(f"  {name}: {value:.3f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{datetime.date.today().isoformat()}-{socket.gethostname()}-dask.json"
    path.write_text(json.dumps({"date": datetime.datetime.now().isoformat(timespec="seconds"), "figures": figures,
                                "raw": raw}, indent=2))
    print(f"wrote {path}; {time.strftime('%H:%M:%S')}")


if __name__ == "__main__":
    main()
