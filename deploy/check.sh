#!/usr/bin/env bash
# Checks the deploy files without a container engine: the compose file
# parses (Debian's docker-compose), the Kubernetes manifests validate
# strictly against the Kubernetes schemas, and the files agree with each
# other (check.py). Installs what it needs into target/deploy-venv.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/.." && pwd)
venv=$("$root/scripts/venv.sh" "$root/target/deploy-venv" "$here/requirements.txt")
if ! command -v docker-compose >/dev/null 2>&1; then
  (apt-get update -qq && apt-get install -y -qq docker-compose >/dev/null) || true
fi
docker-compose -f "$here/docker-compose.yml" config -q
echo "compose file: ok"
"$venv/bin/kubernetes-validate" --strict "$here"/k8s/*.yaml
"$venv/bin/python" "$here/check.py"
# Prometheus's own checker on the config and the alert rules (Debian's
# prometheus package brings promtool; tests/e2e/observability.rs runs the
# rules and the dashboard's queries against a live Prometheus).
if ! command -v promtool >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
fi
promtool check config "$here/prometheus/prometheus.yml"
promtool check rules "$here/prometheus/alerts.yml"
