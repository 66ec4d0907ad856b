"""The Gradio dashboard: one module per tab, wiring widgets to the service layer.

`build_app(studio)` (blocks.py) assembles the tabs; `Studio` (tailor_ui.app.service, no
Gradio) holds the shared demo pair, the job runner and the sessions. Names are imported
lazily so that importing this package does not import Gradio.
"""

from typing import Any

_EXPORTS = {"App": "blocks", "build_app": "blocks", "launch_options": "blocks"}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(f"tailor_ui.app.ui.{_EXPORTS[name]}"), name)
