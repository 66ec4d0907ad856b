"""A tailored model as a PEFT LoRA adapter again: a rank-r fit of its delta from the base.

Per changed linear weight, the tailored delta (tailored − base, the patch's entries) is
fitted by its truncated SVD, B = U_r·√S_r and A = √S_r·V_rᵀ (the best rank-r fit in
Frobenius norm, Eckart–Young), saved with lora_alpha = r so peft's scale is 1. Any other
changed tensor (a bias, a norm, an embedding) cannot be low-rank: its module is saved whole
(`modules_to_save`), exactly. `PeftModel.from_pretrained(base, folder)` loads the result.
The report gives each fitted tensor's relative Frobenius error ‖Δ − BA‖ / ‖Δ‖ and the
overall one, √(Σ‖Δ − BA‖²) / √(Σ‖Δ‖²).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch

from tailor_ui.adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from tailor_ui.checkpoint import Checkpoint, key_map
from tailor_ui.errors import UserError
from tailor_ui.io import atomic_path
from tailor_ui.patch import Patch, PatchFile, TensorPatch

_PREFIX = "base_model.model."

ADAPTER_RANK = 16  # the rank of a fit where none is asked for (CLI --adapter-rank, dashboard export)


def _tailored(base: torch.Tensor, tp: TensorPatch) -> torch.Tensor:
    out = base.clone()
    out.view(-1)[tp.index.to(base.device)] = tp.values.to(device=base.device, dtype=base.dtype)
    return out


def low_rank_fit(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """B (out, rank) and A (rank, in) with B @ A the best rank-`rank` fit of `delta`
    (float32); where the matrix is smaller than `rank`, zero rows and columns pad them."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    k = min(rank, s.numel())
    root = s[:k].sqrt()
    b = torch.zeros(delta.shape[0], rank, device=delta.device)
    a = torch.zeros(rank, delta.shape[1], device=delta.device)
    b[:, :k] = u[:, :k] * root
    a[:k] = root[:, None] * vh[:k]
    return b, a


def fit_adapter(patch: Patch | PatchFile, base_value: Callable[[str], torch.Tensor], linears: Collection[str],
                params: Collection[str], rank: int, out_dir: str | Path, *, base_id: str) -> dict[str, Any]:
    """Write `patch` (on the base whose parameters `base_value` reads) as a peft LoRA
    adapter at `out_dir`, atomically; `linears` are the nn.Linear weights that may get a
    low-rank term, `params` every parameter name of the base. Returns the fit's report."""
    if rank < 1:
        raise UserError("the adapter's rank must be positive")
    if not patch.tensors:
        raise UserError("the patch changes nothing: there is no adapter to write")
    tensors: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    squared = [0.0, 0.0]  # Σ‖Δ − BA‖², Σ‖Δ‖²
    linear_changes = {n for n in patch.tensors if n in linears and f"{n[:-7]}.bias" not in patch.tensors}
    for name in sorted(linear_changes):
        base = base_value(name)
        delta = _tailored(base, patch.tensors[name]).float() - base.float()
        b, a = low_rank_fit(delta, rank)
        residual, norm = float(torch.linalg.norm(delta - b @ a)), float(torch.linalg.norm(delta))
        squared[0] += residual ** 2
        squared[1] += norm ** 2
        errors[name] = residual / norm if norm else 0.0
        module = _PREFIX + name[: -len(".weight")]
        tensors[f"{module}.lora_A.weight"] = a.cpu().contiguous()
        tensors[f"{module}.lora_B.weight"] = b.cpu().contiguous()
    whole = sorted({n.rsplit(".", 1)[0] for n in patch.tensors if n not in linear_changes})
    for module in whole:  # every parameter of the module, tailored where the patch says
        for name in (p for p in params if p.rsplit(".", 1)[0] == module):
            base = base_value(name)
            tp = patch.tensors.get(name)
            tensors[_PREFIX + name] = (_tailored(base, tp) if tp is not None else base).cpu().contiguous()
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "use_rslora": False,
              "target_modules": sorted(n[: -len(".weight")] for n in linear_changes) or None,
              "modules_to_save": whole or None, "fan_in_fan_out": False, "bias": "none",
              "lora_dropout": 0.0, "base_model_name_or_path": base_id, "task_type": None,
              "inference_mode": True}
    _save(tensors, config, out_dir)
    overall = (squared[0] / squared[1]) ** 0.5 if squared[1] else 0.0
    return {"rank": rank, "folder": str(out_dir), "low_rank_tensors": len(errors),
            "relative_error": overall, "tensors": errors, "modules_saved_whole": whole}


def _save(tensors: dict[str, torch.Tensor], config: dict[str, Any], out_dir: str | Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")


def linear_weights(model: torch.nn.Module) -> set[str]:
    """The weights of a model's nn.Linear modules, the output embedding excluded (as
    `checkpoint.key_map` counts them)."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {f"{n}.weight" for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m is not output}


def fit_from_model(patch: Patch, model: torch.nn.Module, read: Callable[[str], torch.Tensor], rank: int,
                   out_dir: str | Path, *, base_id: str) -> dict[str, Any]:
    """`fit_adapter` on a loaded base (`read`: its parameter values, e.g. `Pair.base_value`)."""
    return fit_adapter(patch, read, linear_weights(model), [n for n, _ in model.named_parameters()],
                       rank, out_dir, base_id=base_id)


def fit_from_checkpoint(patch: Patch | PatchFile, base_folder: str | Path, rank: int, out_dir: str | Path, *,
                        base_id: str) -> dict[str, Any]:
    """`fit_adapter` on a base read from its checkpoint, tensor by tensor (the streamed path)."""
    with Checkpoint(base_folder) as checkpoint:
        names = key_map(checkpoint.folder, checkpoint.keys)
        return fit_adapter(patch, lambda n: checkpoint.read(names.key_of[n]), names.linears,
                           list(names.key_of), rank, out_dir, base_id=base_id)
