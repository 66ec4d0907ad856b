"""The merge methods, one registry: what each is called, what it reads and how it merges.

`method` describes a method (`Method`); `registry` lists them (`REGISTRY`). The math lives
in `tailor` (Model Tailor), `baselines` (the classic data-free methods), `selection`
(scores → kept entries) and one module per newer method (`breadcrumbs`, `della`);
`tailor_ui.routing` routes each tensor through a method, `tailor_ui.engine` runs them
over a model pair.
"""

from tailor_ui.methods.method import Method
from tailor_ui.methods.registry import REGISTRY

__all__ = ["Method", "REGISTRY"]
