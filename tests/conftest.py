"""Shared fixtures: the dashboard's Studio on the demo pair, the app launched on a free
port, a gradio_client for it, and a Debian-chromium page driven by Playwright.

Heavy imports (gradio, playwright) happen inside the fixtures, so test modules that do not
use them pay nothing.
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
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


@pytest.fixture(scope="session")
def studio(tmp_path_factory):
    """One Studio for the whole run: the demo pair on the CPU, warmed up."""
    if not demo_available():
        pytest.skip("the demo pair is not built (python -m tailor_ui demo build)")
    from tailor_ui.ui.studio import Studio, StudioConfig

    root = tmp_path_factory.mktemp("studio")
    config = StudioConfig(workdir=root / "work", demo_dir=DEMO, device="cpu",
                          model_roots=[ROOT / "assets", root], calib_examples=32, quick_examples=8)
    studio = Studio(config)
    studio.start(background=False)
    assert studio.demo is not None, studio.demo_error
    assert studio.warm.wait(180), "the start-up merge did not finish"
    yield studio
    studio.close()


@pytest.fixture(scope="session")
def app(studio):
    """The dashboard, launched on a free port (shared by the API and browser tests)."""
    if "IPython" not in sys.modules:
        sys.modules["IPython"] = None  # gradio's notebook magics: not needed, a second to import
    from tailor_ui.ui.blocks import App, launch_options

    app = App(studio)
    blocks = app.build()
    _, url, _ = blocks.launch(server_name="127.0.0.1", server_port=free_port(),
                              prevent_thread_lock=True, quiet=True, **launch_options(studio))
    app.url = url.rstrip("/") + "/"
    yield app
    blocks.close()


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
