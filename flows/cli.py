"""The `tfpipe` command line: the commands, each a few lines that load the config, run a stage or a flow, and print
its result (printing.py); a failure is one line (errors.py).

`tfpipe run` runs the whole training pipeline as a Prefect flow (on Prefect's temporary local server, or on the
server `PREFECT_API_URL` names). `ingest`, `validate`, `train`, `evaluate` and `predict` run the stages directly,
each with its upstream stages (cache hits when nothing changed).
"""

from __future__ import annotations

import flows  # noqa: F401  isort: skip  (environment defaults before TensorFlow and Prefect load)

import json
import sys
from typing import Annotated, Optional

import typer

from flows import console, printing
from flows.errors import fail, guarded, prefect_errors_are_one_line
from pipeline_config import ConfigError, PipelineConfig, load_config, parse_override

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="tfpipe: train, evaluate and serve Keras image classifiers with Prefect.")

ConfigOpt = Annotated[Optional[str], typer.Option("--config", "-c", help="YAML file merged over the default config.")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override one key: --set train.epochs=2 (repeatable).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the stage's artifact reference as JSON on stdout.")]
RerunOpt = Annotated[Optional[str], typer.Option(
    "--rerun", metavar="STAGE", help="Rebuild STAGE (ingest, validate, train, evaluate, predict, all) and the stages after it, "
    "even when published.")]
ModelOpt = Annotated[str, typer.Option(help="champion, a model directory, or a model fingerprint.")]


def _setup(config: str | None, overrides: list[str] | None, rerun: str | None = None) -> PipelineConfig:
    from tasks import configure_logging

    configure_logging()
    try:
        return load_config(config, [*(overrides or []), *([f"rerun={rerun}"] if rerun else [])])
    except ConfigError as exc:
        fail(str(exc), 2)


def _overrides_dict(items: list[str] | None) -> dict:
    """--set items as the flows' `overrides` parameter (dotted key -> parsed value)."""
    return {".".join(parts): value for parts, value in (parse_override(i) for i in items or [])}


def _emit(artifact, as_json: bool, summary: str) -> None:
    typer.echo(artifact.to_json() if as_json else summary)


def _ingest(cfg: PipelineConfig, then_train: bool = False):
    from tasks.store.storage import check_reachable

    check_reachable(cfg.artifacts.root)  # before TensorFlow loads: a wrong bucket is one line, at once
    from tasks.distributed.devices import configure_devices
    from tasks.model.build import check_model_config
    from tasks.train.worker import ingest_for

    configure_devices(cfg.train)  # before the first TensorFlow op (multi_worker: the strategy)
    if then_train:
        check_model_config(cfg)  # a bad model.layers fails before ingest does any work
    return ingest_for(cfg)


def _train(cfg: PipelineConfig):
    dataset = _ingest(cfg, then_train=True)
    from tasks.train.stage import train as run_train

    return dataset, run_train(cfg, dataset)


@app.command()
def ingest(config: ConfigOpt = None, set: SetOpt = None, json_out: JsonOpt = False, rerun: RerunOpt = None) -> None:
    """Read data.source and write (or verify and reuse) its TFRecord cache."""
    cfg = _setup(config, set, rerun)
    dataset = guarded(lambda: _ingest(cfg))
    _emit(dataset, json_out, printing.ingest_lines(dataset))


@app.command()
def validate(config: ConfigOpt = None, set: SetOpt = None, json_out: JsonOpt = False, rerun: RerunOpt = None) -> None:
    """Ingest (cached), then check the dataset's statistics against the schema and the champion's data."""
    cfg = _setup(config, set, rerun)

    def body():
        from tasks.validation.validate import validate as run_validate

        return run_validate(cfg, _ingest(cfg))

    validation = guarded(body)
    _emit(validation, json_out, printing.validation_lines(validation))


@app.command()
def train(config: ConfigOpt = None, set: SetOpt = None, json_out: JsonOpt = False, rerun: RerunOpt = None) -> None:
    """Ingest (cached), then build and train the model; resumes an interrupted run."""
    cfg = _setup(config, set, rerun)
    _, model = guarded(lambda: _train(cfg))
    _emit(model, json_out, printing.model_lines(model))


@app.command()
def evaluate(config: ConfigOpt = None, set: SetOpt = None, json_out: JsonOpt = False, rerun: RerunOpt = None) -> None:
    """Ingest and train (cached), then measure the model on the test split and apply the promotion gate."""
    cfg = _setup(config, set, rerun)

    def body():
        dataset, model = _train(cfg)
        from tasks.evaluate.stage import evaluate as run_evaluate

        return run_evaluate(cfg, dataset, model)

    evaluation = guarded(body)
    _emit(evaluation, json_out, printing.evaluation_lines(evaluation))


@app.command()
def predict(model: ModelOpt = "champion",
            input: Annotated[str, typer.Option("--input", "-i", help="Parquet file/dir/glob/URL, image files (a folder, glob or prefix), .npz with x, or cache:FINGERPRINT[/SPLIT].")] = ...,
            output: Annotated[str, typer.Option("--output", "-o", help="Parquet file to write (engine dask: a directory of parts).")] = ...,
            allow_unblessed: Annotated[bool, typer.Option(help="Predict with a model the gate did not bless.")] = False,
            overwrite: Annotated[bool, typer.Option(help="Replace an existing output (only one tfpipe wrote).")] = False,
            config: ConfigOpt = None, set: SetOpt = None, json_out: JsonOpt = False) -> None:
    """Stream batch predictions of a model over an input into a Parquet file."""
    cfg = _setup(config, set)
    if cfg.predict.engine == "dask":  # one Prefect task per input file on a Dask cluster: through the flow
        from flows.prediction import batch_prediction

        with prefect_errors_are_one_line():
            manifest = guarded(lambda: batch_prediction(
                model=model, input=input, output=output, allow_unblessed=allow_unblessed or cfg.predict.allow_unblessed,
                config_file=config, overrides=_overrides_dict(set), overwrite=overwrite))
        typer.echo(json.dumps(manifest, indent=2) if json_out else printing.parts_lines(manifest, output))
        return

    def body():
        from tasks.store.storage import check_reachable

        check_reachable(cfg.artifacts.root)  # before TensorFlow loads
        from tasks.serve.predict import predict as run_predict

        return run_predict(cfg, model, input, output, allow_unblessed=allow_unblessed or None, overwrite=overwrite)

    result = guarded(body)
    _emit(result, json_out, printing.prediction_lines(result))


@app.command()
def run(config: ConfigOpt = None, set: SetOpt = None, json_out: JsonOpt = False, rerun: RerunOpt = None) -> None:
    """Run the whole training pipeline as a Prefect flow: ingest, train, evaluate, predict."""
    _setup(config, set, rerun)  # a bad config fails here, before Prefect starts
    from flows.training import training_pipeline

    with prefect_errors_are_one_line():
        summary = guarded(lambda: training_pipeline(config_file=config, overrides=_overrides_dict(set), rerun=rerun))
    typer.echo(summary.model_dump_json(indent=2) if json_out else printing.run_lines(summary))


@app.command()
def tune(config: ConfigOpt = None, set: SetOpt = None, json_out: JsonOpt = False) -> None:
    """Tune hyperparameters (the tune section): Optuna trials on Dask, each the train stage with the trial's config;
    the best model goes through the gate and its config is written as a preset. Run again to continue a study."""
    _setup(config, set)
    from flows.tuning import tuning_flow

    with prefect_errors_are_one_line():
        summary = guarded(lambda: tuning_flow(config_file=config, overrides=_overrides_dict(set)))
    typer.echo(summary.model_dump_json(indent=2) if json_out else printing.tune_lines(summary))


@app.command()
def models(card: Annotated[Optional[str], typer.Option("--card", metavar="MODEL", help=(
               "Print the model card of MODEL (champion, a directory or a fingerprint) instead."))] = None,
           config: ConfigOpt = None, set: SetOpt = None, json_out: JsonOpt = False) -> None:
    """List the published models, newest first: test metrics, gate decision, and which one is the champion."""
    from tasks.evaluate.model_card import read_model_card
    from tasks.registry.models import list_models

    cfg = _setup(config, set)
    if card:
        typer.echo(guarded(lambda: read_model_card(cfg.artifacts.root, card, json_out)), nl=False)
        return
    rows = guarded(lambda: list_models(cfg.artifacts.root))
    typer.echo(json.dumps(rows, indent=2) if json_out else printing.models_table(rows, cfg.artifacts.root))


@app.command()
def export(model: ModelOpt = "champion",
           format: Annotated[list[str], typer.Option("--format", "-f", help="saved_model, tflite or onnx (repeatable); "
                                                    "settings from the config's export section.")] = ...,
           config: ConfigOpt = None, set: SetOpt = None, json_out: JsonOpt = False) -> None:
    """Add serving formats to a published model, each checked against Keras on test images first."""
    from tasks.serve.export import export_published

    cfg = _setup(config, set)
    manifest = guarded(lambda: export_published(cfg, model, format))
    typer.echo(printing.export_lines(manifest, format, json_out))


@app.command()
def promote(fingerprint: Annotated[str, typer.Argument(help="The model's fingerprint (or a unique prefix).")],
            reason: Annotated[str, typer.Option("--reason", help="Why, for the champion history.")] = ...,
            config: ConfigOpt = None, set: SetOpt = None) -> None:
    """Make a published model the champion by hand, past the gate; recorded with the reason and your user name."""
    from tasks.registry.decisions import promote_by_hand

    cfg = _setup(config, set)
    entry = guarded(lambda: promote_by_hand(cfg.artifacts.root, fingerprint, reason))
    typer.echo(f"champion: {entry['model_fingerprint']} (promoted by {entry['user']}: {reason})")


@app.command()
def rollback(to: Annotated[Optional[str], typer.Option("--to", help="A former champion's fingerprint (default: the previous one).")] = None,
             reason: Annotated[Optional[str], typer.Option("--reason", help="Why, for the champion history.")] = None,
             config: ConfigOpt = None, set: SetOpt = None) -> None:
    """Make the previous champion (or --to a former one) the champion again; the current one is demoted."""
    from tasks.registry.decisions import rollback as roll_back

    cfg = _setup(config, set)
    entry = guarded(lambda: roll_back(cfg.artifacts.root, to, reason))
    typer.echo(f"champion: {entry['model_fingerprint']} ({entry['reason']})")


@app.command()
def gc(dry_run: Annotated[bool, typer.Option("--dry-run", help="Only list what would be removed.")] = False,
       config: ConfigOpt = None, set: SetOpt = None) -> None:
    """Remove what no run needs: dead temporary dirs, idle work dirs, free leases, old published outputs."""
    from tasks.registry.champion import needed_by_champions
    from tasks.store import gc as collector
    from tasks.store.storage import is_local

    cfg = _setup(config, set)
    root = cfg.artifacts.root
    if not is_local(root):
        fail(f"error: tfpipe gc cleans local artifact roots; {root} is in a bucket: use the store's lifecycle rules "
             "for it", 1)
    removals = collector.plan(root, cfg.artifacts, keep=needed_by_champions(root))
    freed = sum(r.bytes for r in removals) if dry_run else collector.remove(removals)
    typer.echo(printing.gc_lines(removals, freed, dry_run, root))


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
    with prefect_errors_are_one_line():
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
