#!/usr/bin/env python3
"""The checks behind deploy/check.sh (run that; it also runs promtool and `kubectl kustomize`).

Subcommands (paths are relative to the repository root, the current directory):
  manifests RENDERED OUTDIR  schemas (kubernetes-validate) and the wiring the product relies on;
                             writes OUTDIR/wskeep.rules.yaml from the PrometheusRule
  alerts                     labels, annotations, runbook anchors, one firing and one quiet
                             unit test per alert, metric names and labels used
  dashboard OUTDIR           the Grafana dashboard's structure, dashboard_queries.txt, and
                             OUTDIR/dashboard_rules.yaml + OUTDIR/dashboard_test.yaml for promtool
  dockerfile                 deploy/Dockerfile parses (Docker's own parser) and builds what the
                             manifests run
  unit UNIT [CONFIG]         the systemd unit's hardening and the timings and limits it must
                             agree with: CONFIG is `wskeep check`'s effective configuration
                             (default: deploy/debian/wskeep.toml over the defaults)
  placeholders               no example domain in what operators apply or read (deploy/,
                             config/, docs/, README.md, Cargo.toml)
  rules-file                 print deploy/prometheus/wskeep.rules.yaml as it should be
  dashboard-queries          print deploy/dashboard_queries.txt as it should be
"""

import json
import os
import re
import sys
import tomllib

import yaml

DEPLOY = "deploy"
KUSTOMIZE_DIR = f"{DEPLOY}/kubernetes"
PROMETHEUS_RULE = f"{KUSTOMIZE_DIR}/prometheusrule.yaml"
RULES_FILE = f"{DEPLOY}/prometheus/wskeep.rules.yaml"
ALERTS_TEST = f"{DEPLOY}/prometheus/alerts_test.yaml"
DASHBOARD_SERIES = f"{DEPLOY}/prometheus/dashboard_series.yaml"
DASHBOARD = f"{DEPLOY}/grafana/wskeep-dashboard.json"
DASHBOARD_QUERIES = f"{DEPLOY}/dashboard_queries.txt"
RUNBOOKS = "docs/runbooks.md"
README = "README.md"
DESIGN = "../shared/DESIGN.md"
DOCKERFILE = f"{DEPLOY}/Dockerfile"
SYSTEMD_UNIT = f"{DEPLOY}/systemd/wskeep.service"
VM_CONFIG = f"{DEPLOY}/debian/wskeep.toml"
DOCKERIGNORE = f"{DEPLOY}/Dockerfile.dockerignore"

# Kubernetes versions the core objects must validate against: native sidecars (an init container
# with restartPolicy: Always) are on by default from 1.29.
K8S_VERSIONS = ["1.29.0", "1.37.0"]
CORE_KINDS = {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "Ingress"}

# Each alert's `runbook` annotation names its section in docs/runbooks.md, a path in this
# repository (shipped in the .deb too): no URL pretends the docs are hosted somewhere.
RUNBOOK_PREFIX = f"{RUNBOOKS}#"
SEVERITIES = {"critical", "warning", "info"}

# The metrics contract (DESIGN.md, "Metrics"): name -> (type, {label: allowed values or None}).
END = {"client_close", "upstream_close", "client_timeout", "client_error",
       "upstream_timeout", "upstream_error", "shutdown"}
SIDE = {"client", "upstream"}
METRICS = {
    "wskeep_connections_active": ("gauge", {}),
    "wskeep_connections_total": ("counter", {}),
    "wskeep_upgrade_failures_total": ("counter", {"reason": {
        "upstream_refused", "upstream_unreachable", "upstream_timeout", "upstream_bad_handshake", "upstream_tls",
        "bad_request", "limit", "handshake_limit", "local_limit", "draining"}}),
    "wskeep_proxy_protocol_failures_total": ("counter", {"reason": {"untrusted", "malformed", "timeout"}}),
    "wskeep_connection_duration_seconds": ("histogram", {"end": END}),
    "wskeep_close_codes_total": ("counter", {
        "side": SIDE, "direction": {"received", "sent"},
        "code": {str(c) for c in range(1000, 1016)} | {"3xxx", "4xxx", "other"}}),
    "wskeep_messages_total": ("counter", {"direction": {"client_to_upstream", "upstream_to_client"}}),
    "wskeep_message_bytes_total": ("counter", {"direction": {"client_to_upstream", "upstream_to_client"}}),
    "wskeep_pings_sent_total": ("counter", {"side": SIDE}),
    "wskeep_pongs_received_total": ("counter", {"side": SIDE}),
    "wskeep_pings_answered_total": ("counter", {"side": SIDE}),
    "wskeep_json_pings_answered_total": ("counter", {}),
    "wskeep_compressed_connections_total": ("counter", {}),
    "wskeep_resume_sessions_detached": ("gauge", {}),
    "wskeep_resume_sessions_detached_total": ("counter", {}),
    "wskeep_resume_sessions_resumed_total": ("counter", {}),
    "wskeep_resume_failures_total": ("counter", {"reason": {
        "expired", "overflow", "bad_token", "credential_mismatch", "upstream_gone", "bad_count"}}),
    "wskeep_ping_rtt_seconds": ("histogram", {"side": SIDE}),
    "wskeep_upstream_connect_seconds": ("histogram", {}),
    "wskeep_http_requests_total": ("counter", {"code": None}),
    "wskeep_tls_handshake_failures_total": ("counter", {}),
    "wskeep_tls_cert_reloads_total": ("counter", {}),
    "wskeep_tls_cert_not_after_timestamp_seconds": ("gauge", {}),
    "wskeep_build_info": ("gauge", {"version": None}),
    # The standard process collector (prometheus crate, Linux).
    "process_cpu_seconds_total": ("counter", {}),
    "process_open_fds": ("gauge", {}),
    "process_max_fds": ("gauge", {}),
    "process_resident_memory_bytes": ("gauge", {}),
    "process_virtual_memory_bytes": ("gauge", {}),
    "process_start_time_seconds": ("gauge", {}),
    "process_threads": ("gauge", {}),
    # Prometheus's own per-target series.
    "up": ("gauge", {}),
}
# Labels Prometheus attaches to every scraped series (static config; Prometheus Operator).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "endpoint", "service"}

# Configuration keys wskeep accepts (DESIGN.md, "Configuration"); unknown keys are errors there.
CONFIG_KEYS = {
    "listen": {"addr", "tls_cert", "tls_key", "handshake_timeout", "first_byte_timeout", "idle_timeout",
               "max_connections", "max_handshakes", "probe_path"},
    "upstream": {"url", "connect_timeout", "response_timeout"},
    "client_keepalive": {"ping_interval", "timeout"},
    "upstream_keepalive": {"ping_interval", "pong_interval", "timeout"},
    "json_ping": {"enabled", "match", "reply", "echo_fields", "forward"},
    "limits": {"max_message_size"},
    "compression": {"enabled"},
    "resume": {"enabled", "grace", "buffer", "bind"},
    "admin": {"addr"},
    "shutdown": {"drain_timeout"},
    "log": {"format", "level"},
}
CLOSE_BOUND_SECONDS = 2  # every close frame and closing handshake is bounded by 2 s


class Failures:
    def __init__(self, what):
        self.what = what
        self.items = []

    def check(self, cond, message):
        if not cond:
            self.items.append(message)
        return cond

    def finish(self):
        if self.items:
            print(f"FAIL: {self.what}: {len(self.items)} problem(s):", file=sys.stderr)
            for item in self.items:
                print(f"  - {item}", file=sys.stderr)
            return 1
        return 0


def load_yaml_docs(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def dump_yaml(obj, path):
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(obj, f, sort_keys=False, default_flow_style=False, width=1000)


def seconds(duration):
    """A humantime duration string as wskeep's config uses ("25s", "1m30s", "250ms")."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)", duration)
    if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)|\s", "", duration):
        raise ValueError(f"not a duration: {duration!r}")
    return sum(float(n) * units[u] for n, u in parts)


def port_of(addr):
    return int(addr.rsplit(":", 1)[1])


# --- manifests -------------------------------------------------------------------------------

def probe_port(container, port):
    if isinstance(port, int):
        return port
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return p["containerPort"]
    return None


def container_port(container, name):
    return probe_port(container, name)


def cmd_manifests(rendered, outdir):
    import kubernetes_validate

    f = Failures("Kubernetes manifests")
    docs = load_yaml_docs(rendered)
    kinds = {}
    for d in docs:
        kinds.setdefault(d["kind"], []).append(d)

    # Schemas, strict: an unknown or misspelt field is an error.
    for d in docs:
        if d["kind"] not in CORE_KINDS:
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(d, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = "/".join(str(p) for p in e.path)
                f.check(False, f"{d['kind']}/{d['metadata']['name']} (Kubernetes {version}): {path}: {e.message}")
            except Exception as e:  # SchemaNotFoundError and friends carry .message
                f.check(False, f"{d['kind']}/{d['metadata']['name']} (Kubernetes {version}): {getattr(e, 'message', e)}")
    for kind in ("Deployment", "Service", "ConfigMap", "PodDisruptionBudget", "PodMonitor", "PrometheusRule", "Ingress"):
        f.check(len(kinds.get(kind, [])) == 1, f"expected exactly one {kind}, found {len(kinds.get(kind, []))}")
    f.check(not kinds.get("Secret"), "no Secret belongs in deploy/kubernetes (wskeep-tls is created by the operator)")
    if f.items:
        return f.finish()

    dep = kinds["Deployment"][0]
    svc = kinds["Service"][0]
    cm = kinds["ConfigMap"][0]
    pdb = kinds["PodDisruptionBudget"][0]
    pm = kinds["PodMonitor"][0]
    pr = kinds["PrometheusRule"][0]
    pod = dep["spec"]["template"]["spec"]
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]

    # Configuration: a generated ConfigMap whose name carries a hash of its content, so that a
    # changed wskeep.toml rolls the pods.
    f.check(re.fullmatch(r"wskeep-config-[a-z0-9]{10}", cm["metadata"]["name"]),
            f"ConfigMap {cm['metadata']['name']}: expected the generated wskeep-config-<hash>")
    toml_text = cm.get("data", {}).get("wskeep.toml")
    f.check(toml_text is not None, f"ConfigMap {cm['metadata']['name']} has no wskeep.toml")
    try:
        cfg = tomllib.loads(toml_text or "")
    except tomllib.TOMLDecodeError as e:
        f.check(False, f"wskeep.toml: {e}")
        cfg = {}
    for section, table in cfg.items():
        if not f.check(section in CONFIG_KEYS and isinstance(table, dict), f"wskeep.toml: unknown section [{section}]"):
            continue
        for key in table:
            f.check(key in CONFIG_KEYS[section], f"wskeep.toml: unknown key {section}.{key}")
    listen = cfg.get("listen", {})
    listen_port = port_of(listen.get("addr", "0.0.0.0:8443"))
    admin_port = port_of(cfg.get("admin", {}).get("addr", "0.0.0.0:9090"))
    upstream_url = cfg.get("upstream", {}).get("url", "ws://127.0.0.1:8080")
    f.check(upstream_url == "ws://127.0.0.1:8080", f"upstream.url is {upstream_url}, expected ws://127.0.0.1:8080")
    drain = seconds(cfg.get("shutdown", {}).get("drain_timeout", "25s"))
    f.check(listen.get("tls_cert") == "/etc/wskeep/tls/tls.crt", "listen.tls_cert must be /etc/wskeep/tls/tls.crt")
    f.check(listen.get("tls_key") == "/etc/wskeep/tls/tls.key", "listen.tls_key must be /etc/wskeep/tls/tls.key")
    for leg in ("client_keepalive", "upstream_keepalive"):
        ka = cfg.get(leg, {})
        if ka.get("timeout") and ka.get("ping_interval"):
            t, p = seconds(ka["timeout"]), seconds(ka["ping_interval"])
            f.check(t == 0 or p == 0 or t > p, f"{leg}.timeout must be longer than {leg}.ping_interval")

    # The sidecar.
    sidecars = [c for c in pod.get("initContainers") or [] if c["name"] == "wskeep"]
    if not f.check(len(sidecars) == 1, "the pod needs one init container named wskeep"):
        return f.finish()
    ws = sidecars[0]
    f.check(ws.get("restartPolicy") == "Always", "wskeep must be a native sidecar (restartPolicy: Always)")
    args = ws.get("args") or []
    f.check(args[-2:] == ["--config", "/etc/wskeep/wskeep.toml"], "wskeep's args must end with --config /etc/wskeep/wskeep.toml")
    f.check(container_port(ws, "wss") == listen_port, f"wskeep's port wss must be listen.addr's port {listen_port}")
    f.check(container_port(ws, "admin") == admin_port, f"wskeep's port admin must be admin.addr's port {admin_port}")
    for probe, path in (("startupProbe", None), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        p = ws.get(probe)
        if not f.check(p and "httpGet" in p, f"wskeep needs an httpGet {probe}"):
            continue
        f.check(probe_port(ws, p["httpGet"]["port"]) == admin_port, f"wskeep's {probe} must use the admin port {admin_port}")
        if path:
            f.check(p["httpGet"]["path"] == path, f"wskeep's {probe} must get {path}")
        else:
            f.check(p["httpGet"]["path"] in ("/healthz", "/readyz"), f"wskeep's {probe} must get /healthz")
    res = ws.get("resources", {})
    for part in ("requests", "limits"):
        for what in ("cpu", "memory"):
            f.check(what in res.get(part, {}), f"wskeep needs resources.{part}.{what}")
    sc = ws.get("securityContext", {})
    f.check(sc.get("runAsNonRoot") is True, "wskeep: securityContext.runAsNonRoot must be true")
    f.check(sc.get("runAsUser") == 65532, "wskeep: securityContext.runAsUser must be 65532 (distroless nonroot)")
    f.check(sc.get("readOnlyRootFilesystem") is True, "wskeep: securityContext.readOnlyRootFilesystem must be true")
    f.check(sc.get("allowPrivilegeEscalation") is False, "wskeep: securityContext.allowPrivilegeEscalation must be false")
    f.check(sc.get("capabilities", {}).get("drop") == ["ALL"], "wskeep: securityContext.capabilities.drop must be [ALL]")
    seccomp = sc.get("seccompProfile") or pod.get("securityContext", {}).get("seccompProfile") or {}
    f.check(seccomp.get("type") == "RuntimeDefault", "wskeep: seccompProfile must be RuntimeDefault")

    # Files: /etc/wskeep/wskeep.toml from the generated ConfigMap, tls/ from the Secret wskeep-tls.
    mounts = {m["mountPath"]: m for m in ws.get("volumeMounts") or []}
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    files = {}  # path in the container -> (kind, object name, key)
    for path, m in mounts.items():
        v = volumes.get(m["name"], {})
        f.check(m.get("readOnly") is True, f"wskeep's mount {path} must be readOnly")
        sources = []
        if "configMap" in v:
            sources.append(("ConfigMap", v["configMap"]))
        if "secret" in v:
            sources.append(("Secret", {"name": v["secret"]["secretName"], "items": v["secret"].get("items")}))
        for s in (v.get("projected") or {}).get("sources") or []:
            if "configMap" in s:
                sources.append(("ConfigMap", s["configMap"]))
            if "secret" in s:
                sources.append(("Secret", s["secret"]))
        for kind, src in sources:
            f.check(src.get("items"), f"volume {m['name']}: list the items of {kind} {src['name']}")
            for item in src.get("items") or []:
                files[f"{path.rstrip('/')}/{item['path']}"] = (kind, src["name"], item["key"])
    f.check(files.get("/etc/wskeep/wskeep.toml") == ("ConfigMap", cm["metadata"]["name"], "wskeep.toml"),
            f"/etc/wskeep/wskeep.toml must come from the generated ConfigMap {cm['metadata']['name']}")
    f.check(files.get("/etc/wskeep/tls/tls.crt") == ("Secret", "wskeep-tls", "tls.crt"),
            "/etc/wskeep/tls/tls.crt must come from Secret wskeep-tls, key tls.crt")
    f.check(files.get("/etc/wskeep/tls/tls.key") == ("Secret", "wskeep-tls", "tls.key"),
            "/etc/wskeep/tls/tls.key must come from Secret wskeep-tls, key tls.key")

    # The orchestrator and shutdown.
    mains = pod.get("containers") or []
    f.check(len(mains) == 1, "the pod needs exactly one main container (the orchestrator)")
    orch = mains[0]
    m = re.fullmatch(r"ws://[^/]+:(\d+)/?", upstream_url)
    f.check(m and container_port(orch, "http") == int(m.group(1)), "the orchestrator's port http must be upstream.url's port")
    hook = (orch.get("lifecycle") or {}).get("preStop", {}).get("httpGet", {})
    f.check(hook.get("path") == "/drain?wait=true", "the orchestrator's preStop must httpGet /drain?wait=true")
    f.check(hook.get("port") == admin_port, f"the orchestrator's preStop must use port {admin_port} (a number)")
    grace = pod.get("terminationGracePeriodSeconds", 30)
    f.check(grace >= drain + CLOSE_BOUND_SECONDS + 5,
            f"terminationGracePeriodSeconds ({grace}) must exceed shutdown.drain_timeout ({drain:g}s) "
            f"+ the {CLOSE_BOUND_SECONDS}s close bound + 5s for the orchestrator's own exit")

    # The Service: the TLS port only, never the admin port.
    sel = svc["spec"].get("selector", {})
    f.check(sel and all(pod_labels.get(k) == v for k, v in sel.items()), "the Service's selector must match the pod")
    ports = svc["spec"].get("ports", [])
    f.check([(p["port"], p.get("targetPort")) for p in ports] == [(443, listen_port)],
            f"the Service must expose exactly 443 -> {listen_port}")
    f.check(all(p.get("targetPort") not in (admin_port, "admin") for p in ports), "the admin port must not be in the Service")

    # The Ingress: to the Service's TLS port, with the cookie affinity that brings a resuming
    # client back to the pod holding its session, for longer than resume.grace.
    ing = kinds["Ingress"][0]
    notes = ing["metadata"].get("annotations", {})
    backends = [p["backend"]["service"] for r in ing["spec"].get("rules", []) for p in r.get("http", {}).get("paths", [])]
    f.check(backends and all(b["name"] == svc["metadata"]["name"] and b["port"] in ({"name": "wss"}, {"number": 443})
                             for b in backends), "the Ingress must send every path to the Service's wss port")
    f.check(notes.get("nginx.ingress.kubernetes.io/backend-protocol") == "HTTPS",
            "the Ingress must speak HTTPS to wskeep's TLS port (backend-protocol)")
    f.check(notes.get("nginx.ingress.kubernetes.io/affinity") == "cookie"
            and notes.get("nginx.ingress.kubernetes.io/affinity-mode") == "persistent",
            "the Ingress needs persistent cookie affinity: a resume must reach the pod holding its session")
    resume_grace = seconds(cfg.get("resume", {}).get("grace", "30s"))
    f.check(int(notes.get("nginx.ingress.kubernetes.io/session-cookie-max-age", "0")) > resume_grace,
            "the affinity cookie must outlive resume.grace")
    f.check(int(notes.get("nginx.ingress.kubernetes.io/proxy-read-timeout", "60")) > seconds(
                cfg.get("client_keepalive", {}).get("ping_interval", "20s")),
            "the Ingress's proxy-read-timeout must exceed client_keepalive.ping_interval")

    # PodDisruptionBudget: covers these pods, and lets a node drain evict one at a time.
    psel = pdb["spec"].get("selector", {}).get("matchLabels", {})
    f.check(psel and all(pod_labels.get(k) == v for k, v in psel.items()), "the PodDisruptionBudget's selector must match the pod")
    replicas = dep["spec"].get("replicas", 1)
    budget = pdb["spec"]
    if "maxUnavailable" in budget:
        f.check(budget["maxUnavailable"] not in (0, "0%"), "the PodDisruptionBudget must allow one eviction (maxUnavailable > 0)")
    else:
        f.check(isinstance(budget.get("minAvailable"), int) and budget["minAvailable"] < replicas,
                f"the PodDisruptionBudget's minAvailable must stay below replicas ({replicas}), or no node can drain")

    # PodMonitor: the admin port by name, /metrics.
    msel = pm["spec"].get("selector", {}).get("matchLabels", {})
    f.check(msel and all(pod_labels.get(k) == v for k, v in msel.items()), "the PodMonitor's selector must match the pod")
    eps = pm["spec"].get("podMetricsEndpoints", [])
    f.check([(e.get("port"), e.get("path", "/metrics")) for e in eps] == [("admin", "/metrics")],
            "the PodMonitor must scrape port admin, path /metrics")
    f.check("wskeep" in pm["metadata"]["name"], "the PodMonitor's name must contain wskeep (WskeepDown matches job=~\".*wskeep.*\")")

    # PrometheusRule -> a plain rules file for promtool, and the committed copy must agree.
    groups = {"groups": pr["spec"]["groups"]}
    dump_yaml(groups, os.path.join(outdir, "wskeep.rules.yaml"))
    with open(RULES_FILE, encoding="utf-8") as fh:
        committed = yaml.safe_load(fh)
    f.check(committed == groups,
            f"{RULES_FILE} differs from the PrometheusRule in {PROMETHEUS_RULE}: regenerate it with "
            f"`python3 deploy/tools/deploycheck.py rules-file > {RULES_FILE}`")
    return f.finish()


def rules_file_text():
    """The PrometheusRule's spec block, dedented, under a header: the plain rules file."""
    with open(PROMETHEUS_RULE, encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    start = lines.index("spec:") + 1
    body = []
    for line in lines[start:]:
        if line and not line.startswith("  "):
            break
        body.append(line[2:])
    header = [
        "# wskeep alerts as a plain Prometheus rules file (rule_files: in prometheus.yml), for wskeep",
        "# outside Kubernetes. Generated from deploy/kubernetes/prometheusrule.yaml, the source:",
        "#   python3 deploy/tools/deploycheck.py rules-file > deploy/prometheus/wskeep.rules.yaml",
        "# WskeepDown finds wskeep's targets by job name: name the scrape job \"wskeep\".",
    ]
    return "\n".join(header + body).rstrip("\n") + "\n"


# --- PromQL, loosely: metric names, labels and label values used ----------------------------

STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"')
SELECTOR_RE = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
MATCHER_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
GROUPING_RE = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
WORD_RE = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()")
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
            "bool", "offset", "inf", "nan", "Inf", "NaN", "le", "atan2"}


def base_metric(name):
    if name in METRICS:
        return name
    for suffix in ("_bucket", "_sum", "_count"):
        if name.endswith(suffix) and METRICS.get(name[: -len(suffix)], ("",))[0] == "histogram":
            return name[: -len(suffix)]
    return None


def check_promql(f, where, expr, extra_labels=()):
    """Metric names must be in the contract; label names and enumerated values must exist."""
    without_strings = STRING_RE.sub('""', expr)
    # Drop durations like [5m] and label lists, then what is left that looks like a name and is
    # not a function call is a metric name.
    scan = re.sub(r"\[[^\]]*\]", " ", without_strings)
    scan = GROUPING_RE.sub(" ", scan)
    scan = re.sub(r"\{[^}]*\}", " ", scan)
    used = set()
    for word in WORD_RE.findall(scan):
        if word in KEYWORDS or re.fullmatch(r"\d.*", word):
            continue
        base = base_metric(word)
        if f.check(base, f"{where}: unknown metric {word}"):
            used.add((word, base))
    allowed = set(TARGET_LABELS) | set(extra_labels)
    for word, base in used:
        allowed |= set(METRICS[base][1])
        if word.endswith("_bucket"):
            allowed.add("le")
    for name, body in SELECTOR_RE.findall(expr):
        base = base_metric(name)
        if not base:
            continue
        labels = METRICS[base][1]
        for label, op, value in MATCHER_RE.findall(body):
            ok_names = set(labels) | TARGET_LABELS | ({"le"} if name.endswith("_bucket") else set())
            if not f.check(label in ok_names, f"{where}: {name} has no label {label}"):
                continue
            values = labels.get(label)
            if values is None or "$" in value:
                continue
            alternatives = value.split("|") if op in ("=~", "!~") else [value]
            for alt in alternatives:
                if re.fullmatch(r"[A-Za-z0-9_]+", alt):
                    f.check(alt in values, f"{where}: {name}{{{label}}} never has the value {alt!r}")
    for _, labels in GROUPING_RE.findall(without_strings):
        for label in (x.strip() for x in labels.split(",")):
            if label:
                f.check(label in allowed, f"{where}: grouping label {label} is on none of the metrics used")
    return allowed


# --- alerts ----------------------------------------------------------------------------------

def github_slug(heading):
    slug = heading.strip().lower()
    slug = re.sub(r"[^\w\- ]", "", slug)
    return slug.replace(" ", "-")


def markdown_anchors(path):
    anchors = set()
    in_code = False
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("```"):
                in_code = not in_code
            m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
            if m and not in_code:
                anchors.add(github_slug(m.group(1)))
    return anchors


LINK_RE = re.compile(r"\]\(([^)\s]+)\)")


def check_doc_links(f):
    """Links between README.md and docs/*.md point at files and headings that exist."""
    docs = [README] + sorted(os.path.join("docs", n) for n in os.listdir("docs") if n.endswith(".md"))
    for doc in docs:
        with open(doc, encoding="utf-8") as fh:
            text = re.sub(r"```.*?```", "", fh.read(), flags=re.S)
        for target in LINK_RE.findall(text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            path = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
            if not f.check(os.path.exists(path), f"{doc}: link {target}: no file {path}"):
                continue
            if anchor and path.endswith(".md"):
                f.check(anchor in markdown_anchors(path), f"{doc}: link {target}: {path} has no heading #{anchor}")


def cmd_alerts():
    f = Failures("alerts")
    with open(RULES_FILE, encoding="utf-8") as fh:
        groups = yaml.safe_load(fh)["groups"]
    doc = RUNBOOKS
    anchors = markdown_anchors(doc)
    alerts = []
    for g in groups:
        for r in g["rules"]:
            if "alert" not in r:
                check_promql(f, f"recording rule {r.get('record')}", r["expr"])
                continue
            name = r["alert"]
            alerts.append(name)
            where = f"alert {name}"
            f.check(re.fullmatch(r"Wskeep[A-Za-z]+", name), f"{where}: alert names start with Wskeep")
            f.check(r.get("labels", {}).get("severity") in SEVERITIES, f"{where}: severity label must be one of {sorted(SEVERITIES)}")
            ann = r.get("annotations", {})
            for key in ("summary", "description", "runbook"):
                f.check(ann.get(key), f"{where}: needs a {key} annotation")
            expected = RUNBOOK_PREFIX + "alert-" + name.lower()
            f.check(ann.get("runbook") == expected, f"{where}: runbook must be {expected}")
            f.check("alert-" + name.lower() in anchors, f"{where}: {doc} has no heading 'Alert: {name}' (anchor #alert-{name.lower()})")
            if name == "WskeepDown":
                f.check(re.search(r'up\{job=~"\.\*wskeep\.\*"\}', r["expr"]), f"{where}: must match up{{job=~\".*wskeep.*\"}}")
            else:
                f.check(not re.search(r"\bjob\s*(=|=~|!=|!~)", r["expr"]), f"{where}: must not depend on the job's name")
            labels = check_promql(f, where, r["expr"])
            for text in list(ann.values()) + [r.get("labels", {}).get("severity", "")]:
                for used in re.findall(r"\$labels\.([a-zA-Z_][a-zA-Z0-9_]*)", text):
                    f.check(used in labels, f"{where}: annotation uses $labels.{used}, which the alert does not have")
    f.check(len(alerts) == len(set(alerts)), "alert names must be unique")
    check_doc_links(f)
    readme = markdown_anchors(README)
    for section in ("operating", "metrics-and-alerts", "troubleshooting"):
        f.check(section in readme, f"{README} needs the section '{section}' that the runbooks link to")

    # Unit tests: every alert fires in one test case and stays quiet in another.
    with open(ALERTS_TEST, encoding="utf-8") as fh:
        tests = yaml.safe_load(fh)
    f.check(tests.get("rule_files") == ["wskeep.rules.yaml"], f"{ALERTS_TEST}: rule_files must be [wskeep.rules.yaml]")
    fires, quiet = {}, {}
    for t in tests.get("tests") or []:
        for a in t.get("alert_rule_test") or []:
            name = a["alertname"]
            f.check(name in alerts, f"{ALERTS_TEST}: test {t.get('name')!r} is for unknown alert {name}")
            (fires if a.get("exp_alerts") else quiet).setdefault(name, []).append(t.get("name"))
        for s in t.get("input_series") or []:
            check_promql(f, f"{ALERTS_TEST}: test {t.get('name')!r} series", s["series"])
    for name in alerts:
        f.check(name in fires, f"{ALERTS_TEST}: no test case where {name} fires")
        f.check(name in quiet, f"{ALERTS_TEST}: no test case where {name} stays quiet")
    return f.finish()


# --- dashboard -------------------------------------------------------------------------------

def dashboard_targets(dash):
    for p in dash.get("panels", []):
        yield from ((p, t) for t in p.get("targets", []))
        for inner in p.get("panels", []):  # collapsed rows keep their panels inside
            yield from ((inner, t) for t in inner.get("targets", []))


# The dashboard's selectors, each on every wskeep and process series a query reads: on a VM the
# series have no namespace or pod label, and "All" (.*) still matches them.
DASHBOARD_VARIABLES = ["namespace", "job", "pod", "instance"]


def plain_query(expr):
    """A dashboard query as the Rust test runs it: variables gone, $__rate_interval = 1m."""
    q = expr.replace("$__rate_interval", "1m")
    q = re.sub(r'\s*\b(namespace|job|pod|instance)=~"\$(namespace|job|pod|instance)"\s*,?', "", q)
    q = re.sub(r",\s*\}", "}", q)
    q = re.sub(r"\{\s+", "{", q)
    q = q.replace("{}", "")
    q = re.sub(r"\s+", " ", q).strip()
    return q


def all_query(expr):
    """A dashboard query as Grafana sends it with every variable at All."""
    q = expr.replace("$__rate_interval", "1m")
    for var in DASHBOARD_VARIABLES:
        q = q.replace(f"${var}", ".*")
    return re.sub(r"\s+", " ", q).strip()


def dashboard_queries(dash):
    seen = []
    for _, t in dashboard_targets(dash):
        q = plain_query(t.get("expr", ""))
        if q and q not in seen:
            seen.append(q)
    return seen


def cmd_dashboard(outdir):
    f = Failures("dashboard")
    try:
        with open(DASHBOARD, encoding="utf-8") as fh:
            dash = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        f.check(False, f"{DASHBOARD}: {e}")
        return f.finish()
    f.check(isinstance(dash.get("schemaVersion"), int) and dash["schemaVersion"] >= 36, "schemaVersion must be 36 or newer")
    f.check(dash.get("uid") and dash.get("title"), "the dashboard needs a uid and a title")
    variables = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
    for i, name in enumerate(DASHBOARD_VARIABLES):
        v = variables.get(name, {})
        if not f.check(v.get("type") == "query", f"templating needs a query variable `{name}`"):
            continue
        f.check(v.get("includeAll") and v.get("allValue") == ".*" and v.get("multi"),
                f"variable `{name}`: multi-value, with All as .* (series without the label still match)")
        query = v.get("definition", "")
        f.check(re.fullmatch(rf"label_values\(wskeep_build_info(\{{.*\}})?, {name}\)", query),
                f"variable `{name}`: label_values(wskeep_build_info{{...}}, {name})")
        for earlier in DASHBOARD_VARIABLES[:i]:
            f.check(f'{earlier}=~"${earlier}"' in query, f"variable `{name}` must be narrowed by ${earlier}")
    ds = variables.get("datasource", {})
    f.check(ds.get("type") == "datasource" and ds.get("query") == "prometheus",
            "templating needs a variable `datasource` of type datasource, query prometheus")
    ids = [p.get("id") for p in dash.get("panels", [])]
    f.check(len(ids) == len(set(ids)) and None not in ids, "every panel needs a unique id")
    panels = [p for p in dash.get("panels", []) if p.get("type") != "row"]
    for row in (p for p in dash.get("panels", []) if p.get("type") == "row"):
        panels += row.get("panels", [])
    f.check(panels, "the dashboard has no panels")
    for p in panels:
        where = f"panel {p.get('title')!r}"
        f.check(p.get("title") and p.get("gridPos"), f"{where}: needs a title and a gridPos")
        f.check(p.get("datasource", {}).get("uid") == "${datasource}", f"{where}: datasource must be ${{datasource}}")
        targets = p.get("targets") or []
        if not f.check(targets, f"{where}: has no target"):
            continue
        for t in targets:
            f.check(t.get("expr", "").strip(), f"{where}: target {t.get('refId')} has no expr")
            f.check(t.get("datasource", {}).get("uid", "${datasource}") == "${datasource}",
                    f"{where}: target {t.get('refId')} must use ${{datasource}}")
            expr = t.get("expr", "")
            leftover = set(re.findall(r"\$\{?(\w+)", expr)) - {"__rate_interval", *DASHBOARD_VARIABLES}
            f.check(not leftover, f"{where}: unknown variables {sorted(leftover)}")
            for name, body in SELECTOR_RE.findall(expr):
                missing = [v for v in DASHBOARD_VARIABLES if f'{v}=~"${v}"' not in body]
                f.check(not (base_metric(name) and missing), f"{where}: {name} is not narrowed by {missing}")
            legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", t.get("legendFormat", "")))
            labels = check_promql(f, where, expr)
            m = re.match(r"\s*(sum|count|min|max|avg)\s+by\s*\(([^)]*)\)", expr)
            if m:
                labels = {x.strip() for x in m.group(2).split(",")}
            elif re.match(r"\s*(sum|count|min|max|avg)\s*\(", expr):
                labels = set()
            f.check(legend_labels <= labels, f"{where}: legend uses {sorted(legend_labels - labels)}, not in the result")

    queries = dashboard_queries(dash)
    all_queries = list(dict.fromkeys(all_query(t.get("expr", "")) for _, t in dashboard_targets(dash)))
    for q in queries:
        f.check("$" not in q, f"query still has a variable after substitution: {q}")
    with open(DASHBOARD_QUERIES, encoding="utf-8") as fh:
        listed = [line.rstrip("\n") for line in fh if line.strip()]
    f.check(listed == queries,
            f"{DASHBOARD_QUERIES} does not list the dashboard's queries: regenerate it with "
            f"`python3 deploy/tools/deploycheck.py dashboard-queries > {DASHBOARD_QUERIES}`")

    # For promtool: every query as a recording rule (syntax), and a unit test that each returns at
    # least one sample that is not NaN from the series of a wskeep that served traffic.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": q} for i, q in enumerate(queries)]}]}
    dump_yaml(rules, os.path.join(outdir, "dashboard_rules.yaml"))
    with open(DASHBOARD_SERIES, encoding="utf-8") as fh:
        series = yaml.safe_load(fh)
    test = {
        "rule_files": ["dashboard_rules.yaml"],
        "evaluation_interval": "15s",
        "tests": [{
            "interval": series["interval"],
            "input_series": series["input_series"],
            # Each query returns data as the Rust test runs it (no variables) and as Grafana sends
            # it with every variable at All (the series, like a VM's, have no namespace or pod).
            "promql_expr_test": [
                {"expr": f"count(({q}) == ({q})) > bool 0", "eval_time": series["eval_time"],
                 "exp_samples": [{"labels": "{}", "value": 1}]}
                for q in queries + all_queries],
        }],
    }
    dump_yaml(test, os.path.join(outdir, "dashboard_test.yaml"))
    for s in series["input_series"]:
        check_promql(f, f"{DASHBOARD_SERIES}", s["series"])
    return f.finish()


# --- Dockerfile --------------------------------------------------------------------------------

def cmd_dockerfile():
    import dockerfile

    f = Failures(DOCKERFILE)
    try:
        cmds = dockerfile.parse_file(DOCKERFILE)
    except dockerfile.GoParseError as e:
        f.check(False, f"does not parse: {e}")
        return f.finish()
    stages = []
    for c in cmds:
        if c.cmd.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(c)
    if not f.check(len(stages) >= 2, "must be a multi-stage build"):
        return f.finish()
    build = [c for st in stages[:-1] for c in st]
    final = stages[-1]
    base = final[0].value[0]
    f.check(re.fullmatch(r"gcr\.io/distroless/cc-debian\d+:nonroot(@sha256:[0-9a-f]{64})?", base),
            f"the runtime image must be gcr.io/distroless/cc-debian<N>:nonroot, not {base}")
    builder = stages[0][0].value[0]
    m = re.search(r"-(bookworm|trixie)\b", builder)
    debian = {"bookworm": "12", "trixie": "13"}.get(m.group(1)) if m else None
    f.check(debian and f"cc-debian{debian}:" in base,
            f"build image {builder} and runtime {base} must be the same Debian release (glibc)")
    runs = " ".join(" ".join(c.value) for c in build if c.cmd.upper() == "RUN")
    f.check(re.search(r"cargo build (.* )?--release\b", runs) and "--locked" in runs,
            "the build stage must run cargo build --release --locked")
    by_cmd = {}
    for c in final:
        by_cmd.setdefault(c.cmd.upper(), []).append(c)
    f.check(not by_cmd.get("RUN"), "the runtime stage must not RUN anything (distroless: no shell)")
    entry, cmd = by_cmd.get("ENTRYPOINT", [None])[-1], by_cmd.get("CMD", [None])[-1]
    f.check(entry and entry.json and list(entry.value) == ["/wskeep"], 'ENTRYPOINT must be ["/wskeep"] (exec form)')
    f.check(cmd and cmd.json and list(cmd.value) == ["run", "--config", "/etc/wskeep/wskeep.toml"],
            'CMD must be ["run", "--config", "/etc/wskeep/wskeep.toml"] (exec form)')
    user = by_cmd.get("USER", [None])[-1]
    f.check(user and user.value[0].split(":")[0] == "65532", "the runtime stage must set USER 65532")
    exposed = {v for c in by_cmd.get("EXPOSE", []) for v in c.value}
    f.check({"8443", "9090"} <= exposed, "EXPOSE 8443 and 9090")
    # What the build copies out of the repository must be there and not be ignored.
    with open(DOCKERIGNORE, encoding="utf-8") as fh:
        ignored = {line.strip().rstrip("/") for line in fh if line.strip() and not line.startswith("#")}
    for needed in ("Cargo.toml", "Cargo.lock", "src", "config"):
        f.check(needed not in ignored, f"{DOCKERIGNORE} must not exclude {needed}")
    for path in re.findall(r"\binstall\b[^&]*?\s((?:config|src)/\S+)", runs) + ["Cargo.toml", "Cargo.lock", "src/main.rs"]:
        f.check(os.path.exists(path), f"the build uses {path}, which is not in the repository")
    return f.finish()


# --- systemd unit ------------------------------------------------------------------------------

FD_HEADROOM = 64  # what `wskeep check` adds to two descriptors per connection


def unit_directives(path):
    """A unit file as {section: {key: [values]}} (keys repeat; comments and blank lines skipped)."""
    sections, current = {}, None
    with open(path, encoding="utf-8") as fh:
        for raw in fh:
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("[") and line.endswith("]"):
                current = sections.setdefault(line[1:-1], {})
                continue
            key, _, value = line.partition("=")
            current.setdefault(key.strip(), []).append(value.strip())
    return sections


def systemd_seconds(value):
    """TimeoutStopSec and friends: a bare number is seconds, else a systemd time span."""
    value = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    units = {"ms": 0.001, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(ms|sec|s|min|m|h)\b", value)
    if not parts:
        raise ValueError(f"not a time span: {value!r}")
    return sum(float(n) * units[u] for n, u in parts)


def cmd_unit(unit_path, config_path=None):
    f = Failures(f"systemd unit {unit_path}")
    units = unit_directives(unit_path)
    svc = units.get("Service", {})

    def one(key):
        values = svc.get(key) or [None]
        return values[-1]

    with open(config_path or VM_CONFIG, "rb") as fh:
        cfg = tomllib.load(fh)
    drain = seconds(cfg.get("shutdown", {}).get("drain_timeout", "25s"))
    max_conns = cfg.get("listen", {}).get("max_connections", 10000)

    f.check(one("User") == "wskeep" and one("Group") == "wskeep", "the service must run as user and group wskeep")
    f.check(one("ExecStart") == "/usr/bin/wskeep run --config /etc/wskeep/wskeep.toml",
            "ExecStart must be /usr/bin/wskeep run --config /etc/wskeep/wskeep.toml")
    f.check(one("ExecReload") == "/bin/kill -HUP $MAINPID", "ExecReload must be /bin/kill -HUP $MAINPID (SIGHUP reloads)")
    f.check(one("KillSignal") in (None, "SIGTERM"), "KillSignal must be SIGTERM (it starts the drain)")
    f.check(one("Restart") == "on-failure", "Restart must be on-failure")
    try:
        stop = systemd_seconds(one("TimeoutStopSec") or "90")
        f.check(stop > drain + CLOSE_BOUND_SECONDS,
                f"TimeoutStopSec ({stop:g}s) must exceed shutdown.drain_timeout ({drain:g}s) + the "
                f"{CLOSE_BOUND_SECONDS}s close bound, or a stop kills connections before their 1001")
    except ValueError as e:
        f.check(False, f"TimeoutStopSec: {e}")
    nofile = one("LimitNOFILE") or "0"
    limit = int(nofile.split(":")[-1]) if nofile.split(":")[-1].isdigit() else 0
    f.check(limit >= 2 * max_conns + FD_HEADROOM,
            f"LimitNOFILE ({nofile}) must hold two descriptors per connection for listen.max_connections "
            f"({max_conns}) plus {FD_HEADROOM}")
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("PrivateTmp", "yes"),
                       ("ProtectHome", "yes"), ("PrivateDevices", "yes")):
        f.check(one(key) == value, f"{key} must be {value}")
    caps = one("CapabilityBoundingSet")
    f.check(caps is not None and set(caps.split()) <= {"CAP_NET_BIND_SERVICE"},
            "CapabilityBoundingSet must be empty (or only CAP_NET_BIND_SERVICE, to bind below 1024)")
    f.check(units.get("Install", {}).get("WantedBy") == ["multi-user.target"], "WantedBy must be multi-user.target")
    return f.finish()


# --- placeholders ----------------------------------------------------------------------------

PLACEHOLDER_RE = re.compile(r"\bexample\.(com|org|net)\b|github\.com/example\b|\b[\w-]+\.example\b", re.I)


def cmd_placeholders():
    """A link or image that looks real but leads nowhere is worse than none."""
    f = Failures("placeholder domains")
    paths = [README, "Cargo.toml"]
    for top in (DEPLOY, "config", "docs"):
        for root, _, names in os.walk(top):
            paths += [os.path.join(root, n) for n in names]
    for path in sorted(paths):
        try:
            with open(path, encoding="utf-8") as fh:
                for number, line in enumerate(fh, 1):
                    for m in PLACEHOLDER_RE.finditer(line):
                        f.check(False, f"{path}:{number}: {m.group(0)}")
        except UnicodeDecodeError:
            continue
    return f.finish()


# Metrics wskeep exports beyond DESIGN.md's table (README's metrics table lists them).
BEYOND_DESIGN = {"wskeep_proxy_protocol_failures_total", "wskeep_compressed_connections_total",
                 "wskeep_resume_sessions_detached", "wskeep_resume_sessions_detached_total",
                 "wskeep_resume_sessions_resumed_total", "wskeep_resume_failures_total"}


def check_design():
    """The metric names used here must still be in DESIGN.md's table, when it is at hand."""
    if not os.path.exists(DESIGN):
        return 0
    f = Failures(f"metrics contract ({DESIGN})")
    with open(DESIGN, encoding="utf-8") as fh:
        text = fh.read()
    table = set(re.findall(r"`(wskeep_[a-z0-9_]+)`", text))
    for name in METRICS:
        if name.startswith("wskeep_") and name not in BEYOND_DESIGN:
            f.check(name in table, f"{name} is not in DESIGN.md's metrics table any more")
    return f.finish()


def main(argv):
    if len(argv) < 2:
        sys.stderr.write(__doc__)
        return 2
    cmd, args = argv[1], argv[2:]
    if cmd == "manifests" and len(args) == 2:
        return cmd_manifests(*args)
    if cmd == "alerts" and not args:
        return check_design() or cmd_alerts()
    if cmd == "dashboard" and len(args) == 1:
        return cmd_dashboard(*args)
    if cmd == "dockerfile" and not args:
        return cmd_dockerfile()
    if cmd == "unit" and len(args) in (1, 2):
        return cmd_unit(*args)
    if cmd == "placeholders" and not args:
        return cmd_placeholders()
    if cmd == "rules-file" and not args:
        sys.stdout.write(rules_file_text())
        return 0
    if cmd == "dashboard-queries" and not args:
        with open(DASHBOARD, encoding="utf-8") as fh:
            for q in dashboard_queries(json.load(fh)):
                print(q)
        return 0
    sys.stderr.write(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
