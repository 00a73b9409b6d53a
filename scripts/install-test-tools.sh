#!/usr/bin/env bash
# Installs the real servers the tests run against: Prometheus and promtool (Debian's `prometheus`
# package) for the observability tests, nginx for the front-proxy tests. Does nothing when they are
# already there.
set -euo pipefail
if command -v prometheus >/dev/null && command -v promtool >/dev/null && [[ -x /usr/sbin/nginx ]]; then
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "prometheus, promtool and nginx are needed by the tests; install them with your package manager" >&2
  exit 1
fi
sudo=""
[[ $(id -u) -eq 0 ]] || sudo="sudo"
echo "==> installing prometheus, promtool and nginx (Debian packages) for the tests"
$sudo apt-get update -qq
# The tests start their own nginx on a test port; the package's own service is not wanted.
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
  echo 'exit 101' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
  $sudo chmod +x /usr/sbin/policy-rc.d
  trap '$sudo rm -f /usr/sbin/policy-rc.d' EXIT
fi
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends prometheus nginx >/dev/null
