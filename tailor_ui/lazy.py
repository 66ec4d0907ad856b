"""A fine-tuned model that is never loaded: its tensors are read from the safetensors
shards one at a time, when the engine asks for them.

`tailor` needs the base as a working model (calibration forwards) but of the fine-tuned
model only the values of the tensors it is processing, so the CLI loads one model and
reads the other lazily (`load_pair(..., lazy=True)`). Checkpoint keys are mapped to
parameter names with transformers' own conversion mapping (`tailor_ui.stream.key_map`),
and values come in the base parameter's dtype, as `from_pretrained(dtype=...)` gives them.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import torch

from tailor_ui.errors import UserError
from tailor_ui.pair import check_shapes
from tailor_ui.stream import Checkpoint, key_map


class LazyWeights:
    """The parameters of a fine-tuned checkpoint folder, read on demand by parameter name.

    `reads` counts the reads per parameter: what a run held is what it read.
    """

    def __init__(self, folder: str | Path, base: torch.nn.Module) -> None:
        self.folder = Path(folder)
        self.checkpoint = Checkpoint(self.folder)
        names = key_map(self.folder, self.checkpoint.keys)
        if names.architecture != type(base).__name__:
            raise UserError(f"the models differ in architecture: base is {type(base).__name__}, "
                            f"fine-tuned is {names.architecture}")
        params = {n: tuple(p.shape) for n, p in base.named_parameters()}
        if names.converted and any(n not in names.key_of for n in params):
            raise UserError(f"{self.folder.name}: transformers fuses or splits some tensors when loading "
                            f"(e.g. {sorted(names.converted)[0]}), so they cannot be read one by one; "
                            "load it in memory")
        check_shapes(params, {names.param_of[k]: self.checkpoint.tensors[k].shape
                              for k in names.param_of})
        self.key_of = {n: names.key_of[n] for n in params}
        self.reads: Counter[str] = Counter()
        self._lock = threading.Lock()  # one open shard handle: one read at a time

    def read(self, name: str, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
        """A fresh tensor holding the parameter's fine-tuned value."""
        with self._lock:
            tensor = self.checkpoint.read(self.key_of[name])
            self.reads[name] += 1
        return tensor.to(device=device, dtype=dtype)

    def close(self) -> None:
        self.checkpoint.close()
