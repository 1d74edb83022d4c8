#!/usr/bin/env python3
"""Checks of the rendered chart and its monitoring sources, for scripts/chart-check.sh and e2e.

  manifests FILE [KIND...]          every document of `helm template` output is a well-formed
                                    object; fails if a listed kind is missing
  rule-file MANIFESTS OUT           write the PrometheusRule's groups as a plain rule file
  same-rules A B                    fail unless two rule files hold the same groups and rules
  configmap-file MANIFESTS KEY SRC  fail unless a ConfigMap's data[KEY] equals file SRC
  operator-images MANIFESTS OPERATOR AGENT PULL_SECRETS AGENT_PULL_SECRETS
                                    fail unless the operator Deployment runs image OPERATOR,
                                    passes --agent-image=AGENT, and its pods and the agents
                                    pull with the comma-separated secret names given
  dashboard-queries DASHBOARD       print every PromQL query of the dashboard, one per line,
                                    with the dashboard variables replaced (see QUERY_VARIABLES)
  dashboard-rules DASHBOARD OUT     write the queries as recording rules, so `promtool check
                                    rules OUT` parses every one of them
  dashboard-check DASHBOARD URL [--may-be-empty WHERE]...
                                    run every query against the Prometheus at URL; fails
                                    unless each returns at least one sample (WHERE, as the
                                    report names a query, may return none: a series that only
                                    some clusters have; it must still run)
  prometheus-config MANIFESTS TARGETS RULES OUT
                                    what prometheus-operator would make of the PodMonitors,
                                    ServiceMonitors (with their Services) and PrometheusRules
                                    in MANIFESTS (e.g. `kubectl get ... -o yaml`): a Prometheus
                                    config OUT discovering pods from the file_sd file TARGETS,
                                    and the rule groups in RULES (the e2e stack's Prometheus)
  audit-policy FILE                 fail unless FILE is an audit.k8s.io/v1 Policy that omits
                                    RequestReceived, records stratum.io time configuration at
                                    RequestResponse and never records Secrets above Metadata

Only the standard library and PyYAML (Debian: python3-yaml).
"""
import json
import re
import sys
import urllib.parse
import urllib.request

import yaml

# Dashboard variables as a query sees them with "All" selected, a rate window that works with
# scrape intervals up to 30s, and a one-hour time range.
QUERY_VARIABLES = {
    "$__rate_interval": "2m",
    "$__range_s": "3600",
    "$__range": "1h",
    "$time_service": ".*",
    "$node": ".*",
    "$tenant": ".*",
}


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


class StrictLoader(yaml.SafeLoader):
    """Refuses duplicate mapping keys, which PyYAML accepts silently but the API server's
    strict decoding (and kubectl) reject."""


def _mapping(loader, node, deep=False):
    keys = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in keys:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        keys.add(key)
    return loader.construct_mapping(node, deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load_docs(path):
    with open(path, encoding="utf-8") as f:
        try:
            return [d for d in yaml.load_all(f, Loader=StrictLoader) if d is not None]
        except yaml.YAMLError as e:
            fail(f"{path} is not valid YAML: {e}")


def cmd_manifests(path, *kinds):
    docs = load_docs(path)
    seen = {}
    for i, d in enumerate(docs):
        if not isinstance(d, dict):
            fail(f"{path}: document {i} is not a mapping")
        for key in ("apiVersion", "kind"):
            if not d.get(key):
                fail(f"{path}: document {i} has no {key}")
        if not (d.get("metadata") or {}).get("name"):
            fail(f"{path}: {d['kind']} (document {i}) has no metadata.name")
        seen.setdefault(d["kind"], []).append(d["metadata"]["name"])
    missing = [k for k in kinds if k not in seen]
    if missing:
        fail(f"{path}: expected kinds missing: {', '.join(missing)}")
    summary = ", ".join(f"{k} x{len(v)}" for k, v in sorted(seen.items()))
    print(f"  {len(docs)} objects: {summary}")


def find(docs, kind):
    found = [d for d in docs if d.get("kind") == kind]
    if len(found) != 1:
        fail(f"expected exactly one {kind}, found {len(found)}")
    return found[0]


def cmd_rule_file(manifests, out):
    rule = find(load_docs(manifests), "PrometheusRule")
    with open(out, "w", encoding="utf-8") as f:
        yaml.safe_dump({"groups": rule["spec"]["groups"]}, f, sort_keys=False)


def cmd_same_rules(a, b):
    ga, gb = (load_docs(p)[0]["groups"] for p in (a, b))
    if ga != gb:
        for x, y in zip(ga, gb):
            for rx, ry in zip(x.get("rules", []), y.get("rules", [])):
                if rx != ry:
                    print(f"  first difference in {rx.get('alert') or rx.get('record')}:", file=sys.stderr)
                    for k in sorted(set(rx) | set(ry)):
                        if rx.get(k) != ry.get(k):
                            print(f"    {k}: {rx.get(k)!r}\n    != {ry.get(k)!r}", file=sys.stderr)
                    break
        fail(f"{a} and {b} differ")


def cmd_configmap_file(manifests, key, src):
    docs = [d for d in load_docs(manifests) if d.get("kind") == "ConfigMap" and key in (d.get("data") or {})]
    if len(docs) != 1:
        fail(f"expected one ConfigMap with data key {key}, found {len(docs)}")
    with open(src, encoding="utf-8") as f:
        want = f.read()
    if docs[0]["data"][key].rstrip("\n") != want.rstrip("\n"):
        fail(f"ConfigMap data {key} differs from {src}")


def cmd_operator_images(manifests, operator, agent, pull_secrets, agent_pull_secrets):
    pod = find(load_docs(manifests), "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = container.get("args") or []
    got = {
        "image": container.get("image"),
        "--agent-image": [a.split("=", 1)[1] for a in args if a.startswith("--agent-image=")],
        "imagePullSecrets": [s["name"] for s in pod.get("imagePullSecrets") or []],
        "--agent-image-pull-secret": [
            a.split("=", 1)[1] for a in args if a.startswith("--agent-image-pull-secret=")
        ],
    }
    want = {
        "image": operator,
        "--agent-image": [agent],
        "imagePullSecrets": [s for s in pull_secrets.split(",") if s],
        "--agent-image-pull-secret": [s for s in agent_pull_secrets.split(",") if s],
    }
    for key in want:
        if got[key] != want[key]:
            fail(f"{manifests}: operator Deployment {key} is {got[key]!r}, want {want[key]!r}")
    print(f"  operator {operator}, agents {agent}, pull secrets {want['imagePullSecrets']} / "
          f"{want['--agent-image-pull-secret']}")


def cmd_operator_arg(manifests, flag, value):
    """The operator Deployment passes FLAG exactly once, with VALUE."""
    args = find(load_docs(manifests), "Deployment")["spec"]["template"]["spec"]["containers"][0].get("args") or []
    got = [a.split("=", 1)[1] for a in args if a.startswith(flag + "=")]
    if got != [value]:
        fail(f"{manifests}: operator Deployment {flag} is {got!r}, want [{value!r}]")
    print(f"  {flag}={value!r}")


def dashboard_queries(path):
    """(where, query) for every panel target and every query variable of the dashboard."""
    with open(path, encoding="utf-8") as f:
        dash = json.load(f)
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((f"panel '{p.get('title')}' {t.get('refId')}", t["expr"]))
            walk(p.get("panels", []))

    walk(dash.get("panels", []))
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        q = v["query"]["query"] if isinstance(v.get("query"), dict) else v.get("query", "")
        # label_values(SELECTOR, LABEL) is Grafana's; as PromQL: does SELECTOR carry LABEL?
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q.strip(), re.S)
        if not m:
            fail(f"variable {v['name']}: unsupported query {q!r}")
        out.append((f"variable ${v['name']}", f"count by ({m.group(2)}) ({m.group(1)})"))

    def substitute(q):
        for k in sorted(QUERY_VARIABLES, key=len, reverse=True):
            q = q.replace(k, QUERY_VARIABLES[k])
        if "$" in q:
            fail(f"unknown dashboard variable in {q!r}")
        return q

    return [(w, substitute(q)) for w, q in out]


def cmd_dashboard_queries(path):
    for _, q in dashboard_queries(path):
        print(" ".join(q.split()))


def cmd_dashboard_rules(path, out):
    rules = [{"record": f"dashboard:query_{i}", "expr": q} for i, (_, q) in enumerate(dashboard_queries(path))]
    with open(out, "w", encoding="utf-8") as f:
        yaml.safe_dump({"groups": [{"name": "dashboard-queries", "rules": rules}]}, f, sort_keys=False)
    print(f"  {len(rules)} dashboard queries")


def cmd_dashboard_check(path, url, *options):
    may_be_empty = set()
    rest = list(options)
    while rest:
        flag = rest.pop(0)
        if flag != "--may-be-empty" or not rest:
            fail(f"dashboard-check: unexpected argument {flag!r}")
        may_be_empty.add(rest.pop(0))
    failed = 0
    queries = dashboard_queries(path)
    unknown = may_be_empty - {where for where, _ in queries}
    if unknown:
        fail(f"dashboard-check: --may-be-empty names no query: {sorted(unknown)}")
    for where, q in queries:
        req = f"{url.rstrip('/')}/api/v1/query?" + urllib.parse.urlencode({"query": q})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                body = json.load(r)
        except Exception as e:  # noqa: BLE001 -- any failure of one query is reported, the rest still run
            print(f"  FAIL {where}: {e}")
            failed += 1
            continue
        result = body.get("data", {}).get("result", [])
        if body.get("status") == "success" and not result and where in may_be_empty:
            print(f"  ok   {where}: no data, allowed here")
        elif body.get("status") != "success" or not result:
            print(f"  FAIL {where}: no data\n       {' '.join(q.split())}")
            failed += 1
        else:
            print(f"  ok   {where}: {len(result)} series")
    print(f"  {len(queries) - failed} of {len(queries)} dashboard queries returned data")
    if failed:
        sys.exit(1)


def _pod_label(key):
    """Prometheus' Kubernetes pod discovery label of a pod label key."""
    return "__meta_kubernetes_pod_label_" + re.sub(r"[^a-zA-Z0-9_]", "_", key)


def _matches(selector, labels):
    if (selector or {}).get("matchExpressions"):
        fail("label selectors with matchExpressions are not supported here")
    return all(labels.get(k) == v for k, v in ((selector or {}).get("matchLabels") or {}).items())


def _scrape_job(monitor, endpoint, targets, pod_selector, port, job):
    """One scrape config as prometheus-operator derives it from a monitor endpoint: keep the
    discovered pods in the monitor's namespaces that `pod_selector` matches, on container
    port `port`, with job `job` (a static value or a pod label to copy)."""
    meta, spec = monitor["metadata"], monitor["spec"]
    namespaces = (spec.get("namespaceSelector") or {}).get("matchNames") or [meta["namespace"]]

    def keep(label, regex):
        return {"source_labels": [label], "regex": regex, "action": "keep"}

    relabel = [keep("__meta_kubernetes_namespace", "|".join(re.escape(n) for n in namespaces))]
    relabel += [keep(_pod_label(k), re.escape(v)) for k, v in sorted(pod_selector.items())]
    relabel += [
        keep("__meta_kubernetes_pod_container_port_name", re.escape(str(port))),
        keep("__meta_kubernetes_pod_phase", "Running"),
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
    ]
    if job.startswith("label:"):
        relabel.append({"source_labels": [_pod_label(job[6:])], "target_label": "job"})
    else:
        relabel.append({"target_label": "job", "replacement": job})
    relabel += endpoint.get("relabelings") or []
    out = {
        "job_name": f"{monitor['kind'].lower()}/{meta['namespace']}/{meta['name']}",
        "metrics_path": endpoint.get("path", "/metrics"),
        "file_sd_configs": [{"files": [targets], "refresh_interval": "5s"}],
        "relabel_configs": relabel,
    }
    for ours, theirs in (("scrape_interval", "interval"), ("scrape_timeout", "scrapeTimeout")):
        if endpoint.get(theirs):
            out[ours] = endpoint[theirs]
    if endpoint.get("metricRelabelings"):
        out["metric_relabel_configs"] = endpoint["metricRelabelings"]
    return out


def cmd_prometheus_config(manifests, targets, rules_out, out):
    """Debian's Prometheus is built without Kubernetes discovery, so the pods come from a
    file_sd TARGETS file whose labels are named as Kubernetes pod discovery names them
    (the e2e kubelet stand-in writes it); the monitors' selection is done by relabeling."""
    docs = []
    for d in load_docs(manifests):
        docs += d.get("items", []) if d.get("kind", "").endswith("List") else [d]
    jobs, groups = [], []
    for d in docs:
        spec = d.get("spec") or {}
        if d.get("kind") == "PodMonitor":
            selector = (spec.get("selector") or {}).get("matchLabels") or {}
            _matches(spec.get("selector"), {})  # refuses matchExpressions
            job = f"label:{spec['jobLabel']}" if spec.get("jobLabel") else f"{d['metadata']['namespace']}/{d['metadata']['name']}"
            jobs += [_scrape_job(d, e, targets, selector, e["port"], job) for e in spec.get("podMetricsEndpoints", [])]
        elif d.get("kind") == "ServiceMonitor":
            # The endpoints of each selected Service are its selector's pods on the target port.
            services = [s for s in docs if s.get("kind") == "Service" and _matches(spec.get("selector"), s["metadata"].get("labels") or {})]
            if not services:
                fail(f"ServiceMonitor {d['metadata']['name']}: no Service in {manifests} matches its selector")
            for svc in services:
                labels = svc["metadata"].get("labels") or {}
                job = labels.get(spec.get("jobLabel", ""), svc["metadata"]["name"])
                for e in spec.get("endpoints", []):
                    port = next((p for p in svc["spec"]["ports"] if p.get("name") == e["port"]), None)
                    if port is None:
                        fail(f"ServiceMonitor {d['metadata']['name']}: Service {svc['metadata']['name']} has no port {e['port']}")
                    jobs.append(_scrape_job(d, e, targets, svc["spec"]["selector"], port.get("targetPort", port["port"]), job))
        elif d.get("kind") == "PrometheusRule":
            groups += spec.get("groups", [])
    if not jobs:
        fail(f"{manifests}: no PodMonitor or ServiceMonitor endpoints")
    with open(rules_out, "w", encoding="utf-8") as f:
        yaml.safe_dump({"groups": groups}, f, sort_keys=False)
    config = {
        "global": {"scrape_interval": "30s", "evaluation_interval": "5s"},
        "rule_files": [rules_out],
        "scrape_configs": jobs,
    }
    with open(out, "w", encoding="utf-8") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    print(f"  {len(jobs)} scrape jobs, {len(groups)} rule groups")


def cmd_audit_policy(path):
    with open(path) as f:
        policy = yaml.safe_load(f)
    if not isinstance(policy, dict):
        fail(f"{path}: not a YAML mapping")
    if policy.get("apiVersion") != "audit.k8s.io/v1" or policy.get("kind") != "Policy":
        fail(f"{path}: not an audit.k8s.io/v1 Policy")
    if "RequestReceived" not in (policy.get("omitStages") or []):
        fail(f"{path}: RequestReceived is not omitted")
    rules = policy.get("rules") or []
    levels = {"None", "Metadata", "Request", "RequestResponse"}
    for i, rule in enumerate(rules):
        if rule.get("level") not in levels:
            fail(f"{path}: rule {i} has level {rule.get('level')!r}")
    def first_level(group, resource):
        for rule in rules:
            res = rule.get("resources")
            if rule.get("users") or rule.get("namespaces") or rule.get("verbs") and "patch" not in rule["verbs"]:
                continue
            if res is None or any(
                r.get("group", "") == group and (not r.get("resources") or resource in r["resources"]) and not r.get("resourceNames")
                for r in res
            ):
                return rule["level"]
        return "None"
    for resource in ("timeservices", "tenanttimepolicies"):
        if first_level("stratum.io", resource) != "RequestResponse":
            fail(f"{path}: a patch of {resource} is not recorded at RequestResponse")
    if first_level("", "secrets") not in ("None", "Metadata"):
        fail(f"{path}: Secrets would be recorded with their content")
    print(f"{path}: {len(rules)} rules")


COMMANDS = {
    "manifests": cmd_manifests,
    "rule-file": cmd_rule_file,
    "same-rules": cmd_same_rules,
    "configmap-file": cmd_configmap_file,
    "operator-images": cmd_operator_images,
    "operator-arg": cmd_operator_arg,
    "dashboard-queries": cmd_dashboard_queries,
    "dashboard-rules": cmd_dashboard_rules,
    "dashboard-check": cmd_dashboard_check,
    "prometheus-config": cmd_prometheus_config,
    "audit-policy": cmd_audit_policy,
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    COMMANDS[sys.argv[1]](*sys.argv[2:])
