"""Benchmarks of tfpipe against a bare Keras script (`python -m bench [--quick]`), and of its parts."""

from __future__ import annotations

import argparse
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


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """A bench's command line: its docstring as help, and the hidden `--measure NAME ARGS` of in_fresh_process."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    return parser


def answer_measure(measure: list[str] | None, sides: dict) -> bool:
    """The child's half of in_fresh_process: with `--measure NAME ARGS`, run that side and print its JSON line;
    True when it did (the caller returns)."""
    if not measure:
        return False
    print(json.dumps(sides[measure[0]](json.loads(measure[1]))))
    return True
