"""The work of the worker-program benchmark (scenario 9), as plain functions
that Offload's Python program and the grpcio + ProcessPoolExecutor baseline
both run: a 1 KiB hash (overhead) and about 5 ms of pure-Python CPU work."""

import hashlib

BURN_ROUNDS = 50_000


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def burn(data: bytes) -> bytes:
    x = len(data)
    for i in range(BURN_ROUNDS):
        x = (x * 31 + i) & 0xFFFFFFFF
    return x.to_bytes(4, "big")


TASKS = {"sha256": sha256, "burn": burn}
