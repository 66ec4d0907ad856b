"""PEFT LoRA adapters as fine-tuned models (tailor_ui/adapter.py) and the tailored result
as an adapter again (tailor_ui/adapter_fit.py).

The reference is peft itself: adapters are made with `get_peft_model` + `save_pretrained`
(lora_B randomised so the delta is not zero), and the weights this project forms must be
`PeftModel.merge_and_unload()`'s, bit for bit (float32, the same operations in the same
order). The lazy and streamed readers must equal the in-memory merge bit for bit too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForImageTextToText

from conftest import DEMO
from families import build_llava, build_qwen2_vl
from tailor_ui.adapter import adapter_folder
from tailor_ui.adapter_fit import fit_from_checkpoint, low_rank_fit
from tailor_ui.cli import main
from tailor_ui.engine import run_method
from tailor_ui.errors import UserError
from tailor_ui.pair import load_pair
from tailor_ui.patch import Patch, load_patch
from tailor_ui.settings import Settings
from tailor_ui.stream import stream_merge

# plain LoRA with per-module rank and alpha, a whole module saved, lora_bias; rsLoRA on the
# decoder's MLP and the input embedding (saved whole beside its LoRA, as peft does)
CONFIGS = {
    "patterns": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"],
                     rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3},
                     modules_to_save=["multi_modal_projector.linear_2"]),
    "rslora": dict(r=3, lora_alpha=5, use_rslora=True, target_modules=["gate_proj", "down_proj", "embed_tokens"]),
    # lora_bias needs a bias to merge into: the CLIP tower's linears have one, Llama's do not
    "bias": dict(r=2, lora_alpha=2, target_modules=r".*vision_tower.*\.(q_proj|fc1)", lora_bias=True),
}


def make_adapter(base_folder: Path, out: Path, seed: int = 0, declared_base: str | None = None,
                 **lora: object) -> Path:
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_pretrained(base_folder)
    peft_model = get_peft_model(model, LoraConfig(**lora))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding" in name or "modules_to_save" in name:
                p.add_(0.05 * torch.randn_like(p))
    peft_model.peft_config["default"].base_model_name_or_path = declared_base or str(base_folder)
    peft_model.save_pretrained(out)
    return out


def peft_merged(base_folder: Path, adapter: Path) -> dict[str, torch.Tensor]:
    base = AutoModelForImageTextToText.from_pretrained(base_folder)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    return {n: p.detach() for n, p in merged.named_parameters()}


@pytest.fixture(scope="module")
def adapters(disk_pair, tmp_path_factory):
    """On conftest's tiny LLaVA (`disk_pair/base`, saved with its processor): one adapter
    per entry of CONFIGS."""
    root = tmp_path_factory.mktemp("lora")
    return {name: make_adapter(disk_pair / "base", root / name, seed=i, **config)
            for i, (name, config) in enumerate(CONFIGS.items())}


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_merged_weights_are_peft_merge_and_unload_in_memory_and_lazily(disk_pair, adapters, kind):
    expected = peft_merged(disk_pair / "base", adapters[kind])
    for lazy in (False, True):
        pair = load_pair(str(disk_pair / "base"), str(adapters[kind]), lazy=lazy)
        assert isinstance(pair.finetuned[0], torch.nn.Module) != lazy
        for name in expected:
            assert torch.equal(pair.finetuned_value(0, name), expected[name]), (lazy, name)
        changed = set(pair.changed())
        assert changed and all(torch.equal(pair.base_value(n), expected[n]) for n in set(expected) - changed)
    if kind == "patterns":  # the projector saved whole
        assert "model.multi_modal_projector.linear_2.weight" in changed
    if kind == "bias":
        assert "model.vision_tower.encoder.layers.0.mlp.fc1.bias" in changed


def test_a_second_family_qwen2_vl(tmp_path):
    build_qwen2_vl(seed=0).save_pretrained(tmp_path / "base")
    adapter = make_adapter(tmp_path / "base", tmp_path / "adapter", r=2, lora_alpha=4,
                           target_modules=["qkv", "q_proj", "up_proj"])
    expected = peft_merged(tmp_path / "base", adapter)
    lazy = load_pair(str(tmp_path / "base"), str(adapter), lazy=True)
    loaded = load_pair(str(tmp_path / "base"), str(adapter))
    assert any("visual" in n for n in lazy.changed()) and any("language_model" in n for n in lazy.changed())
    for name in expected:
        assert torch.equal(lazy.finetuned_value(0, name), expected[name]), name
        assert torch.equal(loaded.finetuned_value(0, name), expected[name]), name


def test_streamed_merge_of_an_adapter_equals_the_in_memory_merge(disk_pair, adapters, tmp_path):
    pair = load_pair(str(disk_pair / "base"), str(adapters["patterns"]))
    for method in ("ties", "task_arithmetic"):
        settings = Settings(method=method, keep=0.3)
        expected = run_method(pair, settings).patch
        streamed = Patch(tensors={})
        stream_merge(disk_pair / "base", adapters["patterns"], settings, tmp_path / method, patch=streamed)
        assert set(streamed.tensors) == set(expected.tensors) and expected.tensors
        for name, tp in expected.tensors.items():
            assert torch.equal(tp.index, streamed.tensors[name].index), name
            assert torch.equal(tp.values, streamed.tensors[name].values), name
    written = AutoModelForImageTextToText.from_pretrained(tmp_path / "task_arithmetic")
    for name, p in written.named_parameters():
        tp = expected.tensors.get(name)
        assert torch.equal(p, _tailored(pair.base_value(name), tp) if tp else pair.base_value(name)), name


def _tailored(base: torch.Tensor, tp) -> torch.Tensor:
    return base.flatten().index_put((tp.index,), tp.values).view_as(base)


def _report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


def test_cli_tailors_a_lora_fine_tune_of_a_tiny_llava_and_writes_an_adapter(disk_pair, adapters, tmp_path, capsys):
    adapter = adapters["patterns"]
    args = ["tailor", "--base", str(disk_pair / "base"), "--finetuned", str(adapter),
            "--calib", str(disk_pair / "calib.jsonl"), "--batch-size", "2", "--keep", "0.3"]
    assert main([*args, "--out", str(tmp_path / "lazy"), "--save-model",
                 "--adapter-out", str(tmp_path / "adapter"), "--adapter-rank", "64"]) == 0
    assert "adapter: rank 64 fit" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "full"), "--in-memory"]) == 0
    lazy, full = _report(tmp_path / "lazy"), _report(tmp_path / "full")
    assert lazy["finetuned_loading"] == ["lazy"] and full["finetuned_loading"] == ["in memory"]
    patch = load_patch(tmp_path / "lazy" / "patch.safetensors")
    other = load_patch(tmp_path / "full" / "patch.safetensors")
    assert set(patch.tensors) == set(other.tensors) and patch.num_entries > 0
    for name, tp in patch.tensors.items():
        assert torch.equal(tp.values, other.tensors[name].values), name
    assert patch.metadata["finetuned"] == [str(adapter)]
    assert lazy["tensors_checked"] > 0
    # full rank: the adapter holds the tailored model to float tolerance, loaded by peft
    fit = lazy["adapter"]
    assert fit["relative_error"] < 1e-5 and fit["low_rank_tensors"] > 0
    assert fit["modules_saved_whole"] == ["model.multi_modal_projector.linear_2"]
    tailored = {n: p.detach() for n, p in AutoModelForImageTextToText.from_pretrained(
        tmp_path / "lazy" / "model").named_parameters()}
    again = peft_merged(disk_pair / "base", tmp_path / "adapter")
    for name, value in tailored.items():
        torch.testing.assert_close(again[name], value, rtol=0, atol=1e-5)


def test_a_streamed_merge_fits_its_adapter_from_the_written_patch(disk_pair, adapters, tmp_path, capsys):
    """A data-free merge streams its patch to disk tensor by tensor; --adapter-out reads it
    back from the file. At full rank peft rebuilds the streamed model from the adapter."""
    args = ["tailor", "--base", str(disk_pair / "base"), "--finetuned", str(adapters["patterns"]),
            "--method", "magnitude", "--keep", "0.3", "--save-model",
            "--adapter-out", str(tmp_path / "adapter"), "--adapter-rank", "64"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    report = _report(tmp_path / "run")
    assert report["streamed"] and report["adapter"]["relative_error"] < 1e-5
    tailored = AutoModelForImageTextToText.from_pretrained(tmp_path / "run" / "model")
    again = peft_merged(disk_pair / "base", tmp_path / "adapter")
    for name, value in tailored.named_parameters():
        torch.testing.assert_close(again[name], value.detach(), rtol=0, atol=1e-5)
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "other"), "--no-patch"]) != 0
    assert "--no-patch" in capsys.readouterr().err and not (tmp_path / "other").exists()


def test_a_real_process_tailors_an_adapter_with_a_data_free_method(disk_pair, adapters, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "tailor_ui", "tailor", "--base", str(disk_pair / "base"),
                           "--finetuned", str(adapters["rslora"]), "--method", "dare", "--keep", "0.5",
                           "--out", str(out), "--save-model"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert _report(out)["streamed"] and load_patch(out / "patch.safetensors").num_entries > 0
    AutoModelForImageTextToText.from_pretrained(out / "model")


def test_adapter_output_is_the_best_rank_r_fit_and_peft_reproduces_it(disk_pair, adapters, tmp_path):
    pair = load_pair(str(disk_pair / "base"), str(adapters["rslora"]))
    patch = run_method(pair, Settings(method="dare", keep=0.5)).patch
    report = fit_from_checkpoint(patch, disk_pair / "base", 2, tmp_path / "ad", base_id="tiny")
    assert report["modules_saved_whole"] == ["model.language_model.embed_tokens"]
    merged = peft_merged(disk_pair / "base", tmp_path / "ad")
    residual = total = 0.0
    for name, error in report["tensors"].items():
        base = pair.base_value(name)
        delta = _tailored(base, patch.tensors[name]) - base
        fitted = merged[name] - base
        s = torch.linalg.svdvals(delta)  # Eckart–Young: the error of the best rank-2 fit
        assert error == pytest.approx(float(s[2:].norm() / s.norm()), rel=1e-4)
        assert float((delta - fitted).norm() / delta.norm()) == pytest.approx(error, rel=1e-4, abs=1e-6)
        residual += float((delta - fitted).norm()) ** 2
        total += float(delta.norm()) ** 2
    assert report["relative_error"] == pytest.approx((residual / total) ** 0.5, rel=1e-4)
    embed = "model.language_model.embed_tokens.weight"  # saved whole: exact
    assert torch.equal(merged[embed], _tailored(pair.base_value(embed), patch.tensors[embed]))


def test_low_rank_fit_pads_a_matrix_smaller_than_the_rank():
    delta = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    b, a = low_rank_fit(delta, 8)
    assert b.shape == (3, 8) and a.shape == (8, 5)
    torch.testing.assert_close(b @ a, delta, rtol=0, atol=1e-5)


def _one_line_error(capsys, args: list[str]) -> str:
    capsys.readouterr()  # what building the test's models printed
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_a_mismatched_adapter_is_one_line_error(disk_pair, adapters, tmp_path, capsys):
    # trained on another tiny LLaVA (other widths): shapes do not fit
    build_llava(seed=0).save_pretrained(tmp_path / "other")
    wrong = make_adapter(tmp_path / "other", tmp_path / "wrong", r=2, lora_alpha=2,
                         target_modules=["q_proj"], declared_base="someone/other-llava")
    run = ["tailor", "--base", str(disk_pair / "base"), "--method", "ties", "--out", str(tmp_path / "o")]
    err = _one_line_error(capsys, [*run, "--finetuned", str(wrong)])
    assert "does not fit the base" in err and "someone/other-llava" in err and "q_proj" in err
    # a target module the base lacks
    missing = tmp_path / "missing"
    missing.mkdir()
    (missing / "adapter_config.json").write_text((adapters["patterns"] / "adapter_config.json").read_text())
    from safetensors.torch import load_file, save_file
    tensors = load_file(adapters["patterns"] / "adapter_model.safetensors")
    save_file({k.replace("layers.1.self_attn.q_proj", "layers.7.self_attn.q_proj"): t
               for k, t in tensors.items()}, missing / "adapter_model.safetensors")
    err = _one_line_error(capsys, [*run, "--finetuned", str(missing)])
    assert "model.language_model.layers.7.self_attn.q_proj.weight is not in the base" in err
    assert not (tmp_path / "o").exists()
    # DoRA is refused by name, in every command, before any model loads
    dora = make_adapter(disk_pair / "base", tmp_path / "dora", r=2, lora_alpha=2, target_modules=["q_proj"],
                        use_dora=True)
    err = _one_line_error(capsys, ["inspect", "--base", str(disk_pair / "base"), "--finetuned", str(dora)])
    assert "DoRA" in err
    # an adapter given as the base
    err = _one_line_error(capsys, [*run, "--finetuned", str(disk_pair / "ft"), "--base", str(dora)])
    assert "is a PEFT adapter, not a model" in err
    err = _one_line_error(capsys, ["eval", "--model", str(dora), "--data", str(disk_pair / "calib.jsonl"),
                                   "--task", "vqa", "--out", str(tmp_path / "e.json")])
    assert "is a PEFT adapter, not a model" in err


def test_inspect_lists_what_the_adapter_changed(disk_pair, adapters, capsys):
    assert main(["inspect", "--base", str(disk_pair / "base"), "--finetuned", str(adapters["rslora"]),
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    base = dict(AutoModelForImageTextToText.from_pretrained(disk_pair / "base").named_parameters())
    expected = peft_merged(disk_pair / "base", adapters["rslora"])
    assert {r["name"] for r in rows if r["changed"]} == {n for n, v in expected.items()
                                                         if not torch.equal(v, base[n])}


def test_a_hub_id_is_found_as_an_adapter_in_the_offline_cache(disk_pair, adapters, tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "models--someone--tiny-lora" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (snapshot / name).write_bytes((adapters["rslora"] / name).read_bytes())
    (tmp_path / "models--someone--tiny-lora" / "refs").mkdir()
    (tmp_path / "models--someone--tiny-lora" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert adapter_folder("someone/tiny-lora") == snapshot
    assert adapter_folder("someone/not-cached") is None
    pair = load_pair(str(disk_pair / "base"), "someone/tiny-lora", lazy=True)
    expected = peft_merged(disk_pair / "base", adapters["rslora"])
    assert all(torch.equal(pair.finetuned_value(0, n), v) for n, v in expected.items())


def test_the_dashboards_pair_loader_takes_an_adapter(disk_pair, adapters, model_root, tmp_path):
    from tailor_ui.app.service.pairs import check_load_request, load_handle

    roots = [disk_pair.parent]
    folder = disk_pair.parent / "lora-patterns"
    if not folder.exists():
        folder.mkdir()
        for path in adapters["patterns"].iterdir():
            (folder / path.name).write_bytes(path.read_bytes())
    check_load_request("pair/base", "lora-patterns", "float32", "cpu", roots=roots, has_gpu=False)
    with pytest.raises(UserError, match="outside the allowed folders"):
        check_load_request("pair/base", str(adapters["patterns"]), "float32", "cpu", roots=roots, has_gpu=False)
    steps = []
    handle = load_handle("pair/base", "lora-patterns", "cpu", lambda *a: steps.append(a), lambda: None,
                         allowed_roots=roots)
    summary = handle.summary
    changed = set(summary[summary["changed"] > 0]["name"])
    expected = peft_merged(disk_pair / "base", adapters["patterns"])
    base = dict(handle.pair.base.named_parameters())
    assert changed == {n for n, v in expected.items() if not torch.equal(v, base[n])}


def test_the_export_tab_zips_the_patch_as_an_adapter(studio, tmp_path):
    import zipfile

    from tailor_ui.app.jobs import DONE
    from tailor_ui.app.service.config import default_settings
    from tailor_ui.app.service.export import ADAPTER_RANK

    session = studio.session("lora-export")
    job = studio.submit_tailor(session, default_settings(keep=0.05), calib_examples=32)
    assert studio.runner.wait(job.id, session.id, 120).status == DONE
    studio.sync(session, "tailor")
    zipped = studio.export(session, job.id, "adapter")
    zipfile.ZipFile(zipped).extractall(tmp_path)
    folder = tmp_path / "tailored-adapter"
    fit = json.loads((folder / "adapter_fit.json").read_text())
    assert fit["rank"] == ADAPTER_RANK and 0 < fit["relative_error"] < 1 and fit["low_rank_tensors"] > 0
    patch = load_patch(session.run(job.id).patch_file)
    base_folder = DEMO / "base"
    merged = peft_merged(base_folder, folder)
    base = {n: p.detach() for n, p in AutoModelForImageTextToText.from_pretrained(base_folder).named_parameters()}
    for name, error in fit["tensors"].items():  # peft's merge is base + the fitted delta
        delta = _tailored(base[name], patch.tensors[name]) - base[name]
        assert float((merged[name] - base[name] - delta).norm() / delta.norm()) == pytest.approx(error, rel=1e-3)
    studio.end_session(session.id)


def test_a_bfloat16_adapter_merges_as_peft_merges_it_streamed_and_lazily(tmp_path):
    """peft merges a bfloat16 base on the CPU by forming the delta in float32, rounding it to
    bfloat16 and adding in bfloat16; the streamed merge (stored dtype) and the lazy reader
    of a bfloat16-loaded pair must give its weights bit for bit."""
    build_llava(seed=0).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    adapter = make_adapter(tmp_path / "base", tmp_path / "adapter", **CONFIGS["patterns"])
    base = AutoModelForImageTextToText.from_pretrained(tmp_path / "base", dtype=torch.bfloat16)
    expected = {n: p.detach() for n, p in PeftModel.from_pretrained(base, adapter).merge_and_unload().named_parameters()}
    assert {p.dtype for p in expected.values()} == {torch.bfloat16}
    stream_merge(tmp_path / "base", adapter, Settings(method="task_arithmetic"), tmp_path / "out")
    streamed = AutoModelForImageTextToText.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    lazy = load_pair(str(tmp_path / "base"), str(adapter), lazy=True, dtype="bfloat16")
    assert lazy.changed()
    for name, p in streamed.named_parameters():
        assert torch.equal(p, expected[name]), name
        assert torch.equal(lazy.finetuned_value(0, name), expected[name]), name
