#!/usr/bin/env python3
"""A deliberately tiny stand-in for `kustomize build`, for deploy/kubernetes only.

Debian has no kustomize and no recent kubectl, so deploy/check.sh renders the manifests with this
script everywhere, and also with `kubectl kustomize` where kubectl is installed and checks that
the two agree.

It implements exactly what deploy/kubernetes/kustomization.yaml uses, as kustomize v5 does it:
  - resources: local YAML files (no directories, no remote bases);
  - namespace: set on every resource (no other namespace handling);
  - configMapGenerator: name, files (key = file name, or "key=path"), options.labels; the
    generated name gets kustomize's content hash suffix, and references to the ConfigMap from
    Deployment pod volumes (configMap and projected sources) are rewritten to it.
Any other field makes it stop with an error rather than render something kustomize would not.

Usage: mini_kustomize.py DIR   (prints the rendered multi-document YAML on stdout)
"""

import hashlib
import json
import os
import sys

import yaml

SUPPORTED_TOP = {"apiVersion", "kind", "resources", "namespace", "configMapGenerator"}
SUPPORTED_GENERATOR = {"name", "files", "options"}
SUPPORTED_OPTIONS = {"labels"}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


class RenderError(Exception):
    pass


def go_json(value):
    """json.Marshal as Go writes it: sorted keys, no spaces, HTML-significant runes escaped."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                    ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def config_map_hash(cm):
    """kustomize's api/hasher: sha256 of the encoded ConfigMap, 10 hex digits, some remapped.

    kustomize v5 hashes a generated ConfigMap before it has a name: "name" is encoded as "".
    """
    encoded = {"kind": "ConfigMap", "name": "", "data": cm.get("data", {})}
    if cm.get("binaryData"):
        encoded["binaryData"] = cm["binaryData"]
    digest = hashlib.sha256(go_json(encoded).encode("utf-8")).hexdigest()
    return digest[:10].translate(str.maketrans("013ae", "ghkmt"))


def load_documents(path):
    with open(path, encoding="utf-8") as f:
        docs = [d for d in yaml.safe_load_all(f) if d is not None]
    for d in docs:
        if not isinstance(d, dict) or "kind" not in d or "metadata" not in d:
            raise RenderError(f"{path}: every document must be a Kubernetes object")
    return docs


def generate_config_map(base, gen, namespace):
    unknown = set(gen) - SUPPORTED_GENERATOR
    if unknown:
        raise RenderError(f"configMapGenerator: unsupported fields {sorted(unknown)}")
    options = gen.get("options") or {}
    unknown = set(options) - SUPPORTED_OPTIONS
    if unknown:
        raise RenderError(f"configMapGenerator.options: unsupported fields {sorted(unknown)}")
    data = {}
    for entry in gen.get("files") or []:
        key, _, rel = entry.partition("=") if "=" in entry else (os.path.basename(entry), "", entry)
        if os.path.isabs(rel) or ".." in rel.split("/"):
            raise RenderError(f"configMapGenerator: file {rel!r} must be inside {base}")
        with open(os.path.join(base, rel), encoding="utf-8") as f:
            data[key] = f.read()
    meta = {"name": gen["name"]}
    if namespace:
        meta["namespace"] = namespace
    if options.get("labels"):
        meta["labels"] = dict(options["labels"])
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}
    meta["name"] = f"{gen['name']}-{config_map_hash(cm)}"
    return gen["name"], cm


def rewrite_config_map_refs(obj, renames):
    if obj["kind"] not in WORKLOAD_KINDS:
        return
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    for volume in spec.get("volumes") or []:
        refs = [volume.get("configMap")]
        refs += [s.get("configMap") for s in (volume.get("projected") or {}).get("sources") or []]
        for ref in refs:
            if ref and ref.get("name") in renames:
                ref["name"] = renames[ref["name"]]


def render(base):
    path = os.path.join(base, "kustomization.yaml")
    with open(path, encoding="utf-8") as f:
        kz = yaml.safe_load(f)
    unknown = set(kz) - SUPPORTED_TOP
    if unknown:
        raise RenderError(f"{path}: fields not supported by mini_kustomize: {sorted(unknown)}")
    namespace = kz.get("namespace")
    objects = []
    for rel in kz.get("resources") or []:
        full = os.path.join(base, rel)
        if not os.path.isfile(full):
            raise RenderError(f"{path}: resource {rel!r} is not a local file")
        objects += load_documents(full)
    renames = {}
    generated = []
    for gen in kz.get("configMapGenerator") or []:
        old, cm = generate_config_map(base, gen, namespace)
        renames[old] = cm["metadata"]["name"]
        generated.append(cm)
    for obj in objects:
        if namespace:
            obj["metadata"]["namespace"] = namespace
        rewrite_config_map_refs(obj, renames)
    return generated + objects


def main(argv):
    if len(argv) != 2:
        sys.stderr.write(__doc__)
        return 2
    try:
        objects = render(argv[1])
    except (RenderError, OSError, yaml.YAMLError) as e:
        print(f"mini_kustomize: {e}", file=sys.stderr)
        return 1
    yaml.safe_dump_all(objects, sys.stdout, sort_keys=False, default_flow_style=False, width=1000)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
