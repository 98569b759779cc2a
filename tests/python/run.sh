#!/usr/bin/env bash
# Calls a running Offload server from Python's official gRPC stack: makes
# (once) a venv with grpcio, generates stubs from proto/, runs the check.
# Usage: tests/python/run.sh HOST:PORT [CA.pem [CERT.pem KEY.pem [DOMAIN]]] (TLS)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
venv=$("$root/scripts/venv.sh" "${OFFLOAD_PY_VENV:-$root/target/py-venv}" "$here/requirements.txt")
gen=$(mktemp -d)
trap 'rm -rf "$gen"' EXIT
"$venv/bin/python" -m grpc_tools.protoc -I "$root/proto" --python_out="$gen" --grpc_python_out="$gen" \
  offload/v1/compute.proto google/rpc/status.proto
PYTHONPATH="$gen" "$venv/bin/python" "$here/check_sha256.py" "$@"
