"""The merge methods, one registry: what each is called and what it needs.

The math lives in `tailor` (Model Tailor), `baselines` (the data-free methods) and
`selection` (scores → kept entries); `tailor_ui.engine` runs them over a model pair.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodInfo:
    label: str
    summary: str
    needs_calibration: bool = False
    # combines several fine-tuned models itself; the others run per model, then union
    multi_task_native: bool = False


REGISTRY: dict[str, MethodInfo] = {
    "tailor": MethodInfo("Model Tailor", "salience + sensitivity patch, OBS-compensated",
                         needs_calibration=True),
    "magnitude": MethodInfo("Magnitude patch", "top-keep of |W_ft - W_pre|, no compensation"),
    "wise_ft": MethodInfo("WiSE-FT", "(1 - λ)·W_pre + λ·W_ft"),
    "task_arithmetic": MethodInfo("Task arithmetic", "W_pre + λ·Σ τ", multi_task_native=True),
    "ties": MethodInfo("TIES", "trim, elect sign, disjoint mean", multi_task_native=True),
    "dare": MethodInfo("DARE", "drop 1 - keep of τ at random, rescale the rest"),
}
