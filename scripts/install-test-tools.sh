#!/usr/bin/env bash
# Installs the real servers the observability tests run against: Prometheus and promtool
# (Debian's `prometheus` package). Does nothing when they are already there.
set -euo pipefail
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "prometheus and promtool are needed by the tests; install them with your package manager" >&2
  exit 1
fi
sudo=""
[[ $(id -u) -eq 0 ]] || sudo="sudo"
echo "==> installing prometheus and promtool (Debian package) for the observability tests"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
