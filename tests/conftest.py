"""Shared fixtures: the dashboard's Studio on the demo pair, the app launched on a free
port, a gradio_client for it, and a Debian-chromium page driven by Playwright.

Heavy imports (gradio, playwright) happen inside the fixtures, so test modules that do not
use them pay nothing.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

# The test models are tiny: on a 2-core machine, two torch threads per op fight each other
# and the servers under test (measured: a 32x32 linear 0.1 ms alone, 12 ms contended).
torch.set_num_threads(1)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("GRADIO_TEMP_DIR", tempfile.mkdtemp(prefix="gradio-tests-"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "assets" / "demo"
SCREENSHOTS = ROOT / "test-output" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
MAX_UPLOAD_MB = 2  # the test app's upload limit: small, so going over it is cheap to test
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def demo_available() -> bool:
    return all((DEMO / name / "model.safetensors").is_file() for name in ("base", "finetuned")) and \
        (DEMO / "target_calib.jsonl").is_file()


def request_for(session_id: str) -> SimpleNamespace:
    """What a handler reads from gr.Request: the session hash."""
    return SimpleNamespace(session_hash=session_id)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tailor(client, keep: float = 0.1, method: str = "tailor", **extra) -> str:
    """Start a merge through the launched app's /tailor endpoint; returns the job id."""
    from tailor_ui.settings import Settings

    values = dict(method=method, keep=keep, alpha=0.8, scope="block", compensate=True, modules=[],
                  lam=1.0, hessians="one-pass", sign="obs", sensitivity="change", others="finetuned",
                  modules_regex="", calib_source="builtin", calib_files=None, calib_examples=32,
                  compensation=Settings.compensation, order="mask-first", budget="uniform")
    values.update(extra)
    job_id, progress = client.predict(**values, api_name="/tailor")
    assert job_id.startswith("job-") and job_id in progress  # the id comes back in a component
    return job_id


def wait(client, job_id: str, timeout: float = 120) -> dict:
    """/wait_job until the job is done (asserting it succeeded); returns its state."""
    info = client.predict(job_id, timeout, api_name="/wait_job")
    assert info["status"] == "done", info
    return info


@contextmanager
def hold_lane(studio, owner: str = "someone-else"):
    """Keep the demo pair's lane busy with another owner's job until the block ends, so
    jobs submitted meanwhile wait in the queue."""
    release, started = threading.Event(), threading.Event()

    def block(progress, should_stop):
        started.set()
        release.wait(60)

    # in this process: it shares its events with the test
    job = studio.runner.submit(owner, "tailor", block, lane=studio.demo.lane, in_worker=False)
    try:
        assert started.wait(60), "the lane did not become free"
        yield job
    finally:
        release.set()
        studio.runner.wait(job.id, owner, 10)


@pytest.fixture(scope="session")
def model_root(tmp_path_factory) -> Path:
    """A folder the session's studio lets visitors load models from: tests save theirs here."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def disk_pair(model_root):
    """A tiny LLaVA base and its "fine-tuned" copy (last decoder layer moved) saved with the
    demo's processor as `base/` and `ft/`, plus `calib.jsonl` with six images under `img/`.
    Read-only for tests: several modules share it."""
    from PIL import Image

    from families import tiny_llava
    from tailor_ui.data import write_examples
    from tailor_ui.demo.processor import build_processor
    from tailor_ui.demo.world import vocabulary

    root = model_root / "pair"
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


@pytest.fixture(scope="session")
def studio(tmp_path_factory, model_root):
    """One Studio for the whole run: the demo pair on the CPU, warmed up."""
    if not demo_available():
        pytest.skip("the demo pair is not built (python -m tailor_ui demo build)")
    from tailor_ui.app.service.studio import Studio, StudioConfig

    root = tmp_path_factory.mktemp("studio")
    config = StudioConfig(workdir=root / "work", demo_dir=DEMO, device="cpu",
                          model_roots=[ROOT / "assets", model_root, root], calib_examples=32,
                          quick_examples=8, max_upload_mb=MAX_UPLOAD_MB)
    studio = Studio(config)
    studio.start(background=False)
    assert studio.demo is not None, studio.demo_error
    assert studio.warm.wait(180), "the start-up merge did not finish"
    yield studio
    studio.close()


@pytest.fixture(scope="session")
def app(studio):
    """The dashboard, launched on a free port (shared by the API and browser tests)."""
    from tailor_ui.app.ui import lean_import

    lean_import.prepare()  # as app.py does: no IPython, no stub writing
    from tailor_ui.app.ui.blocks import App, launch_options

    app = App(studio)
    blocks = app.build()
    _, url, _ = blocks.launch(server_name="127.0.0.1", server_port=free_port(),
                              prevent_thread_lock=True, quiet=True, **launch_options(studio))
    app.url = url.rstrip("/") + "/"
    yield app
    blocks.close()


@pytest.fixture(scope="session")
def handlers(studio):
    """The dashboard's handlers, built once and called directly (`app` is the launched server)."""
    from tailor_ui.app.ui.blocks import App

    handlers = App(studio)
    handlers.build()
    return handlers


@pytest.fixture
def client(app, tmp_path):
    from gradio_client import Client

    return Client(app.url, verbose=False, download_files=str(tmp_path / "downloads"))


@pytest.fixture(scope="session")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    yield page
    context.close()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS


@pytest.fixture(scope="module")
def decoder_pair():
    """A tiny LLaVA and a fine-tune of its decoder layers, for Model Tailor's engine tests."""
    from families import tuned_decoder_pair

    return tuned_decoder_pair()


@pytest.fixture(scope="module")
def decoder_batches(decoder_pair):
    from families import llava_batches

    return llava_batches(decoder_pair.base.config, 2)
