"""Model-Dowser: score every weight of the pre-trained model, then train only the least
important ones (docs/methods.md#model-dowser).

Importance of weight (i, j) of a linear layer: ψ_i · |W_ij| · a_j, where

- a_j is the mean absolute input on feature j (over every non-padding token), and
- ψ_i is the mean absolute gradient, with respect to output i of that layer (over every
  non-padding token), of a Rademacher probe of the last position's logits,
  S = ξᵀ·logits[last], ξ ∈ {±1}^vocab, drawn independently per prompt and per probe.

Both are averaged over K prompts the base model writes itself from a few random tokens
(images off, so no data is needed; sampled as the authors' script does, `PROBE_SAMPLING`,
64 tokens), with M probes per batch of prompts. The authors average the product ψ ⊗ |W| ⊗ a
of each batch; the product of the means, kept here, picks the same ρ = 0.1 mask to 98 % on
the demo (docs/AUDIT.md), for two vectors per layer instead of a matrix. Boundary rules:
ψ = 1 for lm_head's outputs (its output *is* the logits; |∂S/∂logit| = |ξ| = 1), and a
layer the text-only prompts never reach (the projector: images are off) gets a = 1 and
ψ = 1, i.e. importance |W|.

Because importance factors into ψ (one number per output) and a (one per input), only
those two vectors per layer are stored: the cache of a 7B model is a few MB, and the full
importance of one matrix is rebuilt on demand. The cache is a safetensors file keyed by the
model's identity (a fingerprint of its weights) and the probing settings.

The mask keeps the lowest-importance fraction ρ of each weight matrix trainable (exactly
round(ρ·n) entries; ties broken by position), and the training loop zeroes every other
gradient entry. `DowserTraining` is the method `finetune` runs: it probes once (cached by
the model's fingerprint), masks the gradients after each backward pass and masks weight
decay the same way, so the other entries stay bit-identical. Norms and biases of the
trained layers train fully.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tailor_ui.control import Cancelled, Progress, StopCheck, no_progress
from tailor_ui.weights import to_model
from tailor_ui.errors import UserError
from tailor_ui.io import atomic_path
from tailor_ui.names import component
from tailor_ui.training.method import RunSetup, TrainingMethod

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
FORMAT = "tailor_ui.dowser/1"
# how the authors' probe script samples its prompts (Model-Dowser's repository)
PROBE_SAMPLING = {"temperature": 0.9, "top_p": 0.9, "repetition_penalty": 1.05}


@dataclass
class DowserScores:
    """Per linear layer (module name): ψ over its outputs and a over its inputs (float32, CPU)."""

    psi: dict[str, torch.Tensor]
    act: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def importance(self, module: str, weight: torch.Tensor) -> torch.Tensor:
        """ψ_i · |W_ij| · a_j for one layer's weight (float32, on the weight's device)."""
        if module not in self.psi:
            raise KeyError(f"no Model-Dowser scores for {module}")
        w = weight.detach().float().abs()
        return self.psi[module].to(w.device)[:, None] * w * self.act[module].to(w.device)[None, :]

    def save(self, path: str | Path) -> None:
        """One safetensors file (`<module>::psi`, `<module>::act`), written atomically."""
        tensors = {}
        for name in self.psi:
            tensors[f"{name}::psi"] = self.psi[name].contiguous()
            tensors[f"{name}::act"] = self.act[name].contiguous()
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"tailor_ui": json.dumps(
                {"format": FORMAT, "meta": self.meta})})

    @classmethod
    def load(cls, path: str | Path) -> "DowserScores":
        psi: dict[str, torch.Tensor] = {}
        act: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt") as f:
            info = json.loads((f.metadata() or {}).get("tailor_ui", "{}"))
            if info.get("format") != FORMAT:
                raise UserError(f"{Path(path).name} is not a Model-Dowser importance file")
            for key in f.keys():
                name, kind = key.rsplit("::", 1)
                (psi if kind == "psi" else act)[name] = f.get_tensor(key)
        return cls(psi=psi, act=act, meta=info.get("meta", {}))


# ------------------------------------------------------------------------ the probe core

def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(tokens, features) without padding positions, when `mask` describes x's tokens."""
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        x = x[mask.bool()]
    return x.reshape(-1, x.shape[-1])


def _last_positions(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token (right padding)."""
    return mask.long().sum(dim=1) - 1


def rademacher(shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, tuple(shape), generator=generator).float() * 2 - 1


class _Means:
    """Running per-feature sums and row counts, by module; `mean` is None for one never seen."""

    def __init__(self) -> None:
        self.total: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}

    def add(self, name: str, rows: torch.Tensor) -> None:
        self.total[name] = self.total.get(name, 0) + rows.sum(dim=0)
        self.rows[name] = self.rows.get(name, 0) + rows.shape[0]

    def mean(self, name: str) -> torch.Tensor | None:
        return (self.total[name] / self.rows[name]).cpu() if self.rows.get(name, 0) > 0 else None


def _watch(modules: Mapping[str, torch.nn.Linear], unit: set[str], act: _Means,
           state: dict[str, Any]) -> list[Any]:
    """Forward hooks that add each module's |input| to `act` and keep its output (made
    differentiable) in state["outputs"], except for the `unit` modules."""
    def hook(name: str) -> Callable:
        def forward_hook(_module: torch.nn.Module, args: tuple, output: torch.Tensor):
            with torch.no_grad():
                act.add(name, _rows(args[0], state["mask"]).float().abs())
            if name in unit:
                return None
            if not output.requires_grad:
                output = output.detach().requires_grad_(True)
            state["outputs"][name] = output
            return output
        return forward_hook

    return [m.register_forward_hook(hook(n)) for n, m in modules.items()]


def _probe(last: torch.Tensor, outputs: dict[str, torch.Tensor], mask: torch.Tensor,
           probes: int | torch.Tensor, generator: torch.Generator, psi: _Means) -> None:
    """Add |∂(ξᵀ·last)/∂output| of every watched output to `psi`, for each probe ξ."""
    names = list(outputs)
    tensors = [outputs[n] for n in names]
    vectors = (probes if isinstance(probes, torch.Tensor)
               else rademacher((probes, *last.shape), generator))
    for m, xi in enumerate(vectors if tensors else []):
        xi = xi.to(last.device)
        if xi.dim() == 1:
            xi = xi.expand_as(last)
        s = (xi * last).sum()
        grads = torch.autograd.grad(s, tensors, retain_graph=m < len(vectors) - 1,
                                    allow_unused=True)
        for name, out, grad in zip(names, tensors, grads):
            if grad is None:
                grad = torch.zeros_like(out)
            psi.add(name, _rows(grad, mask).float().abs())


def _scores(modules: Mapping[str, torch.nn.Linear], unit: set[str], psi: _Means,
            act: _Means) -> DowserScores:
    """The means, with the boundary rules: ψ = 1 for `unit` modules and for any module
    without gradients; a = 1 (and ψ = 1) for a module never reached."""
    out_psi: dict[str, torch.Tensor] = {}
    out_act: dict[str, torch.Tensor] = {}
    for name, module in modules.items():
        rows, cols = module.weight.shape
        a = act.mean(name)
        out_act[name] = a if a is not None else torch.ones(cols)
        p = psi.mean(name) if a is not None and name not in unit else None
        out_psi[name] = p if p is not None else torch.ones(rows, dtype=torch.float32)
    return DowserScores(psi=out_psi, act=out_act)


def probe_statistics(call: Callable[[Batch], torch.Tensor], modules: Mapping[str, torch.nn.Linear],
                     batches: Iterable[Batch], *, probes: int | torch.Tensor = 8,
                     generator: torch.Generator | None = None, unit_psi: Iterable[str] = (),
                     should_stop: StopCheck | None = None,
                     on_batch: Callable[[int], None] | None = None) -> DowserScores:
    """ψ and a of each module, from `call(batch) -> logits (batch, tokens, vocab)`.

    Each batch needs an `attention_mask` (right-padded). `probes` is the number M of
    Rademacher probes per batch, or an explicit (M, vocab) tensor of probe vectors shared by
    every prompt (the tests enumerate all sign vectors to check the expectation exactly).
    Modules in `unit_psi` get ψ = 1 (lm_head); modules never reached get ψ = 1 and a = 1.
    Parameters do not need gradients: the outputs of the watched layers are made
    differentiable by the hooks, and only gradients with respect to them are computed.
    """
    generator = generator or torch.Generator().manual_seed(0)
    unit = set(unit_psi)
    psi, act = _Means(), _Means()
    state: dict[str, Any] = {"mask": None, "outputs": {}}
    handles = _watch(modules, unit, act, state)
    try:
        for index, batch in enumerate(batches):
            if should_stop is not None and should_stop():
                raise Cancelled
            mask = batch["attention_mask"]
            state.update(mask=mask, outputs={})
            with torch.enable_grad():
                logits = call(batch)
                last = logits[torch.arange(logits.shape[0], device=logits.device),
                              _last_positions(mask).to(logits.device)].float()
                _probe(last, state["outputs"], mask, probes, generator, psi)
            state["outputs"] = {}
            if on_batch is not None:
                on_batch(index + 1)
    finally:
        for h in handles:
            h.remove()
        state.clear()
    return _scores(modules, unit, psi, act)


# ------------------------------------------------------------------- on a real MLLM

def scored_modules(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """Every linear of the language model and the projector, plus lm_head (vision: images
    are off while probing, so the tower is never scored)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and component(name) != "vision":
            out[name] = module
    return out


def _output_name(model: torch.nn.Module) -> str | None:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return next((n for n, m in model.named_modules() if m is head), None) if head is not None else None


def model_fingerprint(model: torch.nn.Module, samples: int = 4096) -> str:
    """Identity of a model's weights: names, shapes, dtypes and a strided sample of each
    tensor's values (fast on a 7B model, and any real fine-tuning changes it)."""
    digest = hashlib.sha256(type(model).__name__.encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            stride = max(1, flat.numel() // samples)
            sample = flat[::stride].float().cpu().contiguous()
            digest.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            digest.update(sample.numpy().tobytes())
            digest.update(str(float(flat.float().abs().sum())).encode())
    return digest.hexdigest()[:20]


def _vocabulary_ids(processor: Any, model: torch.nn.Module) -> torch.Tensor:
    """Ordinary token ids to start prompts from: no special tokens, none past the embedding."""
    tokenizer = getattr(processor, "tokenizer", processor)
    size = min(len(tokenizer), model.get_input_embeddings().weight.shape[0])
    special = set(tokenizer.all_special_ids or [])
    for attr in ("image_token_id", "video_token_id"):
        value = getattr(processor, attr, None) or getattr(model.config, attr, None)
        if isinstance(value, int):
            special.add(value)
    ids = [i for i in range(size) if i not in special]
    if not ids:
        raise UserError("the tokenizer has no ordinary tokens to start probe prompts from")
    return torch.tensor(ids)


def self_generated_prompts(model: torch.nn.Module, processor: Any, n: int = 64, *,
                           start_tokens: int = 3, length: int = 64, batch_size: int = 8,
                           seed: int = 0, sampling: Mapping[str, float] | None = None
                           ) -> list[Batch]:
    """`n` text-only prompts the model writes itself from `start_tokens` random tokens,
    right-padded in batches of `batch_size`. `sampling`: `generate`'s temperature, top_p
    and repetition_penalty (default: the authors' `PROBE_SAMPLING`).

    The end-of-text token and everything after it are cut, so the last position is always
    a real continuation.
    """
    tokenizer = getattr(processor, "tokenizer", processor)
    vocab = _vocabulary_ids(processor, model)
    gen = torch.Generator().manual_seed(seed)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    rows: list[list[int]] = []
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, n, batch_size):
            count = min(batch_size, n - start)
            starts = vocab[torch.randint(0, len(vocab), (count, start_tokens), generator=gen)]
            if bos is not None:
                starts = torch.cat([torch.full((count, 1), bos), starts], dim=1)
            ids = starts.to(device)
            try:
                with torch.inference_mode():
                    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                         do_sample=True, top_k=0,
                                         **{**PROBE_SAMPLING, **(sampling or {})},
                                         max_new_tokens=max(length - ids.shape[1], 1),
                                         pad_token_id=pad, eos_token_id=eos)
            except (TypeError, ValueError) as exc:  # what a model that needs its image raises
                raise UserError("Model-Dowser probes the model with text-only prompts, and this "
                                f"model cannot generate without an image ({type(exc).__name__}: "
                                f"{str(exc).strip()[:200]})") from exc
            for row in out.cpu().tolist():
                if eos is not None and eos in row[ids.shape[1]:]:
                    row = row[:ids.shape[1] + row[ids.shape[1]:].index(eos)]
                rows.append(row)
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(r) for r in chunk)
        input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, r in enumerate(chunk):
            input_ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        batches.append({"input_ids": input_ids, "attention_mask": mask})
    return batches


@contextmanager
def _frozen(model: torch.nn.Module) -> Iterator[None]:
    """No parameter gradients and no dropout while probing; both restored afterwards."""
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    was_training = model.training
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
        model.train(was_training)


def _cache_file(cache: str | Path, key: str) -> Path:
    cache = Path(cache)
    return cache if cache.suffix == ".safetensors" else cache / f"dowser-{key}.safetensors"


def dowser_scores(model: torch.nn.Module, processor: Any, *, K: int = 64, M: int = 8,
                  seed: int = 0, start_tokens: int = 3, prompt_length: int = 64,
                  batch_size: int = 8, sampling: Mapping[str, float] | None = None,
                  cache: str | Path | None = None, progress: Progress | None = None,
                  should_stop: StopCheck | None = None) -> DowserScores:
    """ψ and a of every scored linear of the (pre-trained) model, probed with K
    self-generated prompts (`sampling`: see `self_generated_prompts`) and M Rademacher
    probes per batch.

    `cache`: a folder (one file per model fingerprint and settings) or a `.safetensors`
    file; an existing entry with the same key is loaded instead of probing again.
    """
    if K < 1 or M < 1 or batch_size < 1 or start_tokens < 1 or prompt_length <= start_tokens:
        raise UserError("Model-Dowser needs K ≥ 1 prompts, M ≥ 1 probes, batch size ≥ 1 and "
                        "a prompt length above the number of start tokens")
    report = progress or no_progress
    settings = {"K": K, "M": M, "seed": seed, "start_tokens": start_tokens,
                "prompt_length": prompt_length, "batch_size": batch_size,
                "sampling": {**PROBE_SAMPLING, **(sampling or {})}}
    key = None
    if cache is not None:
        identity = model_fingerprint(model)
        key = hashlib.sha256(json.dumps([identity, settings], sort_keys=True).encode()).hexdigest()[:20]
        path = _cache_file(cache, key)
        if path.is_file():
            try:
                scores = DowserScores.load(path)
            except (UserError, SafetensorError, OSError, ValueError) as exc:  # probed again below
                log.warning("Model-Dowser: cached scores %s unreadable, probing again (%s: %s)", path,
                            type(exc).__name__, exc)
                scores = None
            if scores is not None and scores.meta.get("key") == key:
                scores.meta["cached"] = True
                return scores
    start = time.perf_counter()
    modules = scored_modules(model)
    head = _output_name(model)
    with _frozen(model):
        report("Model-Dowser: the model writes its probe prompts", 0, 1)
        batches = self_generated_prompts(model, processor, K, start_tokens=start_tokens,
                                         length=prompt_length, batch_size=batch_size, seed=seed,
                                         sampling=sampling)

        def call(batch: Batch) -> torch.Tensor:
            inputs = to_model(batch, model)
            return model(**inputs, use_cache=False).logits

        scores = probe_statistics(
            call, modules, batches, probes=M, generator=torch.Generator().manual_seed(seed + 1),
            unit_psi=[head] if head else [], should_stop=should_stop,
            on_batch=lambda done: report("Model-Dowser: probing output sensitivity", done,
                                         len(batches)))
    scores.meta = {**settings, "key": key, "seconds": time.perf_counter() - start, "cached": False}
    if cache is not None and key is not None:
        scores.save(_cache_file(cache, key))
    return scores


def dowser_importance(model: torch.nn.Module, processor: Any, K: int = 64, M: int = 8,
                      seed: int = 0, **options: Any) -> dict[str, torch.Tensor]:
    """Importance ψ_i·|W_ij|·a_j of every scored linear weight, by parameter name.

    This materialises one float32 tensor per weight; the training path keeps only the
    factors (`dowser_scores`) and builds one matrix at a time.
    """
    scores = dowser_scores(model, processor, K=K, M=M, seed=seed, **options)
    modules = dict(model.named_modules())
    return {f"{name}.weight": scores.importance(name, modules[name].weight) for name in scores.psi}


def keep_lowest(importance: torch.Tensor, rho: float) -> torch.Tensor:
    """Boolean mask of exactly round(ρ·n) entries with the lowest importance (ties: the
    earlier position wins)."""
    if not 0.0 <= rho <= 1.0:
        raise UserError(f"rho must be between 0 and 1, got {rho}")
    flat = importance.reshape(-1)
    count = round(rho * flat.numel())
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if count:
        order = torch.argsort(flat, stable=True)
        mask[order[:count]] = True
    return mask.reshape(importance.shape)


def dowser_masks(model: torch.nn.Module, scores: DowserScores, weights: Sequence[str],
                 rho: float) -> dict[str, torch.Tensor]:
    """Trainable-entry masks for the named linear weights (`<module>.weight`)."""
    out = {}
    for param in weights:
        module = param.rsplit(".", 1)[0]
        weight = model.get_parameter(param)
        psi, act = scores.psi.get(module), scores.act.get(module)
        if psi is None or act is None or (psi.numel(), act.numel()) != tuple(weight.shape):
            raise UserError(f"the Model-Dowser scores do not fit {module} (were they computed "
                            "on another model?)")
        out[param] = keep_lowest(scores.importance(module, weight), rho)
    return out


def linear_weights(model: torch.nn.Module, params: Iterable[str]) -> list[str]:
    """The names among `params` that are the weight of an nn.Linear (what Dowser masks)."""
    linears = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return [p for p in params if p in linears]


class DowserTraining(TrainingMethod):
    """Model-Dowser: of each trained linear weight only the round(ρ·n) least important
    entries change. Options: `rho`, `importance` (scores computed earlier on the same base),
    `importance_cache` (folder or file), `probe_prompts` (K), `probes` (M)."""

    label = "Model-Dowser (sparse)"
    short = "dowser"
    about = ("only the ρ least important entries of each weight matrix move (importance "
             "probed once on the pre-trained model); the rest stay bit-identical.")
    options = {"rho": 0.1, "importance": None, "importance_cache": None, "probe_prompts": 64,
               "probes": 8}
    option_help = {"rho": "trainable fraction per matrix", "importance_cache": "folder caching the scores",
                   "probe_prompts": "K self-generated prompts", "probes": "M Rademacher probes per batch"}

    @classmethod
    def problems(cls, options: Mapping[str, Any]) -> list[str]:
        rho = options.get("rho", 0.1)
        return [] if 0.0 <= rho <= 1.0 else [f"rho must be between 0 and 1, got {rho}"]

    def settings(self) -> dict[str, Any]:
        return {k: self.values[k] for k in ("rho", "probe_prompts", "probes")}

    def prepare(self, setup: RunSetup) -> None:
        model, v = setup.model, self.values
        scores = v["importance"] if v["importance"] is not None else dowser_scores(
            model, setup.processor, K=v["probe_prompts"], M=v["probes"], seed=setup.seed,
            cache=v["importance_cache"], progress=setup.progress, should_stop=setup.should_stop)
        self.importance = {k: scores.meta.get(k) for k in ("key", "seconds", "cached")}
        self.use_masks(model, dowser_masks(model, scores, linear_weights(model, setup.names),
                                           v["rho"]))

    def use_masks(self, model: torch.nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
        """Train only the True entries of each named weight (the others stay bit-identical)."""
        self.masks = {n: m.to(model.get_parameter(n).device) for n, m in masks.items()}
        self.by_param = {model.get_parameter(n): m for n, m in self.masks.items()}

    def decay_mask(self, param: torch.nn.Parameter) -> torch.Tensor | None:
        return self.by_param.get(param)

    def after_backward(self) -> None:
        for param, mask in self.by_param.items():
            if param.grad is not None:
                param.grad.masked_fill_(~mask, 0)

    def trainable_entries(self, name: str, param: torch.nn.Parameter) -> int:
        mask = self.masks.get(name)
        return param.numel() if mask is None else int(mask.sum())

    def extra(self) -> dict[str, Any]:
        out: dict[str, Any] = {"importance": self.importance} if hasattr(self, "importance") else {}
        if self.masks:
            out["masked_tensors"] = len(self.masks)
            out["kept_fraction"] = (sum(int(m.sum()) for m in self.masks.values())
                                    / sum(m.numel() for m in self.masks.values()))
        return out
