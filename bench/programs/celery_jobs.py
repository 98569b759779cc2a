"""Scenario 14's Python baseline: Celery with Redis as broker and result
backend, what a Python team runs for background jobs, running the same work
as Offload's jobs. Celery's defaults are kept (tasks acknowledged when a
worker takes them, prefetch 4), as teams run it.

Usage:
  python celery_jobs.py worker REDIS_PORT PROCESSES
      a prefork worker of PROCESSES processes; prints "listening" once ready.
  python celery_jobs.py bench REDIS_PORT KIND COUNT IN_FLIGHT [BOUND_SECS]
      sends COUNT tasks of KIND ("sha256": SHA-256 of 1 KiB; "spin": 50 ms of
      CPU; "logged": tasks.logged_spin, keyed by its number), IN_FLIGHT at a
      time, each awaited to its end (at most BOUND_SECS, default 120: past
      it, counted as failed); prints one JSON line with the throughput and
      the submit-to-done latencies.
"""

import base64
import hashlib
import json
import os
import sys
import threading
import time

from celery import Celery
from celery.signals import worker_ready

PORT = sys.argv[2] if len(sys.argv) > 2 else os.environ.get("REDIS_PORT", "6379")
app = Celery(
    "offload_bench",
    broker=f"redis://127.0.0.1:{PORT}/0",
    backend=f"redis://127.0.0.1:{PORT}/1",
)
app.conf.update(
    result_expires=3600,
    worker_hijack_root_logger=False,
    worker_redirect_stdouts=False,
    broker_connection_retry_on_startup=True,
)


@worker_ready.connect
def ready(**_):
    print("listening", flush=True)


@app.task(name="sha256")
def sha256(data):
    return hashlib.sha256(base64.b64decode(data)).hexdigest()


@app.task(name="logged")
def logged(key):
    import tasks

    return tasks.logged_spin(key.encode()).decode()


@app.task(name="spin")
def spin(data):
    end = time.perf_counter() + 0.05
    spins = 0
    while time.perf_counter() < end:
        spins += 1
    return spins


def bench(kind, count, in_flight, bound):
    task = {"sha256": sha256, "spin": spin, "logged": logged}[kind]
    data = base64.b64encode(os.urandom(1024)).decode()
    latencies, failed, lock = [], [0], threading.Lock()
    remaining = [count]

    def submitter():
        while True:
            with lock:
                if remaining[0] == 0:
                    return
                remaining[0] -= 1
                key = str(remaining[0])
            t0 = time.perf_counter()
            try:
                # Bounded: a task not answered in time counts as lost.
                task.delay(key if kind == "logged" else data).get(timeout=bound)
                with lock:
                    latencies.append((time.perf_counter() - t0) * 1e6)
            except Exception:  # noqa: BLE001 - counted, as a lost job
                with lock:
                    failed[0] += 1

    started = time.perf_counter()
    threads = [threading.Thread(target=submitter) for _ in range(in_flight)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - started
    latencies.sort()
    at = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0  # noqa: E731
    print(json.dumps({"done": len(latencies), "failed": failed[0], "seconds": seconds, "p50_us": at(0.5), "p99_us": at(0.99)}))


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        app.worker_main(["worker", "--pool", "prefork", "--concurrency", sys.argv[3], "--loglevel", "warning"])
    else:
        bound = float(sys.argv[6]) if len(sys.argv) > 6 else 120.0
        bench(sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), bound)
