"""Write the README's Performance tables from bench results files, so the two cannot drift.

    python -m bench.readme                     # the newest full runs in bench/results/
    python -m bench.readme bench/results/X.json

Replaces what stands between the `<!-- bench:begin -->` and `<!-- bench:end -->` lines of README.md (from
`python -m bench`), and between `<!-- bench-accuracy:begin -->` and `<!-- bench-accuracy:end -->` (from
`python -m bench.accuracy`, files ending in `-accuracy.json`). Both benches call it at the end of a full run.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MARKERS = {False: ("<!-- bench:begin -->", "<!-- bench:end -->"),
           True: ("<!-- bench-accuracy:begin -->", "<!-- bench-accuracy:end -->")}


def number(value) -> str:
    if isinstance(value, list):
        return f"median {number(statistics.median(value))} of {len(value)}"
    if isinstance(value, float) and abs(value) < 100:
        return f"{value:.4g}"
    return f"{value:,.0f}" if isinstance(value, (int, float)) else str(value)


def value_text(figure: dict) -> str:
    unit, value = figure["unit"], figure["value"]
    text = {"x": f"{value:.2f}x", "%": f"{value:.2f}%", "s": f"{value:.1f} s"}.get(unit, f"{value:,.0f} {unit}")
    details = {k: v for k, v in figure.items() if k not in ("figure", "value", "unit", "target", "ok")}
    if details:
        text += " (" + ", ".join(f"{k.replace('_', ' ')} {number(v)}" for k, v in details.items()) + ")"
    return text


def op_profile_line(profile: dict) -> str:
    f32, bf16 = profile["float32"], profile["mixed_bfloat16"]
    names = {"_MklNativeConv2DBackpropFilterWithBias": "filter gradient", "_MklNativeConv2DBackpropInput":
             "input gradient", "_MklNativeFusedConv2D": "forward"}
    convs = ", ".join(f"{label} {f32['top_ops_ms'][op]:.0f} -> {bf16['top_ops_ms'][op]:.0f} ms"
                      for op, label in names.items() if op in f32["top_ops_ms"] and op in bf16["top_ops_ms"])
    return (f"One training step of the seed model at batch 128, op by op (TensorFlow profiler, both threads' op "
            f"time): the convolutions are {f32['conv_ms'] / f32['all_ops_ms']:.0%} of the float32 op time and run "
            f"{profile['conv_float32_over_bf16']:.2f}x faster in bf16 ({convs}); the other ops "
            f"{profile['other_float32_over_bf16']:.2f}x; the step {profile['step_float32_over_bf16']:.2f}x "
            f"({f32['step_ms']:.0f} -> {bf16['step_ms']:.0f} ms).")


def render(results_path: Path) -> str:
    result = json.loads(results_path.read_text())
    lines = [f"Latest full run: {result['date'][:10]}, host `{result['host']}` ({result['cpu']}, {result['cores']} cores), "
             f"{result['seconds'] / 60:.0f} minutes; from `{results_path.relative_to(REPO)}`, written by "
             "`python -m bench.readme`.", "",
             "| figure | value | target | status |", "| --- | --- | --- | --- |"]
    for f in result["figures"]:
        status = "" if f["ok"] is None else ("met" if f["ok"] else "missed")
        lines.append(f"| {f['figure'].strip()} | {value_text(f)} | {f['target'] or ''} | {status} |")
    if "op_profile" in result.get("raw", {}):
        lines += ["", op_profile_line(result["raw"]["op_profile"])]
    return "\n".join(lines)


def newest_full_run(accuracy: bool = False) -> Path:
    """The newest full run of python -m bench (or, with `accuracy`, of python -m bench.accuracy)."""
    results = (REPO / "bench" / "results").glob("*.json")
    other_benches = ("-quick", "-dask", "-folders", "-export", "-transfer", "-tune", "-validate")
    runs = sorted(p for p in results if p.stem.endswith("-accuracy") == accuracy and not p.stem.endswith(other_benches))
    if not runs:
        raise SystemExit(f"no full bench run in bench/results/: run python -m bench{'.accuracy' if accuracy else ''} first")
    return runs[-1]


def update_readme(results_path: Path, accuracy: bool = False) -> None:
    BEGIN, END = MARKERS[accuracy]
    text = README.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} section to write")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{BEGIN}\n{render(results_path)}\n{END}{tail}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        path = Path(sys.argv[1]).resolve()
        update_readme(path, accuracy=path.stem.endswith("-accuracy"))
    else:
        update_readme(newest_full_run())
        update_readme(newest_full_run(accuracy=True), accuracy=True)
