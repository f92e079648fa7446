"""Stage 3, train: fit the model on the TFRecord cache under a distribution strategy, resumably.

Two styles, as in the seed: `fit` (compile + fit) and `custom` (the expert GradientTape loop run through
`strategy.run`). Both checkpoint at the end of every epoch in `<root>/train/.work-<fingerprint>/`, and on a stop
signal in the middle of one; an interrupted run with the same fingerprint resumes from there with its optimizer
state. The finished model is published to `<root>/train/<fingerprint>/`.

The modules, in the order a run goes through them:
- `stage`: `train` (cache or train, publish; the multi-worker publish protocol) and `train_and_save`;
- `setup`: `start_run` (seeds, inputs, model and optimizer in the strategy scope, as a TrainingRun);
- `objectives` (losses, metrics) and `optimization` (optimizer, learning-rate schedules);
- `checkpoints`: the work dir and its bucket mirror, `EpochRecorder` (resume, end of epoch, interrupt), outputs;
- `watches`: early stopping and the plateau schedule, checkpointed;
- `loops`: `run_epochs` with the two styles side by side and the one way both count batches and stop.
"""

from tasks.train.checkpoints import EpochRecorder, clear_work, mirror_dir, pull_mirror, push_mirror, work_dir
from tasks.train.loops import CustomStyle, EpochBatches, FitStyle, distribute, run_epochs, weights_digest
from tasks.train.objectives import LABEL_MODES, METRIC_NAMES, MacroPrecisionRecall, make_accuracy, make_loss, make_metrics
from tasks.train.optimization import current_learning_rate, learning_rate, make_optimizer
from tasks.train.setup import (StopRequest, TrainingRun, build_for_training, class_weights, start_run, steps_per_epoch,
                               training_inputs)
from tasks.train.stage import TRAIN_CODE_VERSION, model_artifact, publish_model, train, train_and_save, train_fingerprint
from tasks.train.watches import EarlyStopping, MetricWatch, Plateau

__all__ = [
    "CustomStyle", "EarlyStopping", "EpochBatches", "EpochRecorder", "FitStyle", "LABEL_MODES", "METRIC_NAMES",
    "MacroPrecisionRecall", "MetricWatch", "Plateau", "StopRequest", "TRAIN_CODE_VERSION", "TrainingRun",
    "build_for_training", "class_weights", "clear_work", "current_learning_rate", "distribute", "learning_rate",
    "make_accuracy", "make_loss", "make_metrics", "make_optimizer", "mirror_dir", "model_artifact", "publish_model",
    "pull_mirror", "push_mirror", "run_epochs", "start_run", "steps_per_epoch", "train", "train_and_save",
    "train_fingerprint", "training_inputs", "weights_digest", "work_dir",
]
