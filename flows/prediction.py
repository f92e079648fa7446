"""The on-demand batch prediction flow: one process (`predict.engine: local`), or one Prefect task per input file
on a Dask cluster through prefect-dask (`predict.engine: dask`)."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows import dashboard
from flows.dask_cluster import dask_runner, threads_per_worker
from flows.policy import served_call
from flows.retry import retry_transient
from pipeline_config import PipelineConfig, load_config
from tasks.data.inputs import PredictionInput, prediction_input
from tasks.errors import PipelineError
from tasks.serve import parts
from tasks.store import storage
from tasks.store.refs import PredictionArtifact
from tasks.validation.drift import drift_path


@task(name="predict", retries=1, retry_delay_seconds=5, retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def batch_predict_task(config_file: str | None, overrides: dict[str, Any] | None, model: str, input: str,
                       output: str, allow_unblessed: bool, overwrite: bool) -> PredictionArtifact:
    from tasks.serve import predict as predict_stage  # TensorFlow loads here: a refused served call never waits for it

    cfg = load_config(config_file, overrides)
    return predict_stage.predict(cfg, model, input, output, allow_unblessed=allow_unblessed, overwrite=overwrite)


@task(name="predict-file", retries=1, retry_delay_seconds=2, retry_condition_fn=retry_transient, cache_policy=NO_CACHE)
def predict_file_task(config_file: str | None, overrides: dict[str, Any] | None, model_fingerprint: str,
                      input_file: PredictionInput, output_dir: str, threads: int, overwrite: bool) -> dict:
    """One input file into its part, on a Dask worker (which keeps the model loaded for its next files)."""
    cfg = load_config(config_file, overrides)
    return parts.predict_part(cfg, model_fingerprint, input_file, output_dir, threads, overwrite)


@flow(name="batch-prediction")
def batch_prediction(model: str = "champion", input: str = "data/mnist/test.parquet", output: str = "predictions.parquet",
                     allow_unblessed: bool = False, config_file: str | None = None,
                     overrides: dict[str, Any] | None = None, overwrite: bool = False) -> PredictionArtifact | dict:
    """`overwrite` replaces an existing output, only one tfpipe wrote. Served by `tfpipe serve`, every parameter
    is checked first against its `serve` settings (flows/policy.py)."""
    config_file, overrides = served_call(config_file, overrides, model=model, input=input, output=output,
                                         allow_unblessed=allow_unblessed, overwrite=overwrite)
    cfg = load_config(config_file, overrides)
    try:
        if cfg.predict.engine == "dask":
            parts.check_output_dir(output, overwrite)
            return _on_dask(cfg, config_file, overrides, model, input, output, allow_unblessed, overwrite)
        artifact = batch_predict_task(config_file, overrides, model, input, output, allow_unblessed, overwrite)
        get_run_logger().info("wrote %d predictions to %s", artifact.rows, artifact.output)
        dashboard.markdown("batch-prediction", description="latest on-demand batch prediction", text="\n".join([
            "# Batch prediction", f"- model `{artifact.model_fingerprint[:12]}`", f"- input `{artifact.input}`",
            f"- output `{artifact.output}`: {artifact.rows} rows, sha256 `{artifact.sha256[:16]}`",
            *drift_lines(artifact.drift_path)]))
        return artifact
    finally:
        dashboard.drain()


def _on_dask(cfg: PipelineConfig, config_file, overrides, model: str, input: str, output: str,
             allow_unblessed: bool, overwrite: bool) -> dict:
    """Resolve the model and the files once, then score the files on the cluster as a subflow whose task runner
    is Dask (an existing scheduler, or a LocalCluster of processes with one thread each)."""
    fingerprint = parts.resolve_blessed(cfg, model, allow_unblessed)
    files = parts.input_files(cfg, prediction_input(cfg.artifacts.root, input))
    workers = cfg.predict.dask_workers or parts.default_workers()
    runner = dask_runner(cfg.predict.dask_address, workers)
    return score_files.with_options(task_runner=runner)(config_file, overrides, fingerprint, files, output,
                                                        threads_per_worker(workers), overwrite)


def drift_lines(path: str | None) -> list[str]:
    """The drift report as dashboard lines: the verdict, then a row per figure with its thresholds."""
    if path is None:
        return []
    report = storage.read_json(path)
    rows = [f"| {name} | {f['js_distance']:.3f} (max {f['max_js_distance']}) | {f['psi']:.3f} (max {f['max_psi']}) | "
            f"{'DRIFT' if f['drift'] else 'ok'} |" for name, f in report["figures"].items() if "js_distance" in f]
    verdict = "**drift**" if report["drift"] else "no drift"
    return ["", f"## Inputs against the model's data: {verdict} ({report['images']} images, `{path}`)", "",
            "| figure | Jensen-Shannon distance | PSI | |", "| --- | --- | --- | --- |", *rows]


@flow(name="batch-prediction-dask")
def score_files(config_file: str | None, overrides: dict[str, Any] | None, model_fingerprint: str,
                files: list[PredictionInput], output_dir: str, threads: int, overwrite: bool = False) -> dict:
    cfg = load_config(config_file, overrides)
    futures = {f.given: predict_file_task.submit(config_file, overrides, model_fingerprint, f, output_dir, threads,
                                                 overwrite) for f in files}
    done, failures = [], []
    for input_file, future in futures.items():
        future.wait()
        if future.state.is_completed():
            done.append(future.result())
        else:
            failures.append({"input": input_file, "error": (future.state.message or "failed").splitlines()[0]})
    manifest = parts.write_manifest(cfg, output_dir, model_fingerprint, done, failures)
    scored = sum(not p["skipped"] for p in done)
    dashboard.markdown("batch-prediction", description="latest batch prediction on Dask", text="\n".join([
        "# Batch prediction (Dask)", f"- model `{model_fingerprint[:12]}`", f"- output `{output_dir}`",
        f"- {len(done)} of {len(files)} parts ({scored} scored now, {len(done) - scored} already there), "
        f"{sum(p['rows'] for p in done)} rows", *[f"- FAILED `{f['input']}`: {f['error']}" for f in failures],
        *drift_lines(drift_path(output_dir) if manifest and manifest.get("drift") is not None else None)]))
    if failures and manifest is None:
        raise PipelineError(f"{len(failures)} of {len(files)} input files failed ({', '.join(f['input'] for f in failures)}"
                            f"): the other parts are written; fix or remove the failed files and run again (only the "
                            "missing parts are scored), or set predict.allow_partial=true")
    get_run_logger().info("%d parts in %s (%d scored now)", len(done), output_dir, scored)
    return manifest
