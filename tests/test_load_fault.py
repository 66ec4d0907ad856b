"""A worker SIGKILLed mid-job while 20 gradio_client visitors use the dashboard: that job
fails with a message, and nothing else does (bench/load_soak.py drives the server, a real
`python app.py` on the loopback address, as its soak does)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import ROOT, demo_available


@pytest.mark.skipif(not demo_available(), reason="the demo pair is not built")
def test_a_worker_killed_during_a_20_visitor_run_fails_its_job_alone(tmp_path):
    out = tmp_path / "fault.json"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "load_soak.py"), "--visitors", "20",
                           "--minutes", "0.5", "--ramp", "5", "--grace", "90", "--kill-at", "15",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.is_file(), done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(out.read_text())
    jobs = result["jobs"]["total"]
    # a kill that landed after its worker had sent its result failed no job: the monitor
    # says so and kills another, so exactly one kill found its worker mid-job
    kills = result["workers_killed"]
    assert [k["failed_its_job"] for k in kills] == [False] * (len(kills) - 1) + [True], kills
    assert jobs.get("killed") == 1, result["errors"]  # its error says the worker was killed
    assert jobs.get("done", 0) >= 20
    assert not {"failed", "lost", "error"} & jobs.keys(), result["errors"]
    assert result["visitors_that_could_not_start"] == 0 and result["healthz_failed"] == 0
