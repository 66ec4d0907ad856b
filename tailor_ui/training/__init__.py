"""Fine-tuning with forgetting in mind: full, Model-Dowser (sparse), LLaCA / EMA (continual).

The engine side of issue 7 (no Gradio here):

- `tailor_ui.training.finetune.finetune` trains a loaded model in place (imported from the
  module: re-exporting it here would shadow the `finetune` submodule),
- `finetune_cli` loads, trains and writes a checkpoint,
- `run_continual` runs a task sequence and returns the accuracy / forgetting table.
"""

from tailor_ui.training.continual import CONTINUAL_METHODS, ContinualTask, run_continual, summary
from tailor_ui.training.dowser import DowserScores, dowser_importance, dowser_scores
from tailor_ui.training.finetune import (METHODS, TrainReport, choose_layers, finetune_cli,
                                         parse_layers, save_checkpoint)

__all__ = ["CONTINUAL_METHODS", "ContinualTask", "DowserScores", "METHODS", "TrainReport",
           "choose_layers", "dowser_importance", "dowser_scores", "finetune_cli", "parse_layers",
           "run_continual", "save_checkpoint", "summary"]
