"""What a deployment may change, read from MTS_* environment variables, and the
dashboard's defaults for a merge."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tailor_ui.demo.sets import DEMO_DIR

ROOT = Path(__file__).resolve().parents[3]
SYSTEM = "system"  # owner of the start-up jobs


@dataclass
class StudioConfig:
    """Everything a deployment may change (app.py reads these from the environment)."""

    workdir: Path
    demo_dir: Path | None = DEMO_DIR
    device: str = "auto"  # where the demo pair lives: auto = cuda when there is one
    model_roots: list[Path] = field(default_factory=list)  # local folders visitors may load
    max_user_pairs: int = 2  # pairs visitors may hold at once (memory)
    calib_examples: int = 64  # built-in calibration examples per run (default)
    calib_batch: int = 16
    max_upload_mb: int = 512  # per uploaded file (Gradio refuses more) and per calibration set
    quick_examples: int = 16  # examples per set in a merge's quick check (0 = off)
    warm_up: bool = True  # compute the default merge at start, so the first run is fast
    idle_seconds: float = 3 * 3600
    # the job runner's "cuda" lane and how its jobs are called (None: a cuda lane when torch
    # sees a GPU, called through gpu.on_gpu). tests/test_zerogpu.py gives a CPU machine a
    # cuda lane whose jobs run in a fork, as on ZeroGPU, with device "auto" for the demo
    gpu_lane: bool | None = None
    gpu_call: Callable | None = None
    # jobs compute in a fork of the server (tailor_ui/app/workers.py), so the page answers while
    # they run and a crash takes only its job; off: in the lanes' threads
    workers: bool = True


def env_config(workdir: Path | None = None) -> StudioConfig:
    """The configuration from MTS_* environment variables (see app.py)."""
    env = os.environ
    roots = [Path(p).expanduser() for p in env.get("MTS_MODEL_ROOTS", "").split(os.pathsep) if p]
    demo = env.get("MTS_DEMO_DIR")
    return StudioConfig(
        workdir=Path(workdir or env.get("MTS_WORKDIR") or tempfile.mkdtemp(prefix="model-tailor-studio-")),
        demo_dir=Path(demo) if demo else DEMO_DIR,
        device=env.get("MTS_DEVICE", "auto"),
        model_roots=roots or [ROOT / "assets", ROOT / "models"],
        max_user_pairs=int(env.get("MTS_MAX_USER_PAIRS", "2")),
        calib_examples=int(env.get("MTS_CALIB_EXAMPLES", "64")),
        quick_examples=int(env.get("MTS_QUICK_EXAMPLES", "16")),
        max_upload_mb=int(env.get("MTS_MAX_UPLOAD_MB", "512")),
        warm_up=env.get("MTS_WARM_UP", "1") not in ("0", "false", "no"),
        workers=env.get("MTS_WORKERS", "1") not in ("0", "false", "no"),
    )


def default_settings(**overrides: Any):
    """The dashboard's defaults: the CLI's, except one-pass Hessians so that moving a
    slider after the first run re-thresholds cached scores instead of recomputing."""
    from tailor_ui.settings import Settings

    return Settings(**{"hessians": "one-pass", **overrides})


def settings_label(settings) -> str:
    """The sweep's readable label, relative to the dashboard's defaults (one-pass Hessians)."""
    from tailor_ui.evaluation.sweep import setting_label
    from tailor_ui.settings import reads

    label = setting_label(settings).replace(" hessians=one-pass", "")
    if reads(settings.method, "hessians") and settings.hessians == "sequential":
        label += " hessians=sequential"
    return label
