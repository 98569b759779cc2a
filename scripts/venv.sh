#!/usr/bin/env bash
# Makes (once per requirements file) a Python venv with pinned packages and
# prints its directory. Usage: scripts/venv.sh VENV_DIR REQUIREMENTS_FILE
set -euo pipefail
venv=$1
requirements=$2
if ! cmp -s "$requirements" "$venv/.requirements" 2>/dev/null; then
  rm -rf "$venv"
  python3 -m venv "$venv" >&2
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements" >&2
  cp "$requirements" "$venv/.requirements"
fi
echo "$venv"
