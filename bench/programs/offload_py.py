"""Scenario 9's Python worker program for Offload: the functions of tasks.py
as tasks py.sha256 and py.burn."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from offload_worker import serve, task  # noqa: E402

import tasks  # noqa: E402

for name, function in tasks.TASKS.items():
    task("py." + name, description=function.__doc__ or name)(lambda ctx, data, params, f=function: f(data))

if __name__ == "__main__":
    serve()
