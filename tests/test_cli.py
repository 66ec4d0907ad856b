"""The command line end to end on a tiny LLaVA pair saved to disk, errors included."""

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image
from transformers import (AutoModelForImageTextToText, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration)

from tailor_ui.cli import main
from tailor_ui.data import write_examples
from tailor_ui.demo.processor import build_processor
from tailor_ui.demo.world import vocabulary


def tiny_llava(processor, seed):
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, image_size=32, patch_size=8)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=len(processor.tokenizer),
                       max_position_embeddings=128, pad_token_id=processor.tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, vision_feature_select_strategy="default",
                         image_token_index=processor.tokenizer.convert_tokens_to_ids("<image>"))
    return LlavaForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def disk_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    processor = build_processor(vocabulary(), image_size=32, patch_size=8)
    base = tiny_llava(processor, 0)
    tuned = tiny_llava(processor, 0)
    with torch.no_grad():  # "fine-tune" the last decoder layer
        for name, p in tuned.named_parameters():
            if "language_model.layers.1." in name:
                p.add_(0.05 * torch.randn_like(p))
    for name, model in (("base", base), ("ft", tuned)):
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
    (root / "img").mkdir()
    rows = []
    for i in range(6):
        Image.new("RGB", (32, 32), (40 * i, 255 - 30 * i, 90)).save(root / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "question": "how many shapes are there?", "answers": ["two"]})
    write_examples(root / "calib.jsonl", rows)
    return root


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_inspect_lists_what_changed(disk_pair, capsys):
    assert main(["inspect", "--base", str(disk_pair / "base"), "--finetuned", str(disk_pair / "ft"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    changed = {r["name"] for r in rows if r["changed"] > 0}
    assert changed and all("language_model.layers.1." in n for n in changed)
    assert main(["inspect", "--base", str(disk_pair / "base"), "--finetuned", str(disk_pair / "ft")]) == 0
    assert "tensors changed" in capsys.readouterr().out


def test_tailor_then_apply_rebuilds_the_same_model(disk_pair, tmp_path):
    out = tmp_path / "run"
    code = main(["tailor", "--base", str(disk_pair / "base"), "--finetuned", str(disk_pair / "ft"),
                 "--calib", str(disk_pair / "calib.jsonl"), "--out", str(out), "--keep", "0.1",
                 "--batch-size", "4", "--save-model"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["method"] == "tailor" and report["settings"]["keep"] == 0.1
    assert abs(report["linear_fraction"] - 0.1) < 0.01
    assert {"calibration", "scores", "compensation", "total"} <= set(report["timings_s"])
    assert report["memory"]["cpu_peak_rss_mb"] > 0
    saved = params(AutoModelForImageTextToText.from_pretrained(out / "model"))

    assert main(["apply", "--base", str(disk_pair / "base"), "--patch", str(out / "patch.safetensors"),
                 "--out", str(tmp_path / "applied")]) == 0
    rebuilt = params(AutoModelForImageTextToText.from_pretrained(tmp_path / "applied"))
    base = params(AutoModelForImageTextToText.from_pretrained(disk_pair / "base"))
    assert saved.keys() == rebuilt.keys()
    assert all(torch.equal(saved[n], rebuilt[n]) for n in saved)
    assert any(not torch.equal(saved[n], base[n]) for n in saved)


@pytest.mark.parametrize("method", ["magnitude", "wise_ft", "task_arithmetic", "ties", "dare"])
def test_data_free_methods_need_no_calibration(disk_pair, tmp_path, method):
    out = tmp_path / method
    assert main(["tailor", "--base", str(disk_pair / "base"), "--finetuned", str(disk_pair / "ft"),
                 "--method", method, "--out", str(out)]) == 0
    assert (out / "patch.safetensors").is_file()
    assert json.loads((out / "report.json").read_text())["patch_entries"] > 0


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tailor_ui", *args], capture_output=True, text=True, timeout=120)


def test_a_real_process_exits_nonzero_with_one_line(disk_pair, tmp_path):
    result = run_cli("inspect", "--base", str(tmp_path / "nope"), "--finetuned", str(disk_pair / "ft"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'}: no such model folder"]


def test_bad_inputs_get_one_line_and_nonzero_exit(disk_pair, tmp_path, capsys):
    base, ft = str(disk_pair / "base"), str(disk_pair / "ft")
    pickle_only = tmp_path / "pickled"
    pickle_only.mkdir()
    (pickle_only / "config.json").write_text((disk_pair / "base" / "config.json").read_text())
    (pickle_only / "pytorch_model.bin").write_bytes(b"not really")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for f in (disk_pair / "base").iterdir():
        data = f.read_bytes()
        (truncated / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_text('{"image": "x.png", "question": "q", "answers": []}\n{oops\n')
    cases = [
        (["inspect", "--base", str(tmp_path / "nope"), "--finetuned", ft], "no such model folder"),
        (["inspect", "--base", f"{tmp_path}/../..", "--finetuned", ft], "not a model folder"),
        (["inspect", "--base", "not a hub id!", "--finetuned", ft], "neither an existing folder nor a hub id"),
        (["inspect", "--base", str(pickle_only), "--finetuned", ft], "pickle"),
        (["inspect", "--base", str(truncated), "--finetuned", ft], "damaged or truncated"),
        (["tailor", "--base", base, "--finetuned", ft, "--out", str(tmp_path / "o"), "--keep", "1.5"], "outside [0, 1]"),
        (["tailor", "--base", base, "--finetuned", ft, "--out", str(tmp_path / "o")], "needs target-task calibration"),
        (["tailor", "--base", base, "--finetuned", ft, "--out", str(tmp_path / "o"), "--calib", str(bad_jsonl)],
         "bad.jsonl line 1: image not found"),
        (["tailor", "--base", base, "--finetuned", ft, "--out", str(tmp_path / "o"), "--method", "nope"], "unknown method"),
    ]
    for args, message in cases:
        try:
            code = main(args)
        except SystemExit as exc:  # argparse's own checks (--keep range)
            code = exc.code
        assert code == 2, args
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0], (args, err)
    assert not (tmp_path / "o").exists()


def test_mismatched_pair_lists_the_differences(disk_pair, tmp_path, capsys):
    processor = build_processor(vocabulary(), image_size=32, patch_size=8)
    other = tiny_llava(processor, 1)
    other.config.text_config.intermediate_size = 96
    LlavaForConditionalGeneration(other.config).save_pretrained(tmp_path / "other")
    processor.save_pretrained(tmp_path / "other")
    assert main(["inspect", "--base", str(disk_pair / "base"), "--finetuned", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "do not match" in err and "mlp.gate_proj.weight: base (128, 64) vs fine-tuned (96, 64)" in err


def test_eval_writes_scored_results(disk_pair, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(disk_pair / "base"), "--data", str(disk_pair / "calib.jsonl"),
                 "--task", "vqa", "--out", str(out), "--max-new-tokens", "3"]) == 0
    result = json.loads(out.read_text())
    assert result["task"] == "vqa" and result["n"] == 6 and len(result["predictions"]) == 6
    assert 0.0 <= result["score"] <= 1.0
    assert "vqa_accuracy" in capsys.readouterr().out


def test_sweep_writes_the_forgetting_table(disk_pair, tmp_path):
    import pandas as pd

    out = tmp_path / "table.csv"
    data = str(disk_pair / "calib.jsonl")
    original = disk_pair / "original.jsonl"  # sets are named by file, so names must differ
    original.write_text((disk_pair / "calib.jsonl").read_text())
    assert main(["sweep", "--base", str(disk_pair / "base"), "--finetuned", str(disk_pair / "ft"),
                 "--calib", data, "--original", f"{original}:vqa", "--target", data,
                 "--methods", "tailor,magnitude,wise_ft", "--keep", "0.1,0.5", "--lam", "0.5",
                 "--hessians", "one-pass", "--limit", "4", "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert list(table["method"]) == ["base", "finetuned", "tailor", "tailor", "magnitude", "magnitude", "wise_ft"]
    for column in ("original", "target", "original_retention", "target_retention", "h_score", "seconds"):
        assert column in table.columns


def test_sweep_refuses_bad_grids(disk_pair, tmp_path, capsys):
    data = str(disk_pair / "calib.jsonl")
    base = ["sweep", "--base", str(disk_pair / "base"), "--finetuned", str(disk_pair / "ft"),
            "--original", data, "--target", data, "--out", str(tmp_path / "t.csv")]
    assert main([*base, "--methods", "magnitude", "--keep", "0.1,2"]) == 2
    assert "--keep values must lie in [0, 1]" in capsys.readouterr().err
    assert main([*base, "--methods", "tailor"]) == 2
    assert "needs target-task calibration" in capsys.readouterr().err
    assert not (tmp_path / "t.csv").exists()


@pytest.mark.parametrize("method", ["full", "dowser", "llaca"])
def test_finetune_writes_a_loadable_checkpoint_training_only_the_chosen_layers(disk_pair, tmp_path, method):
    out = tmp_path / method
    assert main(["finetune", "--base", str(disk_pair / "base"), "--data", str(disk_pair / "calib.jsonl"),
                 "--out", str(out), "--method", method, "--layers", "last:1", "--batch-size", "3",
                 "--lr", "1e-3", "--probe-prompts", "2", "--probes", "2"]) == 0
    tuned = params(AutoModelForImageTextToText.from_pretrained(out))
    base = params(AutoModelForImageTextToText.from_pretrained(disk_pair / "base"))
    moved = {n for n in base if not torch.equal(base[n], tuned[n])}
    assert moved and all("language_model.layers.1." in n for n in moved)


def test_finetune_refuses_bad_layers_and_foreign_out_dirs(disk_pair, tmp_path, capsys):
    args = ["finetune", "--base", str(disk_pair / "base"), "--data", str(disk_pair / "calib.jsonl")]
    assert main([*args, "--out", str(tmp_path / "x"), "--layers", "last:zero"]) == 2
    assert "bad layer spec" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert main([*args, "--out", str(tmp_path / "mine")]) == 2
    assert "is not an earlier output" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
