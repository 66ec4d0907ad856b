"""Fine-tuning with forgetting in mind: full, Model-Dowser (sparse), LLaCA / EMA (continual).

The library side (no Gradio here):

- `tailor_ui.training.finetune.finetune` trains a loaded model in place with any method of
  `TRAINING_METHODS` (imported from the module: re-exporting it here would shadow the
  `finetune` submodule),
- `finetune_cli` loads, trains and writes a checkpoint,
- `run_continual` runs a task sequence and returns the accuracy / forgetting table.
"""

from tailor_ui.training.continual import ContinualMethod, ContinualTask, run_continual, summary
from tailor_ui.training.dowser import DowserScores, dowser_importance, dowser_scores
from tailor_ui.training.finetune import (TrainReport, check_options, choose_layers, finetune_cli,
                                         parse_layers, save_checkpoint)
from tailor_ui.training.method import TrainingMethod
from tailor_ui.training.registry import METHODS, TRAINING_METHODS

__all__ = ["ContinualMethod", "ContinualTask", "DowserScores", "METHODS", "TRAINING_METHODS",
           "TrainReport", "TrainingMethod", "check_options", "choose_layers", "dowser_importance",
           "dowser_scores", "finetune_cli", "parse_layers", "run_continual", "save_checkpoint",
           "summary"]
