"""Model Tailor Studio: `python app.py` serves the dashboard at http://localhost:7860.

The built-in demo pair starts loading at once, in a background thread, while the web
framework imports and the page is built, so the page opens with the pair (nearly) ready.

Environment: MTS_HOST / MTS_PORT (or GRADIO_SERVER_NAME / GRADIO_SERVER_PORT),
MTS_DEVICE (auto | cpu | cuda), MTS_DEMO_DIR, MTS_WORKDIR (session files),
MTS_MODEL_ROOTS (local folders visitors may load models from, separated by ':'),
MTS_MAX_USER_PAIRS, MTS_CALIB_EXAMPLES, MTS_QUICK_EXAMPLES, MTS_WARM_UP=0.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time

START = time.perf_counter()
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
if __name__ == "__main__" and "IPython" not in sys.modules and not os.environ.get("MTS_KEEP_IPYTHON"):
    # Gradio imports IPython (about a second) only for its notebook magics; a server has none.
    sys.modules["IPython"] = None  # type: ignore[assignment]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(description="Model Tailor Studio dashboard")
    parser.add_argument("--host", default=env.get("MTS_HOST") or env.get("GRADIO_SERVER_NAME") or "0.0.0.0")
    parser.add_argument("--port", type=int,
                        default=int(env.get("MTS_PORT") or env.get("GRADIO_SERVER_PORT") or 7860))
    parser.add_argument("--no-warm-up", action="store_true",
                        help="skip computing the default merge at start")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from tailor_ui.ui.studio import Studio, env_config

    config = env_config()
    if args.no_warm_up:
        config.warm_up = False
    studio = Studio(config)
    studio.warm_gate.clear()  # the start-up merge waits until the server is up
    studio.start()  # the demo pair loads in the background from here on

    def announce() -> None:
        studio.demo_ready.wait()
        state = "ready" if studio.demo is not None else f"unavailable ({studio.demo_error})"
        print(f"demo pair {state} {time.perf_counter() - START:.1f} s after start "
              f"(process CPU {time.process_time():.1f} s)", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    from tailor_ui.ui.blocks import build_app, launch_options

    demo = build_app(studio)  # every event sets its own concurrency; no queue() (saves a rebuild)
    print(f"page built {time.perf_counter() - START:.1f} s after start", flush=True)
    try:
        demo.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=True,
                    **launch_options(studio))
        print(f"serving {time.perf_counter() - START:.1f} s after start "
              f"(process CPU {time.process_time():.1f} s)", flush=True)
        studio.warm_gate.set()
        demo.block_thread()
    finally:
        studio.close()


if __name__ == "__main__":
    main()
