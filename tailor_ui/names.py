"""What a parameter's name says: which part of an MLLM it belongs to, its layer number,
its module kind, and the numbered block that groups it with its neighbours."""

from __future__ import annotations

import re
from collections.abc import Sequence

_LAYER = re.compile(r"\.(?:layers|layer|blocks|h)\.(\d+)\.")
_BLOCK = re.compile(r"^(.*?\.(?:layers|layer|blocks|h)\.\d+)\.")


def component(name: str) -> str:
    """Which part of an MLLM a parameter belongs to, for grouping in summaries and plots."""
    lowered = name.lower()
    if "vision" in lowered or "visual" in lowered or "image_encoder" in lowered:
        return "vision"
    if any(k in lowered for k in ("projector", "qformer", "connector", "mm_proj", "merger")):
        return "bridge"
    return "language"


def layer_index(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def module_kind(name: str) -> str:
    """The short module name (q_proj, fc1, input_layernorm…) of a parameter."""
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 else parts[-1]


def block_name(name: str) -> str | None:
    """The numbered block a module lives in (`model.layers.3` of `model.layers.3.mlp.up_proj`)."""
    match = _BLOCK.match(name)
    return match.group(1) if match else None


def layer_groups(modules: Sequence[str]) -> list[list[str]]:
    """Modules grouped by the numbered block they live in, blocks in model order."""
    groups: dict[str, list[str]] = {}
    for name in modules:
        groups.setdefault(block_name(name) or name, []).append(name)
    return list(groups.values())
