"""Faults: an export killed mid-write, a damaged checkpoint, a cancelled export, a job that
runs out of memory. Each leaves no partial output where a user would look, frees the
pair's lock, and the next job runs."""

from __future__ import annotations

import gc
import hashlib
import os
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch

from conftest import DEMO, ROOT, demo_available
from tailor_ui.cli import main
from tailor_ui.errors import UserError
from tailor_ui.app.jobs import DONE, FAILED, JobRunner

pytestmark = pytest.mark.skipif(not demo_available(), reason="the demo pair is not built")

# Runs the CLI unchanged in a real process that SIGKILLs itself at an exact point of writing
# its output: the first file opened for writing inside the output's temporary ("write"), or
# the rename that would put the output in place ("rename"). Exact points, not timing.
KILLER = """
import os, runpy, signal, sys
point, target = sys.argv[1], os.path.abspath(sys.argv[2])
temporary = os.path.join(os.path.dirname(target), "." + os.path.basename(target) + ".tmp-")

def hook(event, args):
    if point == "write" and event == "open" and isinstance(args[1], str) and set(args[1]) & set("wxa+"):
        hit = str(args[0]).startswith(temporary)
    elif point == "rename" and event == "os.rename":
        hit = target in (os.path.abspath(args[0]), os.path.abspath(args[1]))
    else:
        return
    if hit:
        os.kill(os.getpid(), signal.SIGKILL)

sys.addaudithook(hook)
sys.argv[:] = ["python -m tailor_ui", *sys.argv[3:]]
runpy.run_module("tailor_ui", run_name="__main__")
"""


def killed_run(point: str, out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", KILLER, point, str(out), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)


def visible(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def patch_file(tmp_path_factory) -> Path:
    """A patch of the demo pair (a data-free magnitude merge: no calibration needed)."""
    out = tmp_path_factory.mktemp("patch") / "run"
    assert main(["tailor", "--base", str(DEMO / "base"), "--finetuned", str(DEMO / "finetuned"),
                 "--method", "magnitude", "--keep", "0.05", "--out", str(out)]) == 0
    return out / "patch.safetensors"


def apply_args(patch_file: Path, out: Path) -> list[str]:
    return ["apply", "--base", str(DEMO / "base"), "--patch", str(patch_file), "--out", str(out)]


def test_apply_killed_while_writing_leaves_no_output(patch_file, tmp_path):
    out = tmp_path / "applied"
    args = apply_args(patch_file, out)
    result = killed_run("write", out, *args)
    assert result.returncode == -9, result.stderr[-2000:]
    assert not out.exists() and visible(tmp_path) == []
    debris = [p.name for p in tmp_path.iterdir()]
    assert len(debris) == 1 and debris[0].startswith(".applied.tmp-")  # hidden, and ...
    assert main(args) == 0  # ... the next write of the same output removes it
    assert [p.name for p in tmp_path.iterdir()] == ["applied"]
    assert {"config.json", "model.safetensors"} <= set(visible(out))


def test_apply_killed_at_the_rename_keeps_the_earlier_output(patch_file, tmp_path):
    out = tmp_path / "applied"
    args = apply_args(patch_file, out)
    assert main(args) == 0
    (out / "mark.txt").write_text("the earlier output")  # a replacement would not have it
    earlier = digest(out)
    result = killed_run("rename", out, *args)
    assert result.returncode == -9, result.stderr[-2000:]
    assert digest(out) == earlier and visible(tmp_path) == ["applied"]


def test_damaged_shard_or_patch_is_a_clear_error_and_writes_nothing(patch_file, tmp_path, capsys):
    from transformers import AutoModelForImageTextToText

    sharded = tmp_path / "sharded"
    AutoModelForImageTextToText.from_pretrained(DEMO / "base").save_pretrained(sharded, max_shard_size="2MB")
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json", "chat_template.jinja"):
        (sharded / name).write_bytes((DEMO / "base" / name).read_bytes())
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[-1].write_bytes(shards[-1].read_bytes()[: shards[-1].stat().st_size // 2])
    damaged_patch = tmp_path / "damaged.safetensors"
    damaged_patch.write_bytes(patch_file.read_bytes()[:-100])
    out = tmp_path / "out"
    cases = [(sharded, patch_file, "truncated"), (DEMO / "base", damaged_patch, "damaged.safetensors")]
    capsys.readouterr()
    for base, patch, message in cases:
        assert main(["apply", "--base", str(base), "--patch", str(patch), "--out", str(out)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged.safetensors", "sharded"]


# -- the dashboard's jobs ----------------------------------------------------------------------


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same(model, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def lock_is_free(handle) -> bool:
    """True when another thread can take the pair's lock (an RLock: this thread's own hold
    would not show)."""
    got = []

    def take():
        if handle.lock.acquire(timeout=5):
            got.append(True)
            handle.lock.release()

    thread = threading.Thread(target=take)
    thread.start()
    thread.join()
    return bool(got)


def finished_merge(studio, session):
    from tailor_ui.app.service.config import default_settings

    job = studio.submit_tailor(session, default_settings(keep=0.05), calib_examples=32)
    assert studio.runner.wait(job.id, session.id, 120).status == DONE
    studio.sync(session, "tailor")
    return session.run(job.id)


def test_export_cancelled_mid_way_leaves_nothing_and_the_next_export_works(studio, monkeypatch):
    """A cancel ends an export's worker process while it writes: the export says so, the
    run's folder holds what it held, the shared pair is untouched, the next export works."""
    from tailor_ui.app.service import export as export_

    session = studio.session("faults-cancel-export")
    run = finished_merge(studio, session)
    folder, handle = run.patch_file.parent, studio.demo
    before = snapshot(handle.pair.base)
    write = export_.write_tailored

    def write_then_linger(*args):  # the worker is forked from here: it inherits this
        checked = write(*args)
        time.sleep(60)
        return checked

    monkeypatch.setattr(export_, "write_tailored", write_then_linger)
    outcome: dict[str, object] = {}

    def export():
        try:
            outcome["file"] = studio.export(session, run.job_id, "model")
        except UserError as exc:
            outcome["error"] = str(exc)

    thread = threading.Thread(target=export)
    thread.start()
    deadline = time.time() + 60
    while not any(folder.glob(".tailored-model.tmp-*/*.safetensors")):  # half-way: weights written
        assert time.time() < deadline, "the export did not start writing"
        time.sleep(0.01)
    (job,) = studio.runner.active(session.id, "export")
    studio.runner.cancel(job.id, session.id)
    thread.join(60)
    assert outcome == {"error": "export was cancelled"}
    assert sorted(p.name for p in folder.iterdir()) == ["patch.safetensors", "report.json"]
    assert lock_is_free(handle) and same(handle.pair.base, before)
    with pytest.raises(ProcessLookupError):
        os.kill(job.worker_pid, 0)

    monkeypatch.undo()
    zipped = studio.export(session, run.job_id, "model")  # the next job runs and succeeds
    assert zipped.is_file() and sorted(p.name for p in folder.iterdir()) == [
        "patch.safetensors", "report.json", "tailored-model.zip"]
    studio.end_session(session.id)


@pytest.mark.parametrize("allocate", [
    pytest.param(lambda: torch.empty(1 << 50, dtype=torch.uint8), id="torch-cpu-allocator"),
    pytest.param(lambda: bytearray(1 << 50), id="MemoryError"),
])
def test_out_of_memory_while_the_shared_pair_is_patched(studio, allocate):
    """A job that runs out of memory in the middle of using the shared demo pair: FAILED
    with a message that says what to do, the pair reverted and unlocked, the lane goes on."""
    session = studio.session("faults-oom")
    run = finished_merge(studio, session)
    handle = studio.demo
    before = snapshot(handle.pair.base)

    def greedy(progress, should_stop):
        with handle.patched(run.get_patch()):
            progress("scoring", 0, 1)
            return allocate()  # a model too big for the machine

    job = studio.runner.submit(session.id, "tailor", greedy, lane=handle.lane)
    job = studio.runner.wait(job.id, session.id, 60)
    assert job.status == FAILED
    assert job.error.startswith("out of memory on cpu: the model needs more memory than this server has")
    assert "smaller model or dtype" in job.error and "calibration examples" in job.error
    assert lock_is_free(handle) and same(handle.pair.base, before)
    assert finished_merge(studio, session) is not None  # the app stays usable
    studio.end_session(session.id)


def test_gpu_out_of_memory_frees_memory_and_the_lane_goes_on():
    """torch.OutOfMemoryError on the GPU lane: a readable message, the job's tensors are
    collected before the next job (even in reference cycles, with automatic gc off)."""

    class Holder:
        pass

    held: list[weakref.ref] = []

    def greedy(progress, should_stop):
        holder = Holder()
        holder.self, holder.weights = holder, torch.zeros(1 << 20)  # a cycle holding a tensor
        held.append(weakref.ref(holder))
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; "
                                     "15.7 GiB total capacity)")

    runner = JobRunner(["cpu", "cuda"])
    gc.disable()
    try:
        failed = runner.wait(runner.submit("a", "tailor", greedy, lane="cuda").id, "a", 10)
        assert held[0]() is None  # collected by the runner, not by luck
    finally:
        gc.enable()
    after = runner.wait(runner.submit("a", "tailor", lambda p, s: "next", lane="cuda").id, "a", 10)
    runner.shutdown()
    assert failed.status == FAILED and failed.error == (
        "out of memory on cuda: the model needs more memory than the device has; "
        "try a smaller dtype (bfloat16), device cpu, or fewer calibration examples")
    assert after.status == DONE and after.result == "next"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_cuda_out_of_memory_returns_the_memory():
    runner = JobRunner(["cpu", "cuda"])
    baseline = torch.cuda.memory_reserved()

    def greedy(progress, should_stop):
        kept = [torch.ones(1 << 28, device="cuda")]  # 1 GiB held until the job fails
        kept.append(kept)
        free, _ = torch.cuda.mem_get_info()
        return torch.empty(free * 2, dtype=torch.uint8, device="cuda")

    failed = runner.wait(runner.submit("a", "tailor", greedy, lane="cuda").id, "a", 60)
    after = runner.wait(runner.submit("a", "tailor", lambda p, s: torch.ones(4, device="cuda").sum().item(),
                                      lane="cuda").id, "a", 60)
    runner.shutdown()
    assert failed.status == FAILED and failed.error.startswith("out of memory on cuda")
    assert torch.cuda.memory_reserved() <= baseline + (8 << 20)
    assert after.status == DONE and after.result == 4.0
