#!/usr/bin/env bash
# Install the system packages the test suite runs for real: the CNCF Distribution
# registry (the upstream), skopeo, podman and containerd (real clients), and Prometheus with
# promtool (the dashboard's queries and the alert rules are checked against them), and
# the shared store's engines: Ceph's RADOS Gateway (S3) and Redis, plus curl (the
# harness signs S3 requests with it), and nginx (bench/compare/'s third reference: it
# starts its own nginx with its own config; the package's service stays stopped), and
# chromium with its chromedriver (the status page's browser test; Debian builds both from
# one source, so their versions always match).
# kubectl is not a Debian 12 package: `make kubectl` fetches it (scripts/fetch_kubectl.py).
# Idempotent and quick when everything is present; needs root (or sudo) only when
# something is missing.
set -euo pipefail

need=()
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v skopeo >/dev/null || need+=(skopeo)
command -v podman >/dev/null || need+=(podman)
command -v containerd >/dev/null && command -v ctr >/dev/null || need+=(containerd)
command -v prometheus >/dev/null && command -v promtool >/dev/null || need+=(prometheus)
command -v radosgw >/dev/null || need+=(radosgw)
command -v ceph-mon >/dev/null || need+=(ceph-mon)
command -v ceph-osd >/dev/null || need+=(ceph-osd)
command -v ceph >/dev/null && command -v ceph-authtool >/dev/null || need+=(ceph-common)
command -v redis-server >/dev/null || need+=(redis-server)
command -v curl >/dev/null || need+=(curl)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null; then SUDO="sudo"; else
    echo "missing ${need[*]}: run as root or install them with apt-get" >&2
    exit 1
  fi
fi

echo "installing system packages: ${need[*]}"
# Package scripts may try to start services (docker-registry would take port 5000):
# a policy-rc.d that answers 101 forbids that during the install.
created_policy=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  $SUDO chmod +x /usr/sbin/policy-rc.d
  created_policy=1
fi
trap '[ -n "$created_policy" ] && $SUDO rm -f /usr/sbin/policy-rc.d' EXIT
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
