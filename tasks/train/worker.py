"""One worker of a multi-worker training run (`python -m tasks.train.worker CONFIG_FILE`, its TF_CONFIG saying
which), and the dataset a training run uses.

The chief (worker 0) ingests and names the dataset cache to the others over a collective; every worker trains
the custom loop on its own part of the cache; the chief publishes the model. All workers must see the same
`artifacts.root`. `train.local_workers=N` starts N of these (tasks/distributed/cluster.py) and reads the published
model from the artifact store; `tfpipe train` and `tfpipe run` on a host with TF_CONFIG run the same two steps.
"""

from __future__ import annotations

import os
import sys

from pipeline_config import ConfigError, PipelineConfig, load_config
from tasks.data.ingest import ingest
from tasks.distributed.cluster import broadcast_text, lost_worker_errors, multi_worker_strategy, worker_role
from tasks.errors import PipelineError
from tasks.store.publish import read_manifest
from tasks.store.refs import DatasetArtifact, dataset_artifact


def ingest_on_cluster(cfg: PipelineConfig) -> DatasetArtifact:
    """The chief ingests; every other worker gets the cache it names (the strategy is created first of all)."""
    strategy = multi_worker_strategy(cfg.train)
    chief, index = worker_role(strategy)
    with lost_worker_errors(cfg.train, during="ingest"):
        if chief:
            try:
                dataset = ingest(cfg.data, cfg.artifacts.root, cfg.rebuilds("ingest"))
            except PipelineError as exc:
                broadcast_text(strategy, "error:" + str(exc)[:900], cfg.train.worker_wait_s)
                raise
            broadcast_text(strategy, dataset.uri, cfg.train.worker_wait_s)
            return dataset
        named = broadcast_text(strategy, None, cfg.train.worker_wait_s)
    if named.startswith("error:"):
        raise PipelineError(f"worker {index}: the chief could not ingest the data ({named[6:]})")
    manifest = read_manifest(named)
    if manifest is None:
        raise PipelineError(f"worker {index} cannot find the dataset cache {named} that the chief named: every "
                            "worker must see the same artifacts.root (a shared filesystem path)")
    return dataset_artifact(named, manifest, cache_hit=True)


def ingest_for(cfg: PipelineConfig) -> DatasetArtifact:
    """The dataset for a training run: ingested here, or under multi_worker through the chief."""
    if cfg.train.in_cluster:
        return ingest_on_cluster(cfg)
    return ingest(cfg.data, cfg.artifacts.root, cfg.rebuilds("ingest"))


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from tasks import configure_logging
    from tasks.distributed.devices import configure_devices
    from tasks.model.build import check_model_config
    from tasks.train.stage import train

    configure_logging()
    args = sys.argv[1:] if argv is None else argv
    try:
        cfg = load_config(args[0] if args else None)
        if not cfg.train.in_cluster:
            raise ConfigError("config error: train.strategy: a worker runs with multi_worker")
        configure_devices(cfg.train)  # the strategy, before any other TensorFlow op
        check_model_config(cfg)
        train(cfg, ingest_on_cluster(cfg))
    except (ConfigError, PipelineError) as exc:
        print(f"tfpipe: {'' if isinstance(exc, ConfigError) else 'error: '}{exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
