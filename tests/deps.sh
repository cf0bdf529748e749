#!/usr/bin/env bash
# Installs the pinned parts of the demo/test stack into .deps/ (git-ignored). Idempotent: each
# part is reinstalled only when its pin changes.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
deps="$root/.deps"
mkdir -p "$deps"

idp_version=7.2.1

py_stamp="$deps/venv/.stamp"
py_want=$(sha256sum "$root/tests/requirements.txt" | cut -d' ' -f1)
if [ "$(cat "$py_stamp" 2>/dev/null)" != "$py_want" ]; then
  echo "deps: Python venv (Envoy 1.40.0, httpbin, gunicorn, pytest) -> .deps/venv"
  python3 -m venv "$deps/venv"
  "$deps/venv/bin/pip" install --quiet --disable-pip-version-check -r "$root/tests/requirements.txt"
  echo "$py_want" > "$py_stamp"
fi

idp_stamp="$deps/idp/.stamp"
if [ "$(cat "$idp_stamp" 2>/dev/null)" != "$idp_version" ]; then
  echo "deps: oauth2-mock-server@$idp_version -> .deps/idp"
  mkdir -p "$deps/idp"
  npm install --silent --no-audit --no-fund --prefix "$deps/idp" "oauth2-mock-server@$idp_version"
  echo "$idp_version" > "$idp_stamp"
fi

"$deps/venv/bin/envoy" --version | grep -q '/1.40.0/' || { echo "deps: wrong Envoy version" >&2; exit 1; }
