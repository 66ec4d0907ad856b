"""Start-up: from `python app.py` to a first page that shows the demo pair ready (target: < 10 s).

Each run starts the app as a user would (a fresh process, its own port and work folder),
polls `/` until the server answers (and checks that the page config it serves already
says the pair is ready), then opens the page in Debian's chromium (launched beforehand, so
its own start is not counted) and waits until the pair status shows "ready". Reports per
run: first HTTP 200, page rendered with the pair ready (the browser shares the machine's
cores with the server), and the app's own "demo pair ready" / "serving" lines; then the
median over runs. With --cold, the kernel's page cache is dropped before each run (root
only), as on a first start after installing: every library file is read from disk again.

    python bench/startup.py --runs 5 [--cold] [--python /path/to/venv/bin/python] [--out bench/results/startup.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, start: float, limit: float = 120) -> float:
    while time.perf_counter() - start < limit:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - start
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(url)


def pair_status_served(url: str) -> str:
    """The pair status in the page config a first visitor's browser fetches."""
    with urllib.request.urlopen(url + "config", timeout=10) as r:
        config = json.load(r)
    for component in config.get("components", []):
        if component.get("props", {}).get("elem_id") == "pair-status":
            return str(component["props"].get("value"))
    return ""


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def one_run(python: str, browser, cold: bool) -> dict:
    if cold:
        drop_page_cache()
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    with tempfile.TemporaryDirectory() as work:
        env = dict(os.environ, MTS_WORKDIR=work, MTS_HOST="127.0.0.1", MTS_PORT=str(port))
        start = time.perf_counter()
        proc = subprocess.Popen([python, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            http = wait_http(url, start)
            served_ready = "ready" in pair_status_served(url)
            page = browser.new_page()
            page.goto(url)
            page.wait_for_function(
                "() => (document.querySelector('#pair-status')?.innerText || '').includes('ready')",
                timeout=120_000, polling=50)
            shown = time.perf_counter() - start
            page.close()
        finally:
            proc.terminate()
            proc.wait(30)
    text = Path(log.name).read_text()
    os.unlink(log.name)

    def said(pattern: str) -> float | None:
        m = re.search(pattern, text)
        return float(m.group(1)) if m else None

    return {"first_http_200_s": round(http, 2), "served_page_says_ready": served_ready,
            "page_shows_ready_s": round(shown, 2),
            "app_demo_ready_s": said(r"demo pair ready ([\d.]+) s"), "app_serving_s": said(r"serving ([\d.]+) s"),
            "app_cpu_at_serving_s": said(r"serving [\d.]+ s after start \(process CPU ([\d.]+) s")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--python", default=sys.executable, help="interpreter of the environment to time")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each run (root)")
    args = parser.parse_args()
    if args.cold:
        try:
            drop_page_cache()
        except OSError as exc:
            sys.exit(f"startup.py: --cold needs to write /proc/sys/vm/drop_caches (root): {exc.strerror}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        runs = []
        for i in range(args.runs):
            runs.append(one_run(args.python, browser, args.cold))
            print(f"run {i + 1}: {runs[-1]}", flush=True)
        browser.close()
    summary = {key: statistics.median(r[key] for r in runs if r[key] is not None)
               for key in runs[0] if any(isinstance(r[key], float) for r in runs)}
    summary["served_page_says_ready"] = all(r["served_page_says_ready"] for r in runs)
    result = {"python": args.python, "cpu": cpu_model(), "cores": os.cpu_count(), "cold": args.cold,
              "load_avg_before": os.getloadavg(),
              "runs": runs, "median": summary}
    print("median:", json.dumps(summary))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
