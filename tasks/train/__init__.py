"""The train stage: fit the model on the TFRecord cache under a distribution strategy, resumably.

Two styles, as in the seed: `fit` (compile + fit) and `custom` (the expert GradientTape loop run through
`strategy.run`). Both checkpoint at the end of every epoch in `<root>/train/.work-<fingerprint>/`, and on a stop
signal in the middle of one; an interrupted run with the same fingerprint resumes from there with its optimizer
state. The finished model is published to `<root>/train/<fingerprint>/`.

The modules, in the order a run goes through them:
- `stage`: `train` (cache or train, publish; the multi-worker publish protocol) and `train_and_save`;
- `setup`: `start_run` (seeds, inputs, model and optimizer in the strategy scope), which makes the `run.TrainingRun`
  every later step is handed;
- `objectives` (losses, metrics) and `optimization` (optimizer, learning-rate schedules);
- `phases`: the trainable set of each phase, warm starts; `batch_norm`: synchronised and recalibrated statistics;
- `checkpoints`: the work dir and its bucket mirror, `EpochRecorder` (resume, end of epoch, interrupt), outputs;
- `watches`: early stopping and the plateau schedule, checkpointed;
- `loops`: `run_epochs` with the two styles side by side and the one way both count batches and stop.

Also here: worker.py, one worker of a multi-worker run (`python -m tasks.train.worker`), and `ingest_for`, the
dataset a training run uses (under multi_worker, through the chief). run.py imports no other module of the stage
but phases.py: the steps that are handed a TrainingRun import it, never the other way.

May import: tasks.data, tasks.model, tasks.distributed, tasks.registry (train.init_from), tasks.serve (the export
after training), tasks.store.
"""
