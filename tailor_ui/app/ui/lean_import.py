"""Import Gradio without the work a server never uses (start-up time).

Two costs of `import gradio` buy nothing in a running server:
- IPython (about a second), imported only for the notebook magics;
- type-stub writing: for every component class, Gradio's metaclass re-parses the class's
  source file and rewrites a `.pyi` stub next to it for IDEs (1–2 s of CPU per start on
  a 2-core machine, measured; in a container the site-packages write fails silently
  anyway). The stubs are already shipped in the wheel.

Call `prepare()` before anything imports gradio. Importing this module imports nothing
heavy.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType

_META = "gradio.component_meta"


def _no_stub(*_args: object, **_kwargs: object) -> None:
    return None


class _SkipStubWriting(importlib.abc.MetaPathFinder):
    """Finds gradio.component_meta once and swaps its stub writer for a no-op right after
    the module runs, before any component class is defined."""

    def find_spec(self, fullname: str, path: object, target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname != _META:
            return None
        sys.meta_path.remove(self)  # one use; the real finders do the finding
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run(module)
            if hasattr(module, "create_or_modify_pyi"):
                module.create_or_modify_pyi = _no_stub

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def prepare(*, keep_ipython: bool = False) -> None:
    """Make the next `import gradio` lean. No effect once gradio is imported."""
    if "gradio" in sys.modules:
        return
    if not keep_ipython and "IPython" not in sys.modules:
        sys.modules["IPython"] = None  # type: ignore[assignment]  # import fails fast: no magics
    if not any(isinstance(f, _SkipStubWriting) for f in sys.meta_path):
        sys.meta_path.insert(0, _SkipStubWriting())
