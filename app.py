"""Model Tailor Studio: `python app.py` serves the dashboard at http://localhost:7860.

The built-in demo pair loads first (in a thread, so a slow load cannot hold the page back
longer than MTS_DEMO_WAIT seconds), then Gradio is imported and the page built, so the
first page opens with the pair ready: about 4 s on 2 CPU cores (bench/startup.py). The
cyclic garbage collector stays off until the page is built.

Environment: MTS_HOST / MTS_PORT (or GRADIO_SERVER_NAME / GRADIO_SERVER_PORT),
MTS_DEVICE (auto | cpu | cuda), MTS_DEMO_DIR, MTS_WORKDIR (session files),
MTS_MODEL_ROOTS (local folders visitors may load models from, separated by ':'),
MTS_MAX_USER_PAIRS, MTS_MAX_UPLOAD_MB, MTS_CALIB_EXAMPLES, MTS_QUICK_EXAMPLES, MTS_WARM_UP=0,
MTS_DEMO_WAIT, MTS_WARM_DELAY, MTS_GPU_SECONDS (a GPU job's ZeroGPU duration), MTS_WORKERS=0
(jobs compute in the lanes' threads instead of worker processes).
GET /healthz answers JSON for health checks.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import threading
import time

START = time.perf_counter()
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
if __name__ == "__main__":
    # Start-up allocates hundreds of thousands of long-lived objects (module code, classes);
    # the cyclic collector would traverse them all again and again: a quarter of the start-up's
    # CPU (bench/startup.py). It resumes before the server listens (collect_start_up).
    gc.disable()
    from tailor_ui.app.ui import lean_import

    lean_import.prepare(keep_ipython=bool(os.environ.get("MTS_KEEP_IPYTHON")))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(description="Model Tailor Studio dashboard")
    parser.add_argument("--host", default=env.get("MTS_HOST") or env.get("GRADIO_SERVER_NAME") or "0.0.0.0")
    parser.add_argument("--port", type=int,
                        default=int(env.get("MTS_PORT") or env.get("GRADIO_SERVER_PORT") or 7860))
    parser.add_argument("--no-warm-up", action="store_true",
                        help="skip computing the default merge at start")
    return parser.parse_args(argv)


def collect_start_up() -> None:
    """One full pass over start-up's objects (≈ 0.35 s on an idle machine), then freeze the
    survivors (the libraries, the page, the demo pair live as long as the process) so later
    passes skip them, and turn the collector back on. Before the server listens: taken
    after the first page instead, under 100 arriving visitors this pass held the interpreter
    for 1.2 s and refusals waited behind it (docs/results.md#load)."""
    gc.collect()
    gc.freeze()
    gc.enable()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # `docker stop` sends SIGTERM, which a process running as PID 1 otherwise ignores:
    # leave through the `finally` below (jobs cancelled, server closed) within seconds
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    from tailor_ui.app import gpu

    gpu.mode()  # on a ZeroGPU Space `spaces` must be imported before torch touches CUDA
    from tailor_ui.app.service.config import env_config
    from tailor_ui.app.service.studio import Studio

    config = env_config()
    if config.workers:
        from tailor_ui.app import workers

        workers.prepare_forks()  # before the demo pair computes anything
    if args.no_warm_up:
        config.warm_up = False
    studio = Studio(config)
    studio.warm_gate.clear()  # the start-up merge waits for a first page (see below)
    studio.start()  # the demo pair loads in the background from here on
    # ...but Gradio is imported only once it is loaded (or after MTS_DEMO_WAIT seconds): both
    # are pure-Python imports under one GIL, and interleaved they cost 1.5–3 s more CPU than
    # one after the other (measured on 2 cores: demo ready 11.9 s interleaved, 9.6 s in turn).
    studio.demo_ready.wait(float(os.environ.get("MTS_DEMO_WAIT", "30")))

    def announce() -> None:
        studio.demo_ready.wait()
        state = "ready" if studio.demo is not None else f"unavailable ({studio.demo_error})"
        print(f"demo pair {state} {time.perf_counter() - START:.1f} s after start "
              f"(process CPU {time.process_time():.1f} s)", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    from tailor_ui.app.ui.blocks import build_app, launch_options

    demo = build_app(studio)  # every event sets its own concurrency; no queue() (saves a rebuild)
    print(f"page built {time.perf_counter() - START:.1f} s after start", flush=True)
    collect_start_up()
    try:
        demo.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=True,
                    **launch_options(studio))
        print(f"serving {time.perf_counter() - START:.1f} s after start "
              f"(process CPU {time.process_time():.1f} s)", flush=True)
        # the start-up merge waits for the first page to load (App.poll opens the gate), so it
        # does not slow that page down, or for MTS_WARM_DELAY seconds if nobody comes
        opener = threading.Timer(float(os.environ.get("MTS_WARM_DELAY", "20")), studio.warm_gate.set)
        opener.daemon = True
        opener.start()
        demo.block_thread()
    finally:
        studio.close()


if __name__ == "__main__":
    main()
