"""bench/gpu_tailor_7b.py at toy scale on the CPU: the same code path the 7B GPU run takes
(random pair drawn, processor saved, calibration JSONL written, the `tailor` CLI timed)."""

import json
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_tailor_7b.py"


def test_tiny_run_end_to_end(tmp_path):
    if not torch.cuda.is_available():  # the 7B default refuses at once, in one line
        refused = subprocess.run([sys.executable, str(SCRIPT), "--work", str(tmp_path / "no")],
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode != 0
        assert refused.stderr.strip().splitlines() == [refused.stderr.strip()]
        assert "no CUDA GPU" in refused.stderr
        assert not (tmp_path / "no").exists()
    results = tmp_path / "r.json"
    subprocess.run([sys.executable, str(SCRIPT), "--size", "tiny", "--device", "cpu", "--dtype", "float32",
                    "--calib", "3", "--batch-size", "2", "--threads", "1", "--work", str(tmp_path / "w"),
                    "--results", str(results), "--keep-models"], check=True, capture_output=True, timeout=300)
    r = json.loads(results.read_text())
    assert r["parameters"] == 340928 and r["model_mb"] == round(340928 * 4 / 2**20, 1)
    assert r["calibration_examples"] == 3 and "--hessians sequential --scope block" in r["command"]
    assert r["pipeline"]["path"] == "layer-wise"  # the command calibrates layer by layer
    assert 0 < r["timings_s"]["total"] < r["wall_s"]
    assert r["targets"]["time_met"] is True and r["targets"]["gpu_memory_met"] is None  # no GPU ran
    calib = (tmp_path / "w" / "calib" / "calib.jsonl").read_text().splitlines()
    assert len(calib) == 3 and all((tmp_path / "w" / "calib" / json.loads(l)["image"]).is_file() for l in calib)
    report = json.loads((tmp_path / "w" / "out" / "report.json").read_text())
    assert report["timings_s"] == r["timings_s"]
    assert (tmp_path / "w" / "out" / "patch.safetensors").stat().st_size > 0
