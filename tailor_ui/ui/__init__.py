"""The Gradio dashboard: one module per tab, wiring widgets to the engine.

`build_app(studio)` (blocks.py) assembles the tabs; `Studio` (studio.py, no Gradio) holds
the shared demo pair, the job runner and the sessions. Names are imported lazily so that
`tailor_ui.ui.studio` can load the demo pair while Gradio is still importing.
"""

from typing import Any

_EXPORTS = {"App": "blocks", "build_app": "blocks", "launch_options": "blocks",
            "Studio": "studio", "StudioConfig": "studio", "env_config": "studio"}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(f"tailor_ui.ui.{_EXPORTS[name]}"), name)
