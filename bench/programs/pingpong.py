"""A bare round trip between two Python processes over a Unix socketpair
(1 KiB each way), the floor of what any Python worker pool pays per call.
Prints the median round trip in microseconds.  Usage: pingpong.py SECONDS"""

import os
import socket
import statistics
import sys
import time

SIZE = 1024


def exactly(sock, n):
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        if not chunk:
            raise EOFError
        got += chunk
    return got


ours, theirs = socket.socketpair()
if os.fork() == 0:
    ours.close()
    try:
        while True:
            theirs.sendall(exactly(theirs, SIZE))
    except EOFError:
        os._exit(0)
theirs.close()
message = b"x" * SIZE
samples = []
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    start = time.perf_counter_ns()
    ours.sendall(message)
    exactly(ours, SIZE)
    samples.append((time.perf_counter_ns() - start) / 1000)
ours.close()
os.wait()
print("%.1f" % statistics.median(samples))
