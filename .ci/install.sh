#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian machine (as root). Idempotent.
#   chromium              the real browser of tests/browser.rs, tests/browser_http2.rs and tests/pages.rs
#   nodejs, npm,          tests/pages.rs drives Chromium through the admin pages with
#   playwright-core (npm) playwright-core, installed from tests/pages/package-lock.json;
#                         tests/js_client.rs runs the resume shim's tests (clients/js) on node
#                         (>= 20.10: its WebSocket) and its proof on Chromium
#   prometheus, promtool  tests/metrics.rs (a real Prometheus scraping wskeep) and deploy/check.sh
#   kosoku (PyPI)         the Autobahn|Testsuite cases, tests/conformance/run.sh
#   kubernetes-validate   deploy/check.sh
#   kubectl (PyPI)        deploy/check.sh renders deploy/kubernetes with `kubectl kustomize`
#   iproute2, iptables,   tests/network_faults.rs: network namespaces, veth pairs, NFQUEUE and
#   python3, setpriv      its delay-and-loss script tests/network_faults/netem.py
#   haproxy, nginx        tests/networks.rs: the real L4 balancers in front (send-proxy-v2,
#                         the stream module's proxy_protocol)
#   websockets (PyPI)     tests/networks.rs: the upstream on a Unix socket (tests/networks/install.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

bash deploy/ci-install.sh
if ! command -v chromium >/dev/null; then
  apt-get update -q
  apt-get install -y -q --no-install-recommends chromium
fi
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
  apt-get update -q
  apt-get install -y -q --no-install-recommends nodejs npm
fi
(cd tests/pages && npm ci --no-audit --no-fund --loglevel=error)
bash tests/conformance/install.sh >/dev/null
bash tests/networks/install.sh
if ! command -v ip >/dev/null || ! command -v iptables >/dev/null || ! command -v python3 >/dev/null \
  || ! command -v setpriv >/dev/null; then
  apt-get update -q
  apt-get install -y -q --no-install-recommends iproute2 iptables python3 util-linux
fi
if ! command -v haproxy >/dev/null || ! command -v nginx >/dev/null \
  || [ ! -e /usr/lib/nginx/modules/ngx_stream_module.so ]; then
  apt-get update -q
  apt-get install -y -q --no-install-recommends haproxy nginx libnginx-mod-stream
fi
command -v chromium node promtool prometheus ip iptables python3 setpriv haproxy nginx
