"""What data validation costs: ingest of full MNIST with its statistics and the validate stage, against ingest
without the statistics, side by side in one run.

    python -m bench.validate [--rounds 3]

Each side runs in a fresh process on a new artifact root: `ingest` as tfpipe runs it (statistics computed in the
same pass), then `validate`; and the same ingest with the statistics switched off (ImageStatistics.update does
nothing, a bench-only patch). Wall seconds (median of --rounds) and peak RSS of each; target: ingest + validate
<= 1.25x ingest alone. Prints the figures and writes bench/results/<date>-<host>-validate.json.
"""

from __future__ import annotations

import datetime
import json
import os
import resource
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path

from bench import REPO, answer_measure, bench_parser, in_fresh_process

RESULTS = REPO / "bench" / "results"


def ingest_side(args: dict) -> dict:
    from pipeline_config import load_config
    from tasks.data.ingest import ingest
    from tasks.validation import statistics as image_statistics
    from tasks.validation.validate import validate

    if not args["statistics"]:
        image_statistics.ImageStatistics.update = lambda self, images, labels=None: None
    cfg = load_config(overrides=[f"artifacts.root={args['root']}"])
    started = time.perf_counter()
    dataset = ingest(cfg.data, cfg.artifacts.root)
    ingested = time.perf_counter() - started
    validated = None
    if args["statistics"]:
        began = time.perf_counter()
        validate(cfg, dataset)
        validated = time.perf_counter() - began
    return {"ingest_seconds": ingested, "validate_seconds": validated, "images": sum(dataset.counts.values()),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if answer_measure(args.measure, {"ingest": ingest_side}):
        return
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="tfpipe-bench-validate-"))
    runs = {"with": [], "without": []}
    for i in range(args.rounds):  # interleaved: the VM's swings fall on both sides alike
        for side in ("without", "with"):
            runs[side].append(in_fresh_process("bench.validate", "ingest", {
                "statistics": side == "with", "root": str(work / f"{side}-{i}")}))
    alone = statistics.median(r["ingest_seconds"] for r in runs["without"])
    ingest_with = statistics.median(r["ingest_seconds"] for r in runs["with"])
    validate_only = statistics.median(r["validate_seconds"] for r in runs["with"])
    figures = {
        "ingest with statistics + validate / ingest alone (target <= 1.25)": (ingest_with + validate_only) / alone,
        "ingest alone, s": alone, "ingest with statistics, s": ingest_with, "validate stage, s": validate_only,
        "peak RSS with / without statistics": max(r["peak_rss_mb"] for r in runs["with"])
        / max(r["peak_rss_mb"] for r in runs["without"]),
        "peak RSS with statistics, MB": max(r["peak_rss_mb"] for r in runs["with"]),
    }
    for name, value in figures.items():
        print(f"{name:70s} {value:10,.3f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{datetime.date.today()}-{socket.gethostname()}-validate.json"
    out.write_text(json.dumps({"host": socket.gethostname(), "cpus": os.cpu_count(), "figures": figures,
                               "raw": runs, "minutes": (time.time() - started) / 60}, indent=2))
    print(f"wrote {out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
