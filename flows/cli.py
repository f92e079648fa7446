"""The `tfpipe` command line.

`tfpipe run` runs the whole training pipeline as a Prefect flow (on Prefect's temporary local server, or on the
server `PREFECT_API_URL` names). `ingest`, `train`, `evaluate` and `predict` run the stages directly, each
with its upstream stages (cache hits when nothing changed). Errors a user can fix print one line and exit
non-zero: 2 for a bad config, 1 for bad input.
"""

from __future__ import annotations

import flows  # noqa: F401  (environment defaults before TensorFlow and Prefect load)

import contextlib
import datetime
import json
import os
import signal
import sys
from typing import Annotated, Optional

import typer

from flows import console
from pipeline_config import ConfigError, PipelineConfig, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="tfpipe: train, evaluate and serve Keras image classifiers with Prefect.")

ConfigOpt = Annotated[Optional[str], typer.Option("--config", "-c", help="YAML file merged over the default config.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override one key: --set train.epochs=2 (repeatable).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the stage's artifact reference as JSON on stdout.")]
RerunOpt = Annotated[Optional[str], typer.Option(
    "--rerun", metavar="STAGE", help="Rebuild STAGE (ingest, validate, train, evaluate, predict, all) and the stages after it, "
    "even when published.")]


def _fail(message: str, code: int) -> None:
    console.end_native_stderr()
    typer.echo(f"tfpipe: {message}", err=True)
    raise typer.Exit(code)


def _setup(config: str | None, overrides: list[str] | None, rerun: str | None = None) -> PipelineConfig:
    from tasks import configure_logging

    configure_logging()
    try:
        return load_config(config, [*(overrides or []), *([f"rerun={rerun}"] if rerun else [])])
    except ConfigError as exc:
        _fail(str(exc), 2)


def _guarded(fn):
    """Run a command body; user errors become one line on stderr and an exit code, never a traceback. The stages
    print nothing (they log to stderr): stdout is the command's result alone."""
    from tasks.errors import PipelineError, Stopped

    try:
        return fn()
    except ConfigError as exc:
        _fail(str(exc), 2)
    except Stopped as exc:
        _fail(str(exc), 128 + signal.SIGTERM)  # the shell's code for a process ended by SIGTERM
    except PipelineError as exc:
        _fail(f"error: {exc}", 1)


def _emit(artifact, as_json: bool, summary: str) -> None:
    typer.echo(artifact.to_json() if as_json else summary)


def _ingest(cfg: PipelineConfig, then_train: bool = False):
    from tasks.storage import check_reachable

    check_reachable(cfg.artifacts.root)  # before TensorFlow loads: a wrong bucket is one line, at once
    from tasks.devices import configure_devices
    from tasks.model import check_model_config
    from tasks.worker import ingest_for

    configure_devices(cfg.train)  # before the first TensorFlow op (multi_worker: the strategy)
    if then_train:
        check_model_config(cfg)  # a bad model.layers fails before ingest does any work
    return ingest_for(cfg)


def _train(cfg: PipelineConfig):
    dataset = _ingest(cfg, then_train=True)
    from tasks.train import train as run_train

    return dataset, run_train(cfg, dataset)


@app.command()
def ingest(config: ConfigOpt = None, set: SetOpt = None, json_out: JsonOpt = False, rerun: RerunOpt = None) -> None:
    """Read data.source and write (or verify and reuse) its TFRecord cache."""
    cfg = _setup(config, set, rerun)
    dataset = _guarded(lambda: _ingest(cfg))
    counts = ", ".join(f"{k} {v}" for k, v in dataset.counts.items())
    _emit(dataset, json_out, f"dataset {dataset.fingerprint[:12]} ({'cache hit' if dataset.cache_hit else 'written'}): "
                             f"{counts} at {dataset.uri}")


@app.command()
def validate(config: ConfigOpt = None, set: SetOpt = None, json_out: JsonOpt = False, rerun: RerunOpt = None) -> None:
    """Ingest (cached), then check the dataset's statistics against the schema and the champion's data."""
    cfg = _setup(config, set, rerun)

    def body():
        from tasks.validate import validate as run_validate

        return run_validate(cfg, _ingest(cfg))

    validation = _guarded(body)
    _emit(validation, json_out, "\n".join([
        f"dataset {validation.dataset_fingerprint[:12]}: {len(validation.anomalies)} anomalies "
        f"(schema {validation.schema_source})",
        *[f"  {a['kind']} ({a['action']}): {a['message']}" for a in validation.anomalies],
        f"report: {validation.uri}/{validation.report_path}"]))


@app.command()
def train(config: ConfigOpt = None, set: SetOpt = None, json_out: JsonOpt = False, rerun: RerunOpt = None) -> None:
    """Ingest (cached), then build and train the model; resumes an interrupted run."""
    cfg = _setup(config, set, rerun)
    _, model = _guarded(lambda: _train(cfg))
    _emit(model, json_out, f"model {model.fingerprint[:12]} ({'cache hit' if model.cache_hit else 'trained'}): "
                           f"{model.final_metrics} at {model.uri}/{model.model_path}")


@app.command()
def evaluate(config: ConfigOpt = None, set: SetOpt = None, json_out: JsonOpt = False, rerun: RerunOpt = None) -> None:
    """Ingest and train (cached), then measure the model on the test split and apply the promotion gate."""
    cfg = _setup(config, set, rerun)

    def body():
        dataset, model = _train(cfg)
        from tasks.evaluate import evaluate as run_evaluate

        return run_evaluate(cfg, dataset, model)

    evaluation = _guarded(body)
    _emit(evaluation, json_out, f"test accuracy {evaluation.metrics['accuracy']:.4f}: "
                                f"{'blessed' if evaluation.blessed else 'NOT blessed'}; champion "
                                f"{(evaluation.champion_after or 'none')[:12]}; report {evaluation.uri}")


@app.command()
def predict(model: Annotated[str, typer.Option(help="champion, a model directory, or a model fingerprint.")] = "champion",
            input: Annotated[str, typer.Option("--input", "-i", help="Parquet file/dir/glob/URL, image files (a folder, glob or prefix), .npz with x, or cache:FINGERPRINT[/SPLIT].")] = ...,
            output: Annotated[str, typer.Option("--output", "-o", help="Parquet file to write (engine dask: a directory of parts).")] = ...,
            allow_unblessed: Annotated[bool, typer.Option(help="Predict with a model the gate did not bless.")] = False,
            overwrite: Annotated[bool, typer.Option(help="Replace an existing output (only one tfpipe wrote).")] = False,
            config: ConfigOpt = None, set: SetOpt = None, json_out: JsonOpt = False) -> None:
    """Stream batch predictions of a model over an input into a Parquet file."""
    from tasks.storage import check_reachable

    cfg = _setup(config, set)

    def body():
        check_reachable(cfg.artifacts.root)  # before TensorFlow loads
        from tasks.predict import predict as run_predict

        return run_predict(cfg, model, input, output, allow_unblessed=allow_unblessed or None, overwrite=overwrite)

    if cfg.predict.engine == "dask":  # one Prefect task per input file on a Dask cluster: through the flow
        from flows.prediction import batch_prediction

        with _prefect_errors_are_one_line():
            manifest = _guarded(lambda: batch_prediction(
                model=model, input=input, output=output, allow_unblessed=allow_unblessed or cfg.predict.allow_unblessed,
                config_file=config, overrides=_overrides_dict(set), overwrite=overwrite))
        typer.echo(json.dumps(manifest, indent=2) if json_out else
                   f"{manifest['rows']} predictions by model {manifest['model_fingerprint'][:12]} in "
                   f"{len(manifest['parts'])} parts under {output}{_drift_note(manifest.get('drift'))}")
        return
    result = _guarded(body)
    _emit(result, json_out, f"{result.rows} predictions by model {result.model_fingerprint[:12]} in {result.output}"
                            f"{_drift_note(result.drift, result.drift_path)}")


def _anomalies_line(anomalies: list[dict]) -> str:
    if not anomalies:
        return "no anomalies"
    return f"{len(anomalies)} anomalies (" + "; ".join(f"{a['kind']}: {a['message']}" for a in anomalies) + ")"


def _drift_note(drift: bool | None, path: str | None = None) -> str:
    if drift is None:
        return ""
    return f"; drift: {'YES' if drift else 'none'}" + (f" ({path})" if path else "")


@app.command()
def run(config: ConfigOpt = None, set: SetOpt = None, json_out: JsonOpt = False, rerun: RerunOpt = None) -> None:
    """Run the whole training pipeline as a Prefect flow: ingest, train, evaluate, predict."""
    _setup(config, set, rerun)  # a bad config fails here, before Prefect starts
    from flows.training import training_pipeline

    with _prefect_errors_are_one_line():
        summary = _guarded(lambda: training_pipeline(config_file=config, overrides=_overrides_dict(set), rerun=rerun))
    if json_out:
        typer.echo(summary.model_dump_json(indent=2))
        return
    ev, model, pred = summary.evaluation, summary.model, summary.prediction
    if ev is None:  # a multi_worker worker other than the chief
        typer.echo(f"model: {model.uri}/{model.model_path} (trained as one worker; the chief evaluates)")
        return
    typer.echo("\n".join([
        f"test accuracy: {ev.metrics['accuracy']:.4f} (macro F1 {ev.metrics['macro_f1']:.4f})",
        f"gate: {'BLESSED' if ev.blessed else 'NOT blessed'} ({'; '.join(r.describe() for r in ev.reasons)})",
        f"data: {_anomalies_line(summary.validation.anomalies)}",
        f"model: {model.uri}/{model.model_path}{' (cached)' if model.cache_hit else ''}",
        f"champion: {ev.champion_after or 'none'}",
        f"predictions: {pred.output} ({pred.rows} rows){_drift_note(pred.drift)}" if pred
        else "predictions: none (no champion)",
        f"report: {ev.uri}",
        f"took {summary.seconds:.1f}s",
    ]))


@app.command()
def tune(config: ConfigOpt = None, set: SetOpt = None, json_out: JsonOpt = False) -> None:
    """Tune hyperparameters (the tune section): Optuna trials on Dask, each the train stage with the trial's config;
    the best model goes through the gate and its config is written as a preset. Run again to continue a study."""
    _setup(config, set)
    from flows.tuning import states_line, tuning_flow

    with _prefect_errors_are_one_line():
        summary = _guarded(lambda: tuning_flow(config_file=config, overrides=_overrides_dict(set)))
    if json_out:
        typer.echo(summary.model_dump_json(indent=2))
        return
    ev, trials = summary.evaluation, summary.trials
    typer.echo("\n".join([
        f"study: {summary.study} ({states_line(trials)})",
        f"best: trial {summary.best_trial}, objective {summary.best_value:.4f}: "
        + ", ".join(f"{k}={v}" for t in trials if t["number"] == summary.best_trial for k, v in t["params"].items()),
        f"model: {summary.best_model}",
        f"gate: {'BLESSED' if ev.blessed else 'NOT blessed'}, test accuracy {ev.metrics['accuracy']:.4f}",
        f"preset: {summary.preset}",
        f"study.json: {summary.study_json}",
        f"took {summary.seconds:.1f}s",
    ]))


@app.command()
def models(card: Annotated[Optional[str], typer.Option("--card", metavar="MODEL", help=(
               "Print the model card of MODEL (champion, a directory or a fingerprint) instead."))] = None,
           config: ConfigOpt = None, set: SetOpt = None, json_out: JsonOpt = False) -> None:
    """List the published models, newest first: test metrics, gate decision, and which one is the champion."""
    from tasks.champion import list_models
    from tasks.model_card import read_model_card

    cfg = _setup(config, set)
    if card:
        typer.echo(_guarded(lambda: read_model_card(cfg.artifacts.root, card, json_out)), nl=False)
        return
    rows = _guarded(lambda: list_models(cfg.artifacts.root))
    if json_out:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo(f"no published models under {cfg.artifacts.root}: run tfpipe run or tfpipe train")
        return
    typer.echo(f"{'':2}{'model':14}{'created':18}{'data':14}{'precision':16}{'accuracy':>9}{'macro F1':>9}  gate")
    for r in rows:
        created = datetime.datetime.fromtimestamp(r["created"]).strftime("%Y-%m-%d %H:%M")
        number = lambda v: f"{v:9.4f}" if v is not None else f"{'-':>9}"  # noqa: E731
        typer.echo(f"{'* ' if r['champion'] else '  '}{r['fingerprint'][:12]:14}{created:18}"
                   f"{r['dataset_fingerprint'][:12]:14}{r['precision']:16}{number(r['test_accuracy'])}"
                   f"{number(r['macro_f1'])}  {r['gate'] or 'not evaluated'}")
    typer.echo("* the champion (tfpipe predict --model champion)")


@app.command()
def export(model: Annotated[str, typer.Option(help="champion, a model directory, or a model fingerprint.")] = "champion",
           format: Annotated[list[str], typer.Option("--format", "-f", help="saved_model, tflite or onnx (repeatable); "
                                                    "settings from the config's export section.")] = ...,
           config: ConfigOpt = None, set: SetOpt = None, json_out: JsonOpt = False) -> None:
    """Add serving formats to a published model, each checked against Keras on test images first."""
    from tasks.export import export_published

    cfg = _setup(config, set)
    manifest = _guarded(lambda: export_published(cfg, model, format))
    if json_out:
        typer.echo(json.dumps(manifest["exports"], indent=2))
        return
    for name in format:
        entry = manifest["exports"][name]
        typer.echo(f"{name}: {entry['path']} (agrees with Keras on {entry['parity']['label_agreement']:.2%} of "
                   f"{entry['parity']['samples']} test images)")


@app.command()
def promote(fingerprint: Annotated[str, typer.Argument(help="The model's fingerprint (or a unique prefix).")],
            reason: Annotated[str, typer.Option("--reason", help="Why, for the champion history.")] = ...,
            config: ConfigOpt = None, set: SetOpt = None) -> None:
    """Make a published model the champion by hand, past the gate; recorded with the reason and your user name."""
    from tasks.champion import promote_by_hand

    cfg = _setup(config, set)
    entry = _guarded(lambda: promote_by_hand(cfg.artifacts.root, fingerprint, reason))
    typer.echo(f"champion: {entry['model_fingerprint']} (promoted by {entry['user']}: {reason})")


@app.command()
def rollback(to: Annotated[Optional[str], typer.Option("--to", help="A former champion's fingerprint (default: the previous one).")] = None,
             reason: Annotated[Optional[str], typer.Option("--reason", help="Why, for the champion history.")] = None,
             config: ConfigOpt = None, set: SetOpt = None) -> None:
    """Make the previous champion (or --to a former one) the champion again; the current one is demoted."""
    from tasks.champion import rollback as roll_back

    cfg = _setup(config, set)
    entry = _guarded(lambda: roll_back(cfg.artifacts.root, to, reason))
    typer.echo(f"champion: {entry['model_fingerprint']} ({entry['reason']})")


@app.command()
def gc(dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be removed.")] = False,
       config: ConfigOpt = None, set: SetOpt = None) -> None:
    """Remove what no run needs: dead temporary dirs, idle work dirs, free leases, old published outputs."""
    from tasks import gc as collector

    cfg = _setup(config, set)
    from tasks.storage import is_local

    if not is_local(cfg.artifacts.root):
        _fail(f"error: tfpipe gc cleans local artifact roots; {cfg.artifacts.root} is in a bucket: use the store's "
              "lifecycle rules for it", 1)
    removals = collector.plan(cfg.artifacts.root, cfg.artifacts)
    for r in removals:
        typer.echo(f"{'would remove' if dry_run else 'removing'} {r.path} ({r.bytes / 1e6:.1f} MB): {r.why}")
    freed = sum(r.bytes for r in removals) if dry_run else collector.remove(removals)
    typer.echo(f"{'would free' if dry_run else 'freed'} {freed / 1e6:.1f} MB in {len(removals)} item(s) under "
               f"{cfg.artifacts.root}")


EPHEMERAL_TIMEOUT = "Timed out while attempting to connect to ephemeral Prefect API server"


@contextlib.contextmanager
def _prefect_errors_are_one_line():
    """A temporary Prefect server that did not start in time, a Prefect server that refuses this client (auth), or
    one that went away for good (after the client's retries): one line, exit 1, at once."""
    import httpx

    from tasks.errors import first_line

    try:
        yield
    except RuntimeError as exc:
        if not str(exc).startswith(EPHEMERAL_TIMEOUT):
            raise
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as timeout

        _fail(f"error: Prefect's temporary server did not answer within {timeout.value()} s "
              f"(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS): start a server (prefect server start) and set "
              "PREFECT_API_URL=http://127.0.0.1:4200/api, or raise that timeout", 1)
    except httpx.HTTPStatusError as exc:  # prefect.exceptions.PrefectHTTPStatusError is one
        if exc.response.status_code not in (401, 403):
            raise
        from prefect.settings import PREFECT_API_URL

        _fail(f"error: the Prefect server at {PREFECT_API_URL.value()} refused this client "
              f"({exc.response.status_code} {exc.response.reason_phrase}): set PREFECT_API_AUTH_STRING to the "
              "user:password its PREFECT_SERVER_API_AUTH_STRING names", 1)
    except httpx.TransportError as exc:
        from prefect.settings import PREFECT_API_URL

        console.end_native_stderr()
        typer.echo(f"tfpipe: error: lost the Prefect server at {PREFECT_API_URL.value() or 'its temporary address'} "
                   f"({type(exc).__name__}: {first_line(exc)}); the stages that finished "
                   "published their outputs: re-run once the server is back and they are reused", err=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)  # else Prefect keeps retrying to ship logs and events to the lost server for minutes at exit


def _overrides_dict(items: list[str] | None) -> dict:
    """--set items as the flow's `overrides` parameter (dotted key -> parsed value)."""
    from pipeline_config import parse_override

    return {".".join(parts): value for parts, value in (parse_override(i) for i in items or [])}


@app.command()
def serve(config: ConfigOpt = None, set: SetOpt = None,
          print_policy: Annotated[bool, typer.Option("--print-policy", help=(
              "Print the TFPIPE_SERVE_POLICY value this config gives (for a work pool's job environment) and exit."))] = False) -> None:
    """Serve the scheduled training deployment (schedule.cron) and the on-demand batch-prediction and tuning
    deployments."""
    cfg = _setup(config, set)
    from flows.deployments import serve_deployments, serve_policy

    if print_policy:
        typer.echo(serve_policy(cfg, config, _overrides_dict(set)).to_env())
        return
    with _prefect_errors_are_one_line():
        serve_deployments(cfg, config, _overrides_dict(set))


@app.callback()
def _options(verbose: Annotated[bool, typer.Option("--verbose", "-v", help=(
        "Also show TensorFlow's C++ logs, its retracing warnings and Prefect's server notes (hidden by default); "
        "accepted anywhere on the command line."))] = False) -> None:
    """tfpipe: train, evaluate and serve Keras image classifiers with Prefect."""


def main() -> None:
    argv = sys.argv[1:]
    console.configure(argv)  # before TensorFlow loads: its C++ start-up lines are hidden unless -v
    app(args=[a for a in argv if a not in ("-v", "--verbose")], prog_name="tfpipe")


if __name__ == "__main__":
    main()
