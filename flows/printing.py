"""What each `tfpipe` command prints on stdout when it succeeds: its result, in a few lines a person reads (or, with
--json, the artifact reference a program reads). The commands themselves are in cli.py."""

from __future__ import annotations

import datetime
import json


def ingest_lines(dataset) -> str:
    counts = ", ".join(f"{k} {v}" for k, v in dataset.counts.items())
    return (f"dataset {dataset.fingerprint[:12]} ({'cache hit' if dataset.cache_hit else 'written'}): {counts} at "
            f"{dataset.uri}")


def validation_lines(validation) -> str:
    return "\n".join([
        f"dataset {validation.dataset_fingerprint[:12]}: {len(validation.anomalies)} anomalies "
        f"(schema {validation.schema_source})",
        *[f"  {a['kind']} ({a['action']}): {a['message']}" for a in validation.anomalies],
        f"report: {validation.uri}/{validation.report_path}"])


def model_lines(model) -> str:
    return (f"model {model.fingerprint[:12]} ({'cache hit' if model.cache_hit else 'trained'}): {model.final_metrics} "
            f"at {model.uri}/{model.model_path}")


def evaluation_lines(evaluation) -> str:
    verdict = "blessed" if evaluation.blessed else "NOT blessed"
    return (f"test accuracy {evaluation.metrics['accuracy']:.4f}: {verdict}; champion "
            f"{(evaluation.champion_after or 'none')[:12]}; report {evaluation.uri}")


def prediction_lines(result) -> str:
    return (f"{result.rows} predictions by model {result.model_fingerprint[:12]} in {result.output}"
            f"{drift_note(result.drift, result.drift_path)}")


def parts_lines(manifest: dict, output: str) -> str:
    """A Dask prediction's manifest of parts."""
    return (f"{manifest['rows']} predictions by model {manifest['model_fingerprint'][:12]} in {len(manifest['parts'])} "
            f"parts under {output}{drift_note(manifest.get('drift'))}")


def anomalies_line(anomalies: list[dict]) -> str:
    if not anomalies:
        return "no anomalies"
    return f"{len(anomalies)} anomalies (" + "; ".join(f"{a['kind']}: {a['message']}" for a in anomalies) + ")"


def drift_note(drift: bool | None, path: str | None = None) -> str:
    if drift is None:
        return ""
    return f"; drift: {'YES' if drift else 'none'}" + (f" ({path})" if path else "")


def run_lines(summary) -> str:
    """`tfpipe run`'s summary: one line per stage's result, then the time."""
    ev, model, pred = summary.evaluation, summary.model, summary.prediction
    if ev is None:  # a multi_worker worker other than the chief
        return f"model: {model.uri}/{model.model_path} (trained as one worker; the chief evaluates)"
    return "\n".join([
        f"test accuracy: {ev.metrics['accuracy']:.4f} (macro F1 {ev.metrics['macro_f1']:.4f})",
        f"gate: {'BLESSED' if ev.blessed else 'NOT blessed'} ({'; '.join(r.describe() for r in ev.reasons)})",
        f"data: {anomalies_line(summary.validation.anomalies)}",
        f"model: {model.uri}/{model.model_path}{' (cached)' if model.cache_hit else ''}",
        f"champion: {ev.champion_after or 'none'}",
        f"predictions: {pred.output} ({pred.rows} rows){drift_note(pred.drift)}" if pred
        else "predictions: none (no champion)",
        f"report: {ev.uri}",
        f"took {summary.seconds:.1f}s",
    ])


def tune_lines(summary) -> str:
    from flows.tuning import states_line

    ev, trials = summary.evaluation, summary.trials
    return "\n".join([
        f"study: {summary.study} ({states_line(trials)})",
        f"best: trial {summary.best_trial}, objective {summary.best_value:.4f}: "
        + ", ".join(f"{k}={v}" for t in trials if t["number"] == summary.best_trial for k, v in t["params"].items()),
        f"model: {summary.best_model}",
        f"gate: {'BLESSED' if ev.blessed else 'NOT blessed'}, test accuracy {ev.metrics['accuracy']:.4f}",
        f"preset: {summary.preset}",
        f"study.json: {summary.study_json}",
        f"took {summary.seconds:.1f}s",
    ])


def models_table(rows: list[dict], root: str) -> str:
    """The published models, newest first, the champion starred."""
    if not rows:
        return f"no published models under {root}: run tfpipe run or tfpipe train"

    def number(value: float | None) -> str:
        return f"{value:9.4f}" if value is not None else f"{'-':>9}"

    lines = [f"{'':2}{'model':14}{'created':18}{'data':14}{'precision':16}{'accuracy':>9}{'macro F1':>9}  gate"]
    for r in rows:
        created = datetime.datetime.fromtimestamp(r["created"]).strftime("%Y-%m-%d %H:%M")
        lines.append(f"{'* ' if r['champion'] else '  '}{r['fingerprint'][:12]:14}{created:18}"
                     f"{r['dataset_fingerprint'][:12]:14}{r['precision']:16}{number(r['test_accuracy'])}"
                     f"{number(r['macro_f1'])}  {r['gate'] or 'not evaluated'}")
    lines.append("* the champion (tfpipe predict --model champion)")
    return "\n".join(lines)


def export_lines(manifest: dict, formats: list[str], as_json: bool) -> str:
    if as_json:
        return json.dumps(manifest["exports"], indent=2)
    return "\n".join(f"{name}: {manifest['exports'][name]['path']} (agrees with Keras on "
                     f"{manifest['exports'][name]['parity']['label_agreement']:.2%} of "
                     f"{manifest['exports'][name]['parity']['samples']} test images)" for name in formats)


def gc_lines(removals: list, freed: int, dry_run: bool, root: str) -> str:
    return "\n".join([*(f"{'would remove' if dry_run else 'removing'} {r.path} ({r.bytes / 1e6:.1f} MB): {r.why}"
                        for r in removals),
                      f"{'would free' if dry_run else 'freed'} {freed / 1e6:.1f} MB in {len(removals)} item(s) under "
                      f"{root}"])
