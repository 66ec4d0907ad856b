"""Deployment: the Docker image's command starts the app, GET /healthz answers (also while a
job runs), the Spaces front matter, and the one place that picks ZeroGPU or the job runner."""

from __future__ import annotations

import gc
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import weakref
from importlib.metadata import version

import pytest
import yaml

from conftest import ROOT, demo_available, free_port, hold_lane
from tailor_ui.app import gpu
from tailor_ui.app.jobs import DONE, FAILED, JobKind, JobRunner


def dockerfile() -> dict[str, list[str]]:
    """Instruction -> its arguments, continuation lines joined (the last CMD wins)."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            found.setdefault(word.upper(), []).append(rest.strip())
    return found


def docker_env(found: dict[str, list[str]]) -> dict[str, str]:
    env = {}
    for rest in found.get("ENV", []):
        for pair in shlex.split(rest):
            key, _, value = pair.partition("=")
            env[key] = value.replace("$PATH", os.environ["PATH"])
    return env


def get_json(url: str, timeout: float = 5) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        assert response.status == 200
        return json.loads(response.read())


def test_dockerfile_runs_as_uid_1000_on_port_7860():
    found = dockerfile()
    env = docker_env(found)
    assert any("--uid 1000" in run for run in found["RUN"])
    assert found["USER"] == ["user"]
    assert env["GRADIO_SERVER_NAME"] == "0.0.0.0" and env["GRADIO_SERVER_PORT"] == "7860"
    assert found["EXPOSE"] == ["7860"]
    assert "/healthz" in found["HEALTHCHECK"][0]
    # the default build is the CPU wheel of torch; a CUDA index is one build argument away
    assert found["ARG"] == ["TORCH_INDEX=https://download.pytorch.org/whl/cpu"]
    # torchvision (Qwen2-VL's processor) comes from torch's own index, paired with that build
    assert any('--index-url "$TORCH_INDEX"' in run and "torch>=2.4" in run and "torchvision" in run
               for run in found["RUN"])
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".git" in ignored and "test-output" in ignored


def test_docker_command_starts_the_app_and_stops_on_sigterm(tmp_path):
    """What `docker run` runs (CMD with the image's ENV) serves /healthz; the image's
    HEALTHCHECK passes against it; SIGTERM (`docker stop`) ends it cleanly."""
    if not demo_available():
        pytest.skip("the demo pair is not built")
    found = dockerfile()
    command = json.loads(found["CMD"][-1])
    assert command == ["python", "app.py"]
    command[0] = sys.executable  # the image's python is this interpreter here
    port = free_port()
    env = {**os.environ, **docker_env(found), "GRADIO_SERVER_PORT": str(port),
           "MTS_WORKDIR": str(tmp_path / "work"), "MTS_WARM_UP": "0",
           "GRADIO_TEMP_DIR": str(tmp_path / "gradio")}
    log = tmp_path / "app.log"  # a file, not a pipe: nobody reads while it runs
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        health, deadline = None, time.time() + 120
        while health is None and process.poll() is None and time.time() < deadline:
            try:
                health = get_json(f"http://127.0.0.1:{port}/healthz", timeout=2)
            except OSError:
                time.sleep(0.3)
        assert health is not None, f"no health answer (exit code {process.poll()}): {log.read_text()[-3000:]}"
        assert health["status"] == "ok" and health["demo"] in ("loading", "ready")
        assert health["gpu_mode"] == "runner" and health["jobs"] == {"queued": 0, "running": 0}
        check = subprocess.run(["sh", "-c", found["HEALTHCHECK"][0].partition("CMD ")[2]],
                               env=env, timeout=30)
        assert check.returncode == 0
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_start_up_garbage_is_collected_and_the_survivors_frozen():
    """app.py starts with the cyclic collector off (start-up speed); before it serves,
    garbage cycles of start-up are collected, the survivors frozen, collection back on."""
    import app

    class Node:
        pass

    gc.disable()
    try:
        node = Node()
        node.me = node  # a cycle: only the collector frees it
        alive = weakref.ref(node)
        kept = Node()
        kept.me = kept
        del node
        app.collect_start_up()
        assert alive() is None and gc.isenabled()
        assert not any(o is kept for o in gc.get_objects())  # frozen: no pass visits it
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.enable()


def test_spaces_front_matter():
    gradio = version("gradio")
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["sdk"] == "gradio" and meta["sdk_version"] == gradio
    assert (ROOT / meta["app_file"]).is_file()
    requirements = (ROOT / "requirements.txt").read_text()
    assert f"gradio=={gradio}" in requirements and "spaces" in requirements


# -- the health endpoint -------------------------------------------------------------------


def test_health_answers_while_a_job_runs(app, studio):
    with hold_lane(studio):
        start = time.perf_counter()
        health = get_json(app.url + "healthz")
        seconds = time.perf_counter() - start
        assert health["jobs"]["running"] >= 1
    assert health["status"] == "ok" and health["demo"] == "ready" and health["device"] == "cpu"
    assert health["lanes"] == ["cpu"] and health["gpu_mode"] == "runner"
    assert seconds < 2


def test_health_follows_the_demo_pair_and_shutdown(tmp_path):
    from tailor_ui.app.service.studio import Studio, StudioConfig

    studio = Studio(StudioConfig(workdir=tmp_path / "work", demo_dir=tmp_path / "no-demo",
                                 device="cpu", warm_up=False))
    try:
        assert studio.health()["demo"] == "loading"
        studio.start(background=False)
        health = studio.health()
        assert health["demo"] == "unavailable" and health["status"] == "ok"
    finally:
        studio.close()
    assert studio.health()["status"] == "stopping"


# -- ZeroGPU or the job runner ---------------------------------------------------------------


@pytest.fixture
def fresh_mode(monkeypatch):
    """Forget the process's decision, so each test decides again (restored afterwards)."""
    monkeypatch.setattr(gpu, "_mode", None)


def test_job_runner_mode_off_zerogpu(fresh_mode):
    import spaces

    assert not spaces.config.Config.zero_gpu  # this machine is no ZeroGPU Space
    assert gpu.mode() == gpu.RUNNER

    def fn(progress, should_stop):
        return threading.current_thread().name

    assert gpu.on_gpu(fn, "tailor") is fn
    runner = JobRunner(["cpu", "cuda"], gpu_call=gpu.on_gpu)
    try:
        job = runner.wait(runner.submit("a", "tailor", fn, lane="cuda").id, "a", 10)
    finally:
        runner.shutdown()
    assert job.status == DONE and job.result == "tailor-jobs-cuda"  # the lane's own worker


def test_runner_mode_without_the_spaces_package(fresh_mode, monkeypatch):
    monkeypatch.setitem(sys.modules, "spaces", None)  # `import spaces` raises ImportError
    assert gpu.detect_mode() == gpu.RUNNER


@pytest.mark.filterwarnings("ignore:Error while reading infos from Nvidia driver")  # no GPU here
def test_zerogpu_mode_sends_gpu_jobs_through_spaces_gpu(fresh_mode, monkeypatch):
    """With the spaces configuration of a ZeroGPU Space, a GPU-lane job is handed to
    `spaces.GPU`, which needs ZeroGPU's device service, absent here: the job fails without
    having run in this process. CPU-lane jobs still run directly."""
    import spaces

    monkeypatch.setattr(spaces.config.Config, "zero_gpu", True)
    assert gpu.mode() == gpu.ZEROGPU
    ran = []

    def fn(progress, should_stop):
        ran.append(threading.current_thread().name)
        return "ran"

    assert gpu.on_gpu(fn, JobKind.TAILOR) is not fn
    runner = JobRunner(["cpu", "cuda"], gpu_call=gpu.on_gpu)
    try:
        on_gpu = runner.wait(runner.submit("a", "tailor", fn, lane="cuda").id, "a", 60)
        on_cpu = runner.wait(runner.submit("a", "tailor", fn, lane="cpu").id, "a", 10)
    finally:
        runner.shutdown()
    assert on_gpu.status == FAILED
    assert on_cpu.status == DONE and ran == ["tailor-jobs-cpu"]
    from spaces.zero.decorator import decorated_cache

    assert fn not in decorated_cache and not any(
        getattr(task, "func", None) is fn for task in decorated_cache)
