"""Model Tailor Studio: take back forgetting from fine-tuned multimodal LLMs.

The engine (pair, methods, calibration, patch, evaluation) imports no Gradio; the
dashboard (`tailor_ui.app.ui`) and the CLI (`tailor_ui.cli`) are thin clients of it.
"""

__version__ = "0.1.0"
