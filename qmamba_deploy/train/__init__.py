"""Training: one loop for restoration training and QAT, in small modules.

* :mod:`.loop` -- :func:`fit`, the loop (DDP, schedule, EMA, validation, log, resumable checkpoints);
* :mod:`.losses` -- losses, learning-rate schedules, the EMA of the weights;
* :mod:`.folder` -- the run folder: checkpoints, ``last.json``, the JSONL log;
* :mod:`.dist` -- DistributedDataParallel under ``torchrun``;
* :mod:`.job` -- the ``train`` job (:func:`train_restoration`) and :func:`run_job`, which QAT reuses.

SPR²Q's short rectifier fine-tune (``jobs/quantize.py``) has its own small teacher-student loop:
it needs no checkpoints, resume or DDP.
"""

from .dist import DistInfo, cleanup_distributed, init_distributed, state_digest
from .folder import RunFolder
from .job import Job, TrainConfig, build_training_model, check_run_folder, make_validator, run_job, train_restoration
from .loop import FitResult, LoopConfig, adam, fit
from .losses import DEFAULT_LOSS, EMA, LOSSES, SCHEDULES, Schedule, charbonnier_loss

__all__ = ["DEFAULT_LOSS", "EMA", "LOSSES", "SCHEDULES", "DistInfo", "FitResult", "Job", "LoopConfig", "RunFolder",
           "Schedule", "TrainConfig", "adam", "build_training_model", "charbonnier_loss", "check_run_folder",
           "cleanup_distributed", "fit", "init_distributed", "make_validator", "run_job", "state_digest",
           "train_restoration"]
