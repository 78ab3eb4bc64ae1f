#!/usr/bin/env bash
# Installs what deploy/check.sh needs, on Debian bookworm, as root. Idempotent: a second run
# finds everything in place and changes nothing.
#
#   promtool           Debian package `prometheus` (also brings /usr/bin/prometheus, which the
#                      dashboard-query integration test can run); installed without recommends
#                      (no node exporter) and WITHOUT starting the prometheus service, which
#                      would otherwise listen on :9090, wskeep's admin port in tests
#   openssl            Debian package, for the throwaway certificate of `wskeep check`
#   kubernetes-validate, pyyaml, dockerfile   from PyPI, for the python3 that check.sh runs
#
# kubectl is not installed: Debian's kubernetes-client (1.20) is too old for this kustomization.
# check.sh renders with deploy/tools/mini_kustomize.py and compares with `kubectl kustomize`
# only where a recent kubectl is already present.
set -euo pipefail

PYTHON=${PYTHON:-python3}
PY_PACKAGES=("kubernetes-validate==1.37.0" "pyyaml>=6" "dockerfile==3.4.0")

need_apt=()
command -v promtool >/dev/null || need_apt+=(prometheus)
command -v openssl >/dev/null || need_apt+=(openssl)
"$PYTHON" -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)

if ((${#need_apt[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  # Keep maintainer scripts from starting services (the prometheus package starts its daemon on
  # :9090 otherwise). Use our own policy-rc.d only if none is in place, and remove it afterwards.
  policy=/usr/sbin/policy-rc.d
  own_policy=
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\n# deploy/ci-install.sh: no service starts during its install\nexit 101\n' > "$policy"
    chmod 0755 "$policy"
    own_policy=1
  fi
  before=$(pgrep -x prometheus || true)
  status=0
  apt-get install -y -q --no-install-recommends "${need_apt[@]}" || status=$?
  [[ -n $own_policy ]] && rm -f "$policy"
  ((status == 0)) || exit "$status"
  # Belt and braces: if the install started a prometheus daemon anyway (say, on a system where
  # policy-rc.d is ignored), stop that one, by pid, and leave any that ran before alone.
  for pid in $(pgrep -x prometheus || true); do
    if ! grep -qx "$pid" <<<"$before"; then
      echo "ci-install: stopping the prometheus daemon (pid $pid) that the package started"
      if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
        systemctl stop prometheus || true
        systemctl disable prometheus 2>/dev/null || true
      fi
      kill "$pid" 2>/dev/null || true
    fi
  done
fi

if ! "$PYTHON" -c 'import yaml, kubernetes_validate, dockerfile' 2>/dev/null; then
  # A pip that refuses to touch a distribution's Python (PEP 668) gets --break-system-packages.
  "$PYTHON" -m pip install -q --disable-pip-version-check "${PY_PACKAGES[@]}" \
    || "$PYTHON" -m pip install -q --disable-pip-version-check --break-system-packages "${PY_PACKAGES[@]}"
fi

promtool --version 2>&1 | head -n 1
"$PYTHON" -c 'import kubernetes_validate.version as v; print("kubernetes-validate", v.__version__)'
