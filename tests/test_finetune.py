"""Fine-tuning: which layers train, determinism, the method registry, the checkpoint
writer and the CLI-facing function."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from tailor_ui.control import Cancelled
from tailor_ui.data import Example, write_examples
from tailor_ui.demo import world
from tailor_ui.demo.model import DemoArch, make_model
from tailor_ui.demo.processor import build_processor
from tailor_ui.errors import UserError
from tailor_ui.pair import load_model
from tailor_ui.training.finetune import (check_options, choose_layers, decoder_layers, finetune,
                                         finetune_cli, parse_layers, trainable_parameters)
from tailor_ui.training.method import RunSetup, TrainingMethod
from tailor_ui.training.registry import METHODS, TRAINING_METHODS


def tiny(seed: int = 0, layers: int = 4):
    processor = build_processor(world.vocabulary(), image_size=32, patch_size=16)
    torch.manual_seed(seed)
    arch = DemoArch(image_size=32, patch_size=16, vision_hidden=32, vision_layers=1,
                    text_hidden=32, text_layers=layers, heads=2)
    return make_model(processor, arch).eval(), processor


@pytest.fixture(scope="module")
def samples():
    return world.generate("count", 16, 0)


def _changed(a: torch.nn.Module, b: torch.nn.Module) -> list[str]:
    theirs = dict(b.named_parameters())
    return [n for n, p in a.named_parameters() if not torch.equal(p, theirs[n])]


# ------------------------------------------------------------------ layer choice

def test_layer_choice():
    model, _ = tiny()
    assert decoder_layers(model) == [0, 1, 2, 3]
    assert choose_layers(model) == [2, 3]  # the last half
    assert choose_layers(model, 1) == [3]
    assert choose_layers(model, [0, 2]) == [0, 2]
    assert choose_layers(model, "all") == [0, 1, 2, 3]
    assert choose_layers(model, "last:3") == [1, 2, 3]
    assert choose_layers(model, "0,2-3") == [0, 2, 3]
    for bad in (0, 5, [7], [], True):
        with pytest.raises(UserError):
            choose_layers(model, bad)
    names = trainable_parameters(model, [3])
    assert all(".language_model.layers.3." in n for n in names)
    assert {n.split(".layers.3.")[1] for n in names} == {
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
        "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
        "mlp.down_proj.weight", "input_layernorm.weight", "post_attention_layernorm.weight"}
    assert trainable_parameters(model, [3], modules=r"mlp\.") == [
        n for n in names if ".mlp." in n]
    with pytest.raises(UserError, match="nothing to train"):
        trainable_parameters(model, [3], modules="nothing-matches")


def test_parse_layers():
    assert parse_layers(None) is None and parse_layers(" ") is None
    assert parse_layers("4") == 4 and parse_layers("last:2") == 2
    assert parse_layers("20-23,25") == [20, 21, 22, 23, 25]
    assert parse_layers("ALL") == "all"
    for bad in ("x", "3-1", "last:x", "1,,2"):
        with pytest.raises(UserError):
            parse_layers(bad)


# ------------------------------------------------------------------ training

def test_full_finetune_trains_only_the_chosen_layers(samples):
    base, processor = tiny()
    model = copy.deepcopy(base)
    steps, events = [], []
    report = finetune(model, processor, samples, lr=1e-3, batch_size=4, epochs=2,
                      progress=lambda stage, done, total: steps.append((done, total)),
                      on_loss=lambda loss: events.append(("loss", loss, len(steps))))
    changed = _changed(base, model)
    assert changed and all(".language_model.layers.2." in n or ".language_model.layers.3." in n
                           for n in changed)
    assert len(changed) == 18  # 7 linears + 2 norms, in two layers
    assert report.layers == [2, 3] and report.steps == 8 and len(report.losses) == 8
    assert len(report.epoch_losses) == 2 and report.seconds > 0
    assert steps[-1] == (8, 8)
    # each step's loss is heard as it comes, before that step's progress
    assert events == [("loss", loss, k) for k, loss in enumerate(report.losses)]
    assert report.trainable_entries == sum(base.get_parameter(n).numel()
                                           for n in trainable_parameters(base, [2, 3]))
    assert 0 < report.trainable_fraction < 1
    assert all(p.requires_grad for p in model.parameters()) and not model.training
    assert json.dumps(report.to_dict())  # serialisable


def test_finetune_is_deterministic_per_seed(samples):
    base, processor = tiny()
    runs = []
    for seed in (5, 5, 6):
        model = copy.deepcopy(base)
        report = finetune(model, processor, samples, lr=1e-3, batch_size=4, seed=seed)
        runs.append((model, report.losses))
    assert not _changed(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    assert _changed(runs[0][0], runs[2][0])


class KeepFirstRow(TrainingMethod):
    """A throwaway method, registered only by the test: it lets just the first row of each
    trained matrix change (gradient and weight decay masked) and counts its hook calls."""

    options = {"keep_rows": 1}

    @classmethod
    def problems(cls, options):
        rows = options.get("keep_rows", 1)
        return [] if rows >= 1 else [f"keep_rows must be at least 1, got {rows}"]

    def settings(self):
        return {"keep_rows": self.values["keep_rows"]}

    def prepare(self, setup: RunSetup) -> None:
        self.masks = {}
        for n in setup.names:
            p = setup.model.get_parameter(n)
            if p.dim() == 2:
                mask = torch.zeros_like(p, dtype=torch.bool)
                mask[:self.values["keep_rows"]] = True
                self.masks[p] = mask
        self.calls = {"backward": 0, "step": 0, "steps_before_finish": None}

    def decay_mask(self, param):
        return self.masks.get(param)

    def after_backward(self):
        self.calls["backward"] += 1
        for p, mask in self.masks.items():
            p.grad.masked_fill_(~mask, 0)

    def after_step(self):
        self.calls["step"] += 1

    def finish(self):
        self.calls["steps_before_finish"] = self.calls["step"]

    def trainable_entries(self, name, param):
        mask = self.masks.get(param)
        return param.numel() if mask is None else int(mask.sum())

    def extra(self):
        return dict(self.calls)


def test_a_method_registered_at_runtime_trains_through_finetune(samples, monkeypatch):
    """A new method is one class and one registry entry: finetune, its option checks and
    METHODS (what the CLI and the dashboard list) pick it up with no other edit."""
    monkeypatch.setitem(TRAINING_METHODS, "first-row", KeepFirstRow)
    assert "first-row" in METHODS
    base, processor = tiny()
    model = copy.deepcopy(base)
    report = finetune(model, processor, samples, method="first-row", keep_rows=2, layers=1,
                      lr=1e-2, batch_size=4, weight_decay=0.1)
    assert report.method == "first-row" and report.settings["keep_rows"] == 2
    assert report.extra == {"backward": 4, "step": 4, "steps_before_finish": 4}
    full = copy.deepcopy(base)
    finetune(full, processor, samples, layers=1, lr=1e-2, batch_size=4, weight_decay=0.1)
    matrices = [n for n in trainable_parameters(base, [3]) if base.get_parameter(n).dim() == 2]
    assert report.trainable_entries == sum(
        2 * base.get_parameter(n).shape[1] if n in matrices else base.get_parameter(n).numel()
        for n in trainable_parameters(base, [3]))
    for n in matrices:
        old, new = base.get_parameter(n), model.get_parameter(n)
        assert torch.equal(new[2:], old[2:]), n  # masked rows: bit-identical
        assert not torch.equal(new[:2], old[:2]), n
    assert set(_changed(base, model)) == set(_changed(base, full))  # same tensors train
    # other methods ignore the new option, and its check runs whichever method is chosen
    finetune(copy.deepcopy(base), processor, samples[:4], keep_rows=3, layers=1, batch_size=4)
    with pytest.raises(UserError, match="keep_rows must be at least 1"):
        finetune(copy.deepcopy(base), processor, samples, keep_rows=0)
    with pytest.raises(TypeError, match="keep_colums"):
        check_options("first-row", 1e-3, 1, 1, keep_colums=1)
    monkeypatch.undo()
    assert "first-row" not in METHODS
    with pytest.raises(UserError, match="unknown fine-tuning method"):
        finetune(copy.deepcopy(base), processor, samples, method="first-row")


def test_every_registered_method_owns_distinct_options_with_valid_defaults():
    """An option has one owner; a subclass of its owner may share it (the random mask reads
    Model-Dowser's ρ), with the same default, so `--rho` means one thing."""
    owners: dict[str, str] = {}
    for name, cls in TRAINING_METHODS.items():
        assert cls.label and cls.about, name
        assert cls.problems(cls.options) == [], name
        for option in cls.options:
            if option in owners:
                owner = TRAINING_METHODS[owners[option]]
                assert issubclass(cls, owner), f"{option} is owned by {owners[option]} and {name}"
                assert cls.options[option] == owner.options[option], option
                continue
            owners[option] = name
    assert owners == {"rho": "dowser", "importance": "dowser", "importance_cache": "dowser",
                      "probe_prompts": "dowser", "probes": "dowser", "llaca_form": "llaca",
                      "ema_beta": "ema"}
    assert tuple(METHODS) == ("full", "dowser", "random_mask", "llaca", "ema")


def test_cancel_and_bad_input(samples):
    model, processor = tiny()
    with pytest.raises(Cancelled):
        finetune(model, processor, samples, should_stop=lambda: True)
    bad = [Example(image=samples[0].image, question="how many?", answers=())]  # type: ignore[arg-type]
    for kwargs, match in [({"method": "lora"}, "unknown fine-tuning method"),
                          ({"lr": 0}, "learning rate"), ({"epochs": 0}, "epochs"),
                          ({"batch_size": 0}, "batch size"), ({"layers": 9}, "last 9")]:
        with pytest.raises(UserError, match=match):
            finetune(model, processor, samples, **kwargs)
    with pytest.raises(UserError, match="no answer"):
        finetune(model, processor, bad)
    with pytest.raises(UserError, match="no training examples"):
        finetune(model, processor, [])


# ------------------------------------------------------------------ CLI-facing

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ft")
    model, processor = tiny(layers=2)
    model.save_pretrained(folder / "base")
    processor.save_pretrained(folder / "base")
    rows = []
    (folder / "images").mkdir()
    for i, s in enumerate(world.generate("count", 6, 0)):
        s.image.save(folder / "images" / f"{i}.png")
        rows.append({"image": f"images/{i}.png", "question": s.question, "answers": list(s.answers)})
    write_examples(folder / "train.jsonl", rows)
    return folder


@pytest.mark.parametrize("method", ["full", "dowser", "llaca"])
def test_finetune_cli_writes_a_loadable_checkpoint(saved, method):
    out = saved / f"out-{method}"
    report = finetune_cli(str(saved / "base"), saved / "train.jsonl", out, method=method,
                          layers="1", lr=1e-3, batch_size=3, probe_prompts=2, probes=1)
    assert report.method == method and report.steps == 2
    tuned, processor = load_model(str(out))
    base, _ = load_model(str(saved / "base"))
    changed = _changed(base, tuned)
    assert changed and all(".language_model.layers.1." in n for n in changed)
    assert processor and (out / "training_report.json").is_file()
    saved_report = json.loads((out / "training_report.json").read_text())
    assert saved_report["settings"]["method"] == method
    assert not [p for p in saved.iterdir() if p.name.startswith(f".out-{method}")]  # no leftovers


def test_finetune_cli_rejects_bad_input(saved, tmp_path):
    base = str(saved / "base")
    data = saved / "train.jsonl"
    with pytest.raises(UserError, match="not found"):
        finetune_cli(base, tmp_path / "missing.jsonl", tmp_path / "o")
    with pytest.raises(UserError, match="must not be the base"):
        finetune_cli(base, data, saved / "base")
    with pytest.raises(UserError, match="no such model folder"):
        finetune_cli(str(tmp_path / "nope"), data, tmp_path / "o")
    with pytest.raises(UserError, match="unknown fine-tuning method"):
        finetune_cli(base, data, tmp_path / "o", method="lora")
    with pytest.raises(UserError, match="bad layer"):
        finetune_cli(base, data, tmp_path / "o", layers="x")
    assert not (tmp_path / "o").exists()


def test_every_training_method_has_its_own_table_name_and_colour():
    """The forgetting table names a trained model's rows by its method's `short`, and the
    plots colour them by it: one name and one colour per method."""
    from tailor_ui.app.plots import COLOURS

    shorts = [cls.short for cls in TRAINING_METHODS.values()]
    assert len(set(shorts)) == len(shorts)
    assert len({COLOURS[s] for s in shorts}) == len(shorts)
