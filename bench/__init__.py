"""Benchmarks of tfpipe against a bare Keras script (`python -m bench [--quick]`), and of its parts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def in_fresh_process(module: str, name: str, args: dict, env: dict | None = None) -> dict:
    """`python -m MODULE --measure NAME ARGS` (bench.worker: `NAME ARGS`): one measurement in a process of its own
    (TensorFlow's start-up, device set-up and dtype policy are per process); the JSON of its last stdout line."""
    flags = [name] if module == "bench.worker" else ["--measure", name]
    proc = subprocess.run([sys.executable, "-m", module, *flags, json.dumps(args)], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})})
    if proc.returncode != 0:
        raise SystemExit(f"{module} {name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
