"""The work of the worker-program benchmark (scenario 9), as plain functions
that Offload's Python program and the grpcio + ProcessPoolExecutor baseline
both run: a 1 KiB hash (overhead) and about 5 ms of pure-Python CPU work.
Also scenario 14's kill run's job, `logged_spin`, which Offload's Python
program and Celery run."""

import hashlib
import os
import time

BURN_ROUNDS = 50_000


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def burn(data: bytes) -> bytes:
    x = len(data)
    for i in range(BURN_ROUNDS):
        x = (x * 31 + i) & 0xFFFFFFFF
    return x.to_bytes(4, "big")


def logged_spin(data: bytes) -> bytes:
    """About 20 ms of CPU, its start and end appended to the file named by
    OFFLOAD_BENCH_LOG (lines "S|E KEY UNIX_NS PID", one write each, so that
    processes appending at once do not mix), to count each job's runs."""
    key = data.decode()
    log = os.environ["OFFLOAD_BENCH_LOG"]

    def note(what):
        with open(log, "a") as f:
            f.write(f"{what} {key} {time.time_ns()} {os.getpid()}\n")

    note("S")
    end = time.perf_counter() + 0.02
    while time.perf_counter() < end:
        pass
    note("E")
    return data


TASKS = {"sha256": sha256, "burn": burn, "logged_spin": logged_spin}
