"""What the launched dashboard serves over plain HTTP: only the app's own folders (the
demo's files, Gradio's upload cache), uploads up to the configured size, no analytics.

Requests go out byte for byte through http.client: httpx and urllib may tidy `../` away
before sending, which would test the client instead of the server.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote, urlsplit

import pytest

from conftest import DEMO, MAX_UPLOAD_MB, ROOT, tailor


def request(app, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """`path` sent exactly as given (after the app's root)."""
    url = urlsplit(app.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        conn.request(method, url.path.rstrip("/") + "/" + path.lstrip("/"), body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def secret(tmp_path_factory) -> tuple[Path, bytes]:
    """A file outside every folder the app may serve."""
    content = f"secret {uuid.uuid4().hex}".encode()
    path = tmp_path_factory.mktemp("outside") / "secret.txt"
    path.write_bytes(content)
    return path, content


def forbidden_paths(secret_path: Path) -> list[str]:
    image = next((DEMO / "images").rglob("*.png"))
    escape = f"{DEMO}/../../tailor_ui/cli.py"  # a `../` walk out of the demo folder
    return [
        "/etc/passwd",
        str(secret_path),
        str(ROOT / "tailor_ui" / "cli.py"),  # the app's own code: in the working directory, not served
        "tailor_ui/cli.py",  # relative: resolved against the server's working directory
        escape,
        quote(escape, safe=""),  # the same, percent-encoded
        f"{image.parent}/..%2F..%2F..%2F..%2Ftailor_ui%2Fcli.py",
        str(DEMO.parent / "style.css"),  # beside the demo folder, not in it
    ]


def test_files_outside_the_apps_folders_cannot_be_fetched(app, secret):
    secret_path, content = secret
    cli_source = (ROOT / "tailor_ui" / "cli.py").read_bytes()
    for path in forbidden_paths(secret_path):
        for route in ("gradio_api/file=", "gradio_api/file/"):  # Gradio 6's route and its old alias
            status, body = request(app, "GET", route + path)
            assert status == 403, (route, path, status)  # refused by the file route itself
            assert content not in body and cli_source[:200] not in body and b"root:" not in body


def test_a_demo_image_can_be_fetched(app):
    image = next((DEMO / "images").rglob("*.png"))  # served: the Compare tab's examples
    status, body = request(app, "GET", f"gradio_api/file={image}")
    assert status == 200 and body == image.read_bytes()


def multipart(name: str, data: bytes) -> tuple[bytes, dict[str, str]]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def test_uploads_over_the_configured_limit_are_refused(app, tmp_path):
    limit = MAX_UPLOAD_MB * 2**20
    status, body = request(app, "POST", "gradio_api/upload", *multipart("big.jsonl", b"x" * (limit + 1)))
    assert status == 413 and f"exceeded maximum allowed size of {limit} bytes" in body.decode()
    status, body = request(app, "POST", "gradio_api/upload", *multipart("fits.jsonl", b"x" * limit))
    assert status == 200 and json.loads(body)[0].endswith("fits.jsonl")
    # gradio_client checks the limit the app announces before sending anything
    from gradio_client import Client, handle_file

    big = tmp_path / "calib.jsonl"
    big.write_bytes(b" " * (limit + 1))
    with pytest.raises(ValueError, match=f"exceeds the maximum file size of {limit} bytes"):
        tailor(Client(app.url, verbose=False), calib_source="upload", calib_files=[handle_file(str(big))])


def test_the_upload_limit_comes_from_the_environment(monkeypatch, tmp_path):
    from tailor_ui.app.ui.blocks import launch_options
    from tailor_ui.app.service.config import env_config

    monkeypatch.setenv("MTS_MAX_UPLOAD_MB", "3")
    config = env_config(tmp_path)
    assert config.max_upload_mb == 3
    assert launch_options(SimpleNamespace(config=config))["max_file_size"] == 3 * 2**20


def test_the_running_app_announces_its_limit_and_no_analytics(app):
    status, body = request(app, "GET", "config")
    config = json.loads(body)
    assert status == 200 and config["max_file_size"] == MAX_UPLOAD_MB * 2**20
    assert config["analytics_enabled"] is False


def test_app_py_turns_analytics_off_before_gradio_is_imported():
    env = {k: v for k, v in os.environ.items() if k != "GRADIO_ANALYTICS_ENABLED"}
    code = ("import os, sys, app; assert 'gradio' not in sys.modules; "
            "print(os.environ['GRADIO_ANALYTICS_ENABLED'])")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"  # what gradio.analytics.analytics_enabled() reads


def test_the_app_finds_the_project_root():
    """The dashboard's stylesheet, the demo's assets and the shipped sweeps are read from
    the project's root (a moved module must not change where that is)."""
    from tailor_ui.app.service.config import ROOT

    assert (ROOT / "app.py").is_file() and (ROOT / "assets" / "style.css").is_file()
    assert (ROOT / "bench" / "results" / "demo_sweep_spatial.csv").is_file()
