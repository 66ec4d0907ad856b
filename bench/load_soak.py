"""Load and soak: N gradio_client visitors against the dashboard on the loopback address.

Starts `python app.py` on 127.0.0.1 (or uses --url, which must be a loopback address),
waits for the demo pair, then starts --visitors visitors over --ramp seconds. Each is its
own gradio_client session (threads of --processes processes) and loops until --minutes are up over a mixed stream: a tailor
(random method and keep), a small sweep, a short fine-tune, a compare, an export of its
last patch. It waits for each job, polling /job_status as its `retry_after` says. A
monitor samples GET /healthz every 0.5 s and the server's RSS every 2 s. Everything
stops by itself: visitors at the deadline, in-flight jobs after --grace seconds, the whole
run at a hard limit.

With --kill-at S the monitor SIGKILLs a computing job worker S seconds in: that job must
fail with a message saying so (counted `killed`), and nothing else may fail. A signal can
land after its worker has sent its result (a job ends in about a second here), which fails
no job: when no job fails as killed within KILL_SETTLE_S, the monitor records that kill as
`missed` and kills again.

Reports jobs done / failed / lost / refused (with the refusal's latency and reason),
start and first-call latency, /healthz percentiles, RSS over time, the generator's own
stalls (a visitor process not running for STALL_S or more; each of the slowest refusals
names the longest stall of any visitor process during its wait), and the targets:

    python bench/load_soak.py --visitors 100 --minutes 10           # load
    python bench/load_soak.py --visitors 20 --minutes 30 --soak --kill-at 900   # soak, and a fault
    MTS_WORKERS=0 python bench/load_soak.py ...                      # jobs in the server's threads

Output: bench/results/load_soak_<visitors>x<minutes>.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
MAX_VISITORS, MAX_MINUTES = 200, 60
METHODS = ["tailor", "magnitude", "wise_ft", "task_arithmetic", "ties", "dare"]
STREAM = ["tailor", "sweep", "finetune", "compare", "export"]
# a control whose page value is empty (gradio_client's example inputs would be text or a
# sample file on the internet)
EMPTY = {"Textbox": "", "File": None, "Files": None}
REFUSALS = ("queue is full", "jobs waiting")  # the runner's two refusals
KILLED = "killed by SIGKILL"  # what a job whose worker was killed fails with
KILL_SETTLE_S = 15  # a killed job's visitor sees it fail within this (it polls a running job every second)
STALL_TICK_S = 0.02  # how often a generator process checks that it runs (`watch_stalls`)
STALL_S = 0.1  # a generator process whose 20 ms sleep overran by this much was stalled (not scheduled, or a long pass of its collector)
TARGETS = {"first_call_p99_s": 3.0, "healthz_p99_s": 0.25, "refusal_max_s": 0.5, "soak_rss_growth_mb": 200}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.load(r)


def rss_mb(pid: int) -> float:
    """Resident memory of one process (VmRSS), MB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def children(pid: int) -> list[int]:
    """The process's children, whichever of its threads forked them (the job workers are
    forked by the lanes' threads, not the main one)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))], 4)


def summary(values: list[float]) -> dict:
    return {"n": len(values), "p50": pct(values, 50), "p90": pct(values, 90), "p99": pct(values, 99),
            "max": round(max(values), 4) if values else None}


class Server:
    """`python app.py` on the loopback address, its own work folder; stopped on exit."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.work = tempfile.mkdtemp(prefix="load-soak-")
        env = {**os.environ, "MTS_WORKDIR": self.work, "MTS_WARM_DELAY": "0",
               "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
        self.log = open(Path(self.work) / "server.log", "w")
        self.process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--host", "127.0.0.1",
                                         "--port", str(self.port)], cwd=ROOT, env=env,
                                        stdout=self.log, stderr=subprocess.STDOUT)
        self.pid = self.process.pid

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()
        shutil.rmtree(self.work, ignore_errors=True)


def wait_ready(url: str, limit: float = 180) -> None:
    end = time.time() + limit
    while time.time() < end:
        try:
            health = get_json(url + "healthz", 2)
            if health.get("demo") == "ready":
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not get its demo pair ready in {limit:.0f} s")


class Run:
    """What every visitor and the monitor record (under one lock)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.outcomes: Counter = Counter()  # (kind, outcome)
        self.refusals: list[dict] = []
        self.errors: list[str] = []
        self.start_s: list[float] = []
        self.first_call_s: list[float] = []
        self.job_s: dict[str, list[float]] = {}
        self.healthz_s: list[float] = []
        self.healthz_failed = 0
        self.rss: list[dict] = []
        self.no_start = 0
        self.kills: list[dict] = []  # workers the monitor killed (--kill-at)
        self.killed_seen = None  # a counter both processes share: jobs that failed as killed
        self.stalls: list[dict] = []  # when a generator process could not run (`watch_stalls`)

    def portable(self) -> dict:
        """What the visitors recorded, to send from their process to the main one."""
        return {"outcomes": list(self.outcomes.items()), "refusals": self.refusals, "errors": self.errors,
                "start_s": self.start_s, "first_call_s": self.first_call_s, "job_s": self.job_s,
                "no_start": self.no_start, "stalls": self.stalls}

    def merge(self, other: dict) -> None:
        self.outcomes.update(dict(other["outcomes"]))
        for key in ("refusals", "errors", "start_s", "first_call_s", "stalls"):
            getattr(self, key).extend(other[key])
        for kind, seconds in other["job_s"].items():
            self.job_s.setdefault(kind, []).extend(seconds)
        self.no_start += other["no_start"]

    def count(self, kind: str, outcome: str, seconds: float | None = None) -> None:
        with self.lock:
            self.outcomes[(kind, outcome)] += 1
            if outcome == "killed" and self.killed_seen is not None:
                with self.killed_seen.get_lock():
                    self.killed_seen.value += 1
            if seconds is not None and outcome == "done":
                self.job_s.setdefault(kind, []).append(seconds)


def cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime
    except (OSError, IndexError, ValueError):
        return -1


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _age_ticks(pid: int) -> int:
    """When the process started, in clock ticks since boot (-1 if it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return -1


def kill_a_computing_worker(pid: int, run: Run, t_s: float) -> bool:
    """SIGKILL the youngest of the server's children that computed over the last 0.3 s: it
    is mid-job and has the most of its job ahead (an older one may be sending its result)."""
    # a job's worker is a fork of the server (its command line); other children are not jobs
    server = Path(f"/proc/{pid}/cmdline").read_bytes()
    before = {c: cpu_ticks(c) for c in children(pid) if _cmdline(c) == server}
    time.sleep(0.3)
    busy = [c for c, ticks in before.items() if c in children(pid) and cpu_ticks(c) > ticks]
    if not busy:
        return False
    worker = max(busy, key=_age_ticks)
    os.kill(worker, signal.SIGKILL)
    run.kills.append({"pid": worker, "t_s": round(t_s, 1), "failed_its_job": None})
    return True


def monitor(url: str, pid: int | None, stop, t0: float, kill_at: float | None, killed_seen, out) -> None:
    """In a process of its own (so the visitors' threads, on this process's interpreter
    lock, do not delay its requests): GET /healthz every 0.5 s, the server's RSS every 2 s,
    the fault at `kill_at` (again if it failed no job); what it saw goes to `out` when
    `stop` is set."""
    run = Run()
    last_rss = 0.0
    while not stop.wait(0.5):
        now = time.perf_counter() - t0
        last = run.kills[-1] if run.kills else None
        if last is not None and last["failed_its_job"] is None:
            if killed_seen.value > sum(k["failed_its_job"] is True for k in run.kills):
                last["failed_its_job"] = True
            elif now - last["t_s"] >= KILL_SETTLE_S:
                last["failed_its_job"] = False  # it had sent its result: kill another
        wanted = last is None or last["failed_its_job"] is False
        if kill_at is not None and pid is not None and wanted and now >= kill_at:
            kill_a_computing_worker(pid, run, now)
        start = time.perf_counter()
        try:
            get_json(url + "healthz", 5)
            run.healthz_s.append(time.perf_counter() - start)
        except OSError:
            run.healthz_failed += 1
        now = time.perf_counter()
        if pid is not None and now - last_rss >= 2:
            last_rss = now
            workers = sum(rss_mb(c) for c in children(pid))
            run.rss.append({"t_s": round(now - t0, 1), "server_mb": round(rss_mb(pid), 1),
                            "workers_mb": round(workers, 1)})
    out.put({"healthz_s": run.healthz_s, "healthz_failed": run.healthz_failed, "rss": run.rss,
             "kills": run.kills})


def watch_stalls(run: Run, stop: threading.Event) -> None:
    """Note every time this process's STALL_TICK_S sleep overran by STALL_S or more: the load
    generator was not running then, so a slow answer it timed may be its own delay."""
    while not stop.is_set():
        start = time.perf_counter()
        time.sleep(STALL_TICK_S)
        late = time.perf_counter() - start - STALL_TICK_S
        if late >= STALL_S:
            with run.lock:
                run.stalls.append({"late_s": late, "at": time.time()})


def visitors(indices: list[int], url: str, image: str, starts: list[float], deadline: float, grace: float,
             killed_seen, out) -> None:
    """In a process of its own: visitors `indices`, each a thread from its wall-clock time in
    `starts` (several processes, so one interpreter lock does not queue every client's Python
    work: a browser visitor has a machine of its own); what they saw goes to `out`."""
    run = Run()
    run.killed_seen = killed_seen
    watching = threading.Event()
    threading.Thread(target=watch_stalls, args=(run, watching), daemon=True).start()
    threads = []
    for i in indices:
        time.sleep(max(0.0, starts[i] - time.time()))
        thread = threading.Thread(target=visitor, args=(i, url, image, run, deadline, grace), daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join(max(0.0, deadline + grace + 30 - time.time()))
    watching.set()
    with run.lock:
        out.put(run.portable())


def visitor(index: int, url: str, image: str, run: Run, deadline: float, grace: float) -> None:
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    rng = random.Random(index)
    start = time.perf_counter()
    try:
        # the URL is loopback (checked), plain http: with verification on, httpx builds an SSL
        # context, loading the CA bundle, for every request (54 ms of the generator's CPU per
        # call, measured, against 4.7 ms without), which starved the server it measures
        client = Client(url, verbose=False, ssl_verify=False)
        run.start_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        client.predict(api_name="/load_demo")
        run.first_call_s.append(time.perf_counter() - start)
    except Exception as exc:  # a visitor that cannot start is a result, not a crash
        with run.lock:
            run.no_start += 1
            run.errors.append(f"start: {type(exc).__name__}: {str(exc)[:200]}")
        return
    last_tailor = None
    step = index  # visitors start at different points of the stream
    while time.time() < deadline:
        kind = STREAM[step % len(STREAM)]
        step += 1
        began = time.perf_counter()
        try:
            if kind == "export":
                if last_tailor is None:
                    continue
                client.predict(last_tailor, api_name="/export_patch")
                run.count(kind, "done", time.perf_counter() - began)
                continue
            if kind == "compare":
                client.predict(handle_file(image), "question", "how many shapes are there?",
                               api_name="/compare")
                run.count(kind, "done", time.perf_counter() - began)
                continue
            job_id = submit(client, kind, rng)
        except AppError as exc:
            if KILLED not in str(exc):
                refused(run, kind, str(exc), time.perf_counter() - began)
                wait = re.search(r"try again in (\d+(?:\.\d+)?) s", str(exc))
                if wait:  # as the refusal says, as a polite client does (with jitter)
                    time.sleep(float(wait.group(1)) * rng.uniform(0.8, 1.2))
                continue
            outcome, error = "failed", str(exc)  # a compare computes in a worker too, and fails at once
        except Exception as exc:
            run.count(kind, "error")
            with run.lock:
                run.errors.append(f"{kind}: {type(exc).__name__}: {str(exc)[:200]}")
            continue
        else:
            outcome, error = follow(client, job_id, deadline + grace)
        if outcome == "failed" and error and KILLED in error:
            outcome = "killed"
        run.count(kind, outcome, time.perf_counter() - began)
        if error:
            with run.lock:
                run.errors.append(f"{kind}: {error[:200]}")
        if kind == "tailor" and outcome == "done":
            last_tailor = job_id


def submit(client, kind: str, rng: random.Random) -> str:
    if kind == "tailor":
        values = {"method": rng.choice(METHODS), "keep": round(rng.uniform(0.05, 0.3), 2)}
        endpoint = "/tailor"
    elif kind == "sweep":
        values, endpoint = {"methods": ["wise_ft"], "keeps": "0.1", "lams": "0.5", "examples": 4}, "/sweep"
    else:
        values = {"method": "full", "epochs": 1, "examples": 8, "tailor_after": False}
        endpoint = "/finetune"
    job_id, _ = client.predict(**{**defaults(client, endpoint), **values}, api_name=endpoint)
    return job_id


def defaults(client, endpoint: str) -> dict:
    """Every parameter of the endpoint at the page's own initial value (as a visitor who
    changes only a few controls sends them). From the API description the client fetched
    when it connected (`_info`: `view_api` would render every endpoint's text each call)."""
    parameters = client._info["named_endpoints"][endpoint]
    return {p["parameter_name"]: p["parameter_default"] if p.get("parameter_has_default")
            else EMPTY.get(p["component"], p.get("example_input")) for p in parameters["parameters"]}


def follow(client, job_id: str, until: float) -> tuple[str, str | None]:
    """Poll the job as told (retry_after) until it ends: its status (`lost` when the server
    forgot it, `unfinished` when the run ends first) and a failed job's error."""
    from gradio_client.exceptions import AppError

    while time.time() < until:
        try:
            info = client.predict(job_id, api_name="/job_status")
        except AppError:
            return "lost", None
        if info["status"] in ("done", "failed", "cancelled"):
            return info["status"], info.get("error") if info["status"] == "failed" else None
        time.sleep(min(info.get("retry_after") or 1.0, max(0.0, until - time.time())))
    return "unfinished", None


def refused(run: Run, kind: str, message: str, seconds: float) -> None:
    reason = next((r for r in REFUSALS if r in message), None)
    run.count(kind, "refused" if reason else "error")
    with run.lock:
        if reason:
            run.refusals.append({"s": seconds, "at": time.time(), "reason": message[:160]})
        else:
            run.errors.append(f"{kind}: {message[:200]}")


def stalled_during(stalls: list[dict], refusal: dict) -> float:
    """The longest generator stall that overlapped the refusal's wait (0 when none did)."""
    began = refusal["at"] - refusal["s"]
    return max((x["late_s"] for x in stalls if x["at"] > began and x["at"] - x["late_s"] - STALL_TICK_S < refusal["at"]),
               default=0.0)


def report(args, run: Run, seconds: float, begin: float) -> dict:
    """The run's figures; `begin`: the wall-clock time the first visitor set out."""
    outcomes: dict[str, dict[str, int]] = {}
    for (kind, outcome), n in sorted(run.outcomes.items()):
        outcomes.setdefault(kind, {})[outcome] = n
    total = Counter()
    for (_, outcome), n in run.outcomes.items():
        total[outcome] += n
    refusal_s = [r["s"] for r in run.refusals]
    rss_1min = next((r["server_mb"] for r in run.rss if r["t_s"] >= 60), None)
    rss_end = run.rss[-1]["server_mb"] if run.rss else None
    checks = {
        "first_call_p99": (pct(run.first_call_s, 99) or 1e9) < TARGETS["first_call_p99_s"],
        "healthz_p99": (pct(run.healthz_s, 99) or 1e9) < TARGETS["healthz_p99_s"],
        "no_lost_or_failed": total["lost"] == total["failed"] == total["error"] == 0 and run.no_start == 0,
        # each killed worker fails its own job, with a message saying so, and nothing else
        "kill_fails_one_job": total["killed"] == sum(k["failed_its_job"] is not False for k in run.kills),
        "refusals_fast_with_reason": all(s < TARGETS["refusal_max_s"] for s in refusal_s),
    }
    if args.soak:
        checks["soak_rss"] = (rss_1min is not None and rss_end is not None
                              and abs(rss_end - rss_1min) < TARGETS["soak_rss_growth_mb"])
    return {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "visitors": args.visitors, "minutes": args.minutes, "ramp_s": args.ramp, "grace_s": args.grace,
        "wall_s": round(seconds, 1), "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg()},
        "worker_processes": os.environ.get("MTS_WORKERS", "1") not in ("0", "false", "no"),
        "visitor_processes": min(args.processes, args.visitors),
        "jobs": {"total": dict(total), "by_kind": outcomes},
        "visitors_that_could_not_start": run.no_start, "workers_killed": run.kills,
        "start_s": summary(run.start_s), "first_call_s": summary(run.first_call_s),
        "job_s": {kind: summary(v) for kind, v in run.job_s.items()},
        "refusals": {"n": len(run.refusals), "s": summary(refusal_s),
                     "over_target": sum(s >= TARGETS["refusal_max_s"] for s in refusal_s),
                     # when the slowest came, seconds from the first visitor's start
                     # and whether a generator process stalled while it waited
                     "slowest": [{"s": round(r["s"], 3), "t_s": round(r["at"] - begin, 1),
                                  "generator_stalled_s": round(stalled_during(run.stalls, r), 3)}
                                 for r in sorted(run.refusals, key=lambda r: -r["s"])[:10]],
                     "reasons": sorted({r["reason"] for r in run.refusals})[:5]},
        "generator_stalls": {"n": len(run.stalls), "max_s": round(max((x["late_s"] for x in run.stalls), default=0), 3),
                             "slowest": [{"late_s": round(x["late_s"], 3), "t_s": round(x["at"] - begin, 1)}
                                         for x in sorted(run.stalls, key=lambda x: -x["late_s"])[:10]]},
        "healthz_s": summary(run.healthz_s), "healthz_failed": run.healthz_failed,
        "rss_mb": {"after_1_min": rss_1min, "end": rss_end,
                   "max": max((r["server_mb"] for r in run.rss), default=None), "series": run.rss},
        "targets": TARGETS, "checks": checks, "errors": run.errors[:20],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--visitors", type=int, default=20)
    parser.add_argument("--minutes", type=float, default=1.0)
    parser.add_argument("--ramp", type=float, default=10.0, help="seconds over which visitors arrive")
    parser.add_argument("--grace", type=float, default=60.0, help="seconds in-flight jobs get after the end")
    parser.add_argument("--processes", type=int, default=4,
                        help="processes the visitors are spread over (threads in each)")
    parser.add_argument("--soak", action="store_true", help="check the RSS target too")
    parser.add_argument("--kill-at", type=float, help="SIGKILL a computing job worker this many seconds in")
    parser.add_argument("--url", help="a running dashboard on the loopback address (default: start one)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error("--processes must be at least 1")
    if not 1 <= args.visitors <= MAX_VISITORS or not 0 < args.minutes <= MAX_MINUTES:
        parser.error(f"--visitors 1..{MAX_VISITORS}, --minutes up to {MAX_MINUTES}")
    if args.url and urllib.parse.urlparse(args.url).hostname not in LOOPBACK:
        parser.error("--url must be a loopback address (127.0.0.1, localhost)")
    out = args.out or ROOT / "bench" / "results" / f"load_soak_{args.visitors}x{args.minutes:g}.json"
    # whatever happens, this process ends: the run, the grace, and two minutes for the rest
    limit = args.minutes * 60 + args.ramp + args.grace + 300
    threading.Timer(limit, lambda: os._exit(3)).start()

    server = None if args.url else Server()
    url = args.url.rstrip("/") + "/" if args.url else server.url
    run, watched = Run(), None
    try:
        wait_ready(url)
        image = str(next((ROOT / "assets" / "demo" / "images").rglob("*.png")))
        t0 = time.perf_counter()
        # time.perf_counter is the same clock in both processes (CLOCK_MONOTONIC)
        spawn = multiprocessing.get_context("spawn")
        watched, seen, run.killed_seen = spawn.Event(), spawn.Queue(), spawn.Value("i", 0)
        watcher = spawn.Process(target=monitor, args=(url, server.pid if server else None, watched, t0,
                                                      args.kill_at, run.killed_seen, seen), daemon=True)
        watcher.start()
        begin = time.time()
        deadline = begin + args.ramp + args.minutes * 60
        starts = [begin + i * args.ramp / args.visitors for i in range(args.visitors)]
        lots = min(args.processes, args.visitors)
        reports = spawn.Queue()
        groups = [spawn.Process(target=visitors, args=(list(range(p, args.visitors, lots)), url, image, starts,
                                                       deadline, args.grace, run.killed_seen, reports), daemon=True)
                  for p in range(lots)]
        for group in groups:
            group.start()
        for _ in groups:
            run.merge(reports.get(timeout=max(1.0, deadline + args.grace + 60 - time.time())))
        for group in groups:
            group.join(10)
        watched.set()
        for key, value in seen.get(timeout=60).items():
            setattr(run, key, value)
        watcher.join(10)
        result = report(args, run, time.perf_counter() - t0, begin)
    finally:
        if watched is not None:
            watched.set()
        if server is not None:
            server.stop()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    brief = {k: result[k] for k in ("jobs", "visitors_that_could_not_start", "first_call_s", "healthz_s",
                                    "checks")}
    brief["refusals"] = {k: result["refusals"][k] for k in ("n", "s", "over_target")}
    brief["workers_killed"] = result["workers_killed"]
    brief["rss_mb"] = {k: result["rss_mb"][k] for k in ("after_1_min", "end", "max")}
    print(json.dumps(brief, indent=2))
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    os._exit(0 if all(result["checks"].values()) else 1)  # the hard-limit timer must not hold us


if __name__ == "__main__":
    main()
