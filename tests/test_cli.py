"""The command line end to end on a tiny LLaVA pair saved to disk, errors included."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForImageTextToText

from tailor_ui.cli import main


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_load_pair_reports_progress_and_runs_the_hook_after_the_configs(disk_pair):
    from tailor_ui.errors import UserError
    from tailor_ui.pair import load_pair

    events = []
    pair = load_pair(str(disk_pair / "base"), [str(disk_pair / "ft")],
                     progress=lambda stage, done, total: events.append((stage.split()[0], done, total)),
                     before_loading=lambda: events.append(("hook", None, None)))
    assert events == [("reading", 0, 3), ("hook", None, None), ("loading", 1, 3), ("loading", 2, 3)]
    assert len(pair.finetuned) == 1
    hooked = []
    with pytest.raises(UserError, match="could not load"):  # refused before the hook
        load_pair(str(disk_pair / "base"), ["no-such/model"], before_loading=lambda: hooked.append(1))
    assert not hooked


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
                 "--scope", "block,tensor", "--hessians", "one-pass", "--limit", "4", "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert list(table["method"]) == ["base", "finetuned", "majority", *["tailor"] * 4, "magnitude",
                                     "magnitude", "wise_ft"]
    tailored = table.loc[table["method"] == "tailor", "setting"]
    assert sum("scope=tensor" in s for s in tailored) == 2
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
    assert main([*base, "--methods", "tailor", "--calib", data, "--scope", "layer"]) == 2
    assert "unknown scope 'layer' (choose from block, row, tensor, global)" in capsys.readouterr().err
    assert not (tmp_path / "t.csv").exists()


@pytest.mark.parametrize("method", ["full", "dowser", "llaca"])
def test_finetune_writes_a_loadable_checkpoint_training_only_the_chosen_layers(disk_pair, tmp_path, method):
    out = tmp_path / method
    assert main(["finetune", "--base", str(disk_pair / "base"), "--data", str(disk_pair / "calib.jsonl"),
                 "--out", str(out), "--method", method, "--layers", "last:1", "--batch-size", "3",
                 "--lr", "1e-3", *(["--probe-prompts", "2", "--probes", "2"] if method == "dowser" else [])]) == 0
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


def test_demo_build_rewrites_the_demo_folder_not_all_assets(monkeypatch):
    """build_demo replaces the folder it is given whole: by default that must be assets/demo,
    never assets/ with the dashboard's stylesheet beside the demo."""
    import tailor_ui.demo.build as build
    from tailor_ui.demo.sets import DEMO_DIR

    calls = []
    monkeypatch.setattr(build, "build_demo", lambda folder, seed: calls.append((folder, seed)))
    assert main(["demo", "build"]) == 0
    assert calls == [(DEMO_DIR, 0)] and DEMO_DIR.name == "demo" and DEMO_DIR.parent.name == "assets"


def test_finetune_continual_writes_the_stage_table(disk_pair, tmp_path, capsys):
    import pandas as pd

    out = tmp_path / "continual"
    args = ["finetune", "--base", str(disk_pair / "base"), "--out", str(out), "--continual",
            "colour,count", "--limit", "6", "--batch-size", "3", "--lr", "1e-3"]
    assert main([*args, "--method", "ema", "--ema-beta", "0.5"]) == 0
    table = pd.read_csv(out / "continual.csv")
    assert list(table["after"]) == ["base", "colour", "count"]
    assert table["ema_lag"].iloc[1:].between(0, 1).all() and "forgetting" in capsys.readouterr().out
    assert main([*args[:5], "--out", str(tmp_path / "d"), "--continual", "colour",
                 "--method", "dowser"]) == 2
    assert "a continual run trains with full, ema, llaca, not 'dowser'" in capsys.readouterr().err
    assert main(["finetune", "--base", str(disk_pair / "base"), "--out", str(tmp_path / "n")]) == 2
    assert "give --data" in capsys.readouterr().err
