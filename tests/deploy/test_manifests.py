"""The deployment files (Dockerfile, deploy/) against the code they deploy.

Offline and fast: no cluster, no kustomize binary, no Docker, no services. The Kubernetes
manifests are rendered here (base and overlays, see :func:`render`) and validated against
the Kubernetes JSON schemas that the ``kubernetes-validate`` package ships.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from prometheus_client import generate_latest
from starlette.routing import Route

from otelworker.ingress.routes import healthz, readyz, routes
from otelworker.ingress.routes import metrics as metrics_endpoint
from otelworker.metrics import Metrics
from otelworker.settings import SECRET_KEYS, Settings, env_key
from tests.deploy import prometheusrule

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
PROMETHEUS = DEPLOY / "prometheus"
ALERTS = PROMETHEUS / "alerts.yaml"
DASHBOARD = DEPLOY / "grafana" / "otelworker.json"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
PROMETHEUS_RULE = PROMETHEUS / "prometheusrule.yaml"
# The runbook links' default base (deploy/prometheus/kustomization.yaml sets it): the docs/
# directory of the repository.
RUNBOOK_BASE = "https://github.com/otelworker/otelworker/blob/main/docs/"
RUNBOOK_BASE_PATH = urlsplit(RUNBOOK_BASE).path
DOCKERFILE = ROOT / "Dockerfile"

# Kubernetes schemas to validate against (kubernetes-validate ships one set per minor).
KUBERNETES_VERSION = "1.30"

# kustomize directories: the one `kubectl apply -k deploy/kubernetes` uses, and each overlay.
KUSTOMIZATIONS = {
    "base": KUBERNETES,
    **{p.name: p for p in sorted((KUBERNETES / "overlays").iterdir()) if p.is_dir()},
}

# Metric names the alerts or the dashboard use that no otelworker process registry
# exports: `python -m otelworker gc-orphans --textfile PATH` writes them for
# node_exporter's textfile collector.
PRODUCED_ELSEWHERE = {"otelworker_gc_orphans_found"}

Doc = dict[str, Any]


def _settings_default(key: str) -> Any:
    return Settings.model_fields[key.lower()].default


# --- rendering (a small kustomize: resources, strategic-merge patches, and the
# configMapGenerator literals and replacements deploy/prometheus uses) ------------------

# List fields merged item by item (by this key) in a strategic-merge patch, as kustomize
# does for these Kubernetes fields; every other list is replaced.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
}


def _merge(base: Any, patch: Any, field: str = "") -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for key, value in patch.items():
            if value is None:
                out.pop(key, None)
            elif key in out:
                out[key] = _merge(out[key], value, key)
            else:
                out[key] = copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(patch, list) and field in MERGE_KEYS:
        key = MERGE_KEYS[field]
        out_list = [copy.deepcopy(item) for item in base]
        for item in patch:
            match = [i for i, old in enumerate(out_list) if old.get(key) == item[key]]
            if match:
                out_list[match[0]] = _merge(out_list[match[0]], item, field)
            else:
                out_list.append(copy.deepcopy(item))
        return out_list
    return copy.deepcopy(patch)


def _identity(doc: Doc) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def _load_yaml_docs(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def render(directory: Path) -> list[Doc]:
    """The resources `kubectl kustomize DIRECTORY` gives, for the features used here."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    supported = {"apiVersion", "kind", "resources", "patches", "configMapGenerator", "replacements"}
    unsupported = set(kustomization) - supported
    assert not unsupported, f"{directory}: render() does not implement {unsupported}"
    docs: list[Doc] = []
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        docs += render(path) if path.is_dir() else _load_yaml_docs(path)
    for patch_ref in kustomization.get("patches", []):
        assert set(patch_ref) == {"path"}, f"{directory}: only patch files: {patch_ref}"
        for patch in _load_yaml_docs(directory / patch_ref["path"]):
            patch = dict(patch)
            delete = patch.pop("$patch", None) == "delete"
            targets = [i for i, doc in enumerate(docs) if _identity(doc) == _identity(patch)]
            assert len(targets) == 1, f"{patch_ref['path']}: no single target {_identity(patch)}"
            if delete:
                del docs[targets[0]]
            else:
                docs[targets[0]] = _merge(docs[targets[0]], patch)
    docs += [_generate_configmap(spec) for spec in kustomization.get("configMapGenerator", [])]
    for replacement in kustomization.get("replacements", []):
        _replace(docs, replacement)
    docs = [doc for doc in docs if not _local_config(doc)]
    identities = [_identity(doc) for doc in docs]
    assert len(identities) == len(set(identities)), f"{directory}: duplicates {identities}"
    return docs


def _generate_configmap(spec: Doc) -> Doc:
    assert set(spec) <= {"name", "literals", "options"}, f"configMapGenerator: {spec}"
    options = spec.get("options", {})
    assert options.get("disableNameSuffixHash") is True, "render() does not hash names"
    data = dict(literal.split("=", 1) for literal in spec.get("literals", []))
    metadata = {"name": spec["name"], "annotations": options.get("annotations", {})}
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}


def _local_config(doc: Doc) -> bool:
    annotations = doc.get("metadata", {}).get("annotations") or {}
    return bool(annotations.get("config.kubernetes.io/local-config") == "true")


def _field_slots(node: Any, path: list[str]) -> Iterator[tuple[Any, str]]:
    """(container, key) for every field a dotted path names; `*` is every item of a list."""
    head, rest = path[0], path[1:]
    if head == "*":
        for item in node if isinstance(node, list) else []:
            yield from _field_slots(item, rest)
    elif isinstance(node, dict) and head in node:
        if rest:
            yield from _field_slots(node[head], rest)
        else:
            yield node, head


def _replace(docs: list[Doc], replacement: Doc) -> None:
    """A kustomize replacement: a source field's value into target fields (whole, or one
    part of the target's value split by options.delimiter)."""
    source = replacement["source"]
    (origin,) = [doc for doc in docs if _identity(doc) == (source.get("kind"), source.get("name"))]
    [(container, key)] = _field_slots(origin, source["fieldPath"].split("."))
    value = container[key]
    for target in replacement["targets"]:
        select = target["select"]
        assert set(select) <= {"kind", "name"}, f"render() selects by kind and name: {select}"
        for doc in docs:
            if select.get("kind", doc["kind"]) != doc["kind"]:
                continue
            if select.get("name", doc["metadata"]["name"]) != doc["metadata"]["name"]:
                continue
            options = target.get("options", {})
            for path in target["fieldPaths"]:
                for slot, field in _field_slots(doc, path.split(".")):
                    if "delimiter" in options:
                        parts = slot[field].split(options["delimiter"])
                        parts[options.get("index", 0)] = value
                        slot[field] = options["delimiter"].join(parts)
                    else:
                        slot[field] = value


@pytest.fixture(scope="module", params=sorted(KUSTOMIZATIONS))
def rendered(request: pytest.FixtureRequest) -> list[Doc]:
    return render(KUSTOMIZATIONS[request.param])


def _of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [doc for doc in docs if doc["kind"] == kind]


def _pod_env(deployment: Doc, docs: list[Doc]) -> dict[str, str]:
    """The plain environment of the single container: its ConfigMaps, then its env."""
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    configmaps = {
        doc["metadata"]["name"]: doc.get("data", {}) for doc in _of_kind(docs, "ConfigMap")
    }
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
    return env


def _container_port(container: Doc, port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(number)


def _path_of(endpoint: object) -> str:
    """The path the service serves ``endpoint`` on (from the routes list itself)."""
    (path,) = [r.path for r in routes if isinstance(r, Route) and r.endpoint is endpoint]
    return path


# --- Kubernetes -------------------------------------------------------------------------


def test_kustomizations_render_what_they_should() -> None:
    base = {_identity(doc) for doc in render(KUSTOMIZATIONS["base"])}
    assert base == {
        ("ConfigMap", "otelworker"),
        ("Deployment", "otelworker-ingress"),
        ("Deployment", "otelworker-worker"),
        ("Service", "otelworker"),
        ("HorizontalPodAutoscaler", "otelworker-ingress"),
        ("PodDisruptionBudget", "otelworker-ingress"),
    }
    all_in_one = render(KUSTOMIZATIONS["all-in-one"])
    (deployment,) = _of_kind(all_in_one, "Deployment")
    assert _pod_env(deployment, all_in_one)["ROLE"] == "all"
    assert deployment["spec"]["replicas"] == 1
    with_compactor = render(KUSTOMIZATIONS["with-compactor"])
    assert {_identity(doc) for doc in with_compactor} == base | {
        ("Deployment", "otelworker-compactor")
    }
    (compactor,) = [
        d
        for d in _of_kind(with_compactor, "Deployment")
        if _pod_env(d, with_compactor)["ROLE"] == "compactor"
    ]
    # Its own pods: the Service and the PDB select the ingress's, the compactor's none.
    labels = compactor["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "compactor"
    assert compactor["spec"]["selector"]["matchLabels"] == labels


def test_manifests_validate_against_kubernetes_schemas(rendered: list[Doc]) -> None:
    for doc in rendered:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{_identity(doc)}: {exc.message} at {list(exc.path)}")


def test_roles(rendered: list[Doc]) -> None:
    roles = sorted(_pod_env(d, rendered).get("ROLE", "") for d in _of_kind(rendered, "Deployment"))
    assert roles in (["ingress", "worker"], ["all"], ["compactor", "ingress", "worker"])
    for role in roles:
        assert role in {r.value for r in type(_settings_default("ROLE"))}


def test_configmap_keys_are_settings_and_valid(rendered: list[Doc]) -> None:
    keys = {env_key(name) for name in Settings.model_fields}
    for configmap in _of_kind(rendered, "ConfigMap"):
        data = configmap["data"]
        assert set(data) <= keys, f"not settings: {set(data) - keys}"
        assert not set(data) & SECRET_KEYS, "secrets belong in the Secret, not the ConfigMap"
        Settings(_env_file=None, **data)  # raises on an invalid value
    for deployment in _of_kind(rendered, "Deployment"):
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert {var["name"] for var in container["env"]} <= keys


def test_no_secret_is_committed() -> None:
    for path in DEPLOY.rglob("*.yaml"):
        for doc in _load_yaml_docs(path):
            assert doc.get("kind") != "Secret", f"{path}: create the Secret, do not commit it"


def test_secret_references_match_the_documented_command(rendered: list[Doc]) -> None:
    referenced: set[str] = set()
    for deployment in _of_kind(rendered, "Deployment"):
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        for var in container["env"]:
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref is not None:
                assert ref["name"] == "otelworker"
                assert ref["key"] == var["name"]
                assert ref.get("optional", False) == (var["name"] != "DATABASE_URL")
                referenced.add(ref["key"])
        assert "DATABASE_URL" in {var["name"] for var in container["env"]}
    assert referenced <= SECRET_KEYS
    doc = DEPLOY_DOC.read_text().replace("\\\n", " ")  # shell line continuations
    commands = re.findall(r"kubectl create secret generic otelworker .*", doc)
    assert commands, "docs/deploy.md shows no `kubectl create secret generic otelworker`"
    literals = set(re.findall(r"--from-literal=([A-Z_0-9]+)=", commands[0]))
    assert referenced <= literals, f"the documented command lacks {referenced - literals}"


def test_probes_and_ports_are_the_ones_the_service_serves(rendered: list[Doc]) -> None:
    liveness, readiness = _path_of(healthz), _path_of(readyz)
    assert (liveness, readiness) == ("/healthz", "/readyz")  # as docs and the issue say
    expected = {"startupProbe": liveness, "livenessProbe": liveness, "readinessProbe": readiness}
    for deployment in _of_kind(rendered, "Deployment"):
        env = _pod_env(deployment, rendered)
        http_port = int(env.get("PORT", _settings_default("PORT")))
        grpc_port = int(env.get("GRPC_PORT", _settings_default("GRPC_PORT")))
        pod = deployment["spec"]["template"]
        (container,) = pod["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["http"] == http_port
        if env["ROLE"] in ("ingress", "all"):
            assert ports["grpc"] == grpc_port
        else:
            assert "grpc" not in ports, "a worker serves no OTLP"
        for probe, path in expected.items():
            get = container[probe]["httpGet"]
            assert get["path"] == path, probe
            assert _container_port(container, get["port"]) == http_port
        annotations = pod["metadata"]["annotations"]
        assert int(annotations["prometheus.io/port"]) == http_port
        assert annotations["prometheus.io/path"] == _path_of(metrics_endpoint)


def test_service_exposes_both_otlp_ports(rendered: list[Doc]) -> None:
    (service,) = _of_kind(rendered, "Service")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert set(ports) == {"http", "grpc"}
    assert ports["http"]["port"] == _settings_default("PORT")
    assert ports["grpc"]["port"] == _settings_default("GRPC_PORT")
    assert ports["grpc"]["appProtocol"] == "grpc"
    assert ports["http"]["appProtocol"] == "http"
    selected = [
        d
        for d in _of_kind(rendered, "Deployment")
        if service["spec"]["selector"].items()
        <= d["spec"]["template"]["metadata"]["labels"].items()
    ]
    (deployment,) = selected
    assert _pod_env(deployment, rendered)["ROLE"] in ("ingress", "all")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    for port in ports.values():
        assert _container_port(container, port["targetPort"]) == port["port"]


def test_hpa_and_pdb_target_the_ingress(rendered: list[Doc]) -> None:
    deployments = {d["metadata"]["name"]: d for d in _of_kind(rendered, "Deployment")}
    for hpa in _of_kind(rendered, "HorizontalPodAutoscaler"):
        target = deployments[hpa["spec"]["scaleTargetRef"]["name"]]
        assert _pod_env(target, rendered)["ROLE"] == "ingress"
        assert hpa["spec"]["minReplicas"] <= target["spec"]["replicas"]
        assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    for pdb in _of_kind(rendered, "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"].items()
        (target,) = [
            d
            for d in deployments.values()
            if selector <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert _pod_env(target, rendered)["ROLE"] == "ingress"


def test_termination_grace_covers_drain_delay_and_shutdown_grace(rendered: list[Doc]) -> None:
    for deployment in _of_kind(rendered, "Deployment"):
        env = _pod_env(deployment, rendered)
        drain = float(
            env.get("READINESS_DRAIN_DELAY_S", _settings_default("READINESS_DRAIN_DELAY_S"))
        )
        grace = float(env.get("SHUTDOWN_GRACE_S", _settings_default("SHUTDOWN_GRACE_S")))
        period = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert period > drain + grace, f"{_identity(deployment)}: {period} <= {drain} + {grace}"
        assert drain > 0, "a zero drain delay lets the Service route to a stopping pod"


def _dockerfile_final_stage() -> list[str]:
    lines = DOCKERFILE.read_text().replace("\\\n", " ").splitlines()
    instructions = [
        line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")
    ]
    last_from = max(i for i, line in enumerate(instructions) if line.upper().startswith("FROM "))
    return instructions[last_from:]


def _dockerfile_user() -> tuple[int, int]:
    stage = _dockerfile_final_stage()
    args = {
        match[1]: match[2] for line in stage if (match := re.fullmatch(r"ARG (\w+)=(\S+)", line))
    }
    (user,) = [line.split(None, 1)[1] for line in stage if line.upper().startswith("USER ")]
    user = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], user)
    uid, _, gid = user.partition(":")
    return int(uid), int(gid or uid)


def test_pods_are_locked_down(rendered: list[Doc]) -> None:
    uid, gid = _dockerfile_user()
    assert uid != 0
    for deployment in _of_kind(rendered, "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == uid
        assert pod["securityContext"]["runAsGroup"] == gid
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        assert pod["enableServiceLinks"] is False
        (container,) = pod["containers"]
        security = container["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert security["capabilities"]["drop"] == ["ALL"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
        assert "emptyDir" in volumes[tmp["name"]]
        resources = container["resources"]
        for kind in ("cpu", "memory"):
            assert kind in resources["requests"] and kind in resources["limits"]


def test_object_store_is_s3_where_the_root_is_read_only(rendered: list[Doc]) -> None:
    # With S3_BUCKET unset a worker writes objects to LOCAL_OBJECT_DIR, which a read-only
    # root filesystem refuses.
    for deployment in _of_kind(rendered, "Deployment"):
        env = _pod_env(deployment, rendered)
        if env["ROLE"] in ("worker", "all", "compactor"):
            assert env.get("S3_BUCKET")


# --- Dockerfile ---------------------------------------------------------------------------


def test_dockerfile_serves_the_settings_ports_and_probes_healthz() -> None:
    stage = _dockerfile_final_stage()
    assert stage[0].split()[1] == "python:3.11-slim"
    (expose,) = [line for line in stage if line.upper().startswith("EXPOSE ")]
    assert {int(p) for p in expose.split()[1:]} == {
        _settings_default("PORT"),
        _settings_default("GRPC_PORT"),
    }
    (healthcheck,) = [line for line in stage if line.upper().startswith("HEALTHCHECK ")]
    assert f"{_path_of(healthz)}'" in healthcheck
    assert f"'{_settings_default('PORT')}'" in healthcheck
    (entrypoint,) = [line for line in stage if line.upper().startswith("ENTRYPOINT ")]
    (cmd,) = [line for line in stage if line.upper().startswith("CMD ")]
    command = json.loads(entrypoint.split(None, 1)[1]) + json.loads(cmd.split(None, 1)[1])
    assert command == ["python", "-m", "otelworker", "serve"]
    for line in stage:
        if line.upper().startswith("RUN ") and " pip install " in f" {line} ":
            assert "--no-cache-dir" in shlex.split(line)


# --- alerts and dashboard -----------------------------------------------------------------


def _github_anchors(markdown: str) -> set[str]:
    anchors = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", markdown, flags=re.MULTILINE):
        text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
        anchors.add(text.replace(" ", "-"))
    return anchors


def _alert_rules() -> list[Doc]:
    rules_file = yaml.safe_load(ALERTS.read_text())
    return [rule for group in rules_file["groups"] for rule in group["rules"]]


def _dashboard_panels() -> Iterator[Doc]:
    def walk(panels: list[Doc]) -> Iterator[Doc]:
        for panel in panels:
            yield panel
            yield from walk(panel.get("panels", []))

    yield from walk(json.loads(DASHBOARD.read_text())["panels"])


def test_alert_rules_are_complete() -> None:
    rules_file = yaml.safe_load(ALERTS.read_text())
    assert all(set(group) >= {"name", "rules"} for group in rules_file["groups"])
    rules = _alert_rules()
    assert rules
    anchors = _github_anchors(DEPLOY_DOC.read_text())
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert rule["expr"].strip()
        assert rule["expr"].count("(") == rule["expr"].count(")")
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["for"]
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description", "runbook_url"}, rule["alert"]
        assert annotations["summary"].strip() and "\n" not in annotations["summary"].strip()
        assert annotations["description"].strip()
        url = urlsplit(annotations["runbook_url"])
        assert url.scheme in ("http", "https") and url.netloc, annotations["runbook_url"]
        assert url.path.startswith(RUNBOOK_BASE_PATH), annotations["runbook_url"]
        document = ROOT / "docs" / url.path.removeprefix(RUNBOOK_BASE_PATH)
        assert document == DEPLOY_DOC, annotations["runbook_url"]
        assert url.fragment.startswith("runbook-") and url.fragment in anchors, url.fragment


def _runbook_urls(rules: list[Doc]) -> list[str]:
    return [rule["annotations"]["runbook_url"] for rule in rules]


def test_prometheus_rule_is_the_alerts_file() -> None:
    assert PROMETHEUS_RULE.read_text() == prometheusrule.text(), (
        "deploy/prometheus/prometheusrule.yaml is out of date:"
        " .venv/bin/python -m tests.deploy.prometheusrule"
    )


def test_prometheus_kustomization_renders_the_alerts_with_the_default_base() -> None:
    (rule,) = render(PROMETHEUS)  # the base URL's ConfigMap is local-config: not applied
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]
    assert all(url.startswith(RUNBOOK_BASE) for url in _runbook_urls(_alert_rules()))


def test_runbook_base_url_is_set_in_one_place(tmp_path: Path) -> None:
    kustomization = (PROMETHEUS / "kustomization.yaml").read_text()
    assert kustomization.count(RUNBOOK_BASE) == 1
    for name in ("kustomization.yaml", "prometheusrule.yaml"):
        text = (PROMETHEUS / name).read_text()
        (tmp_path / name).write_text(text.replace(f"={RUNBOOK_BASE}", "=https://wiki.example/ow/"))
    (rule,) = render(tmp_path)
    expected = [
        url.replace(RUNBOOK_BASE, "https://wiki.example/ow/")
        for url in _runbook_urls(_alert_rules())
    ]
    rules = [r for group in rule["spec"]["groups"] for r in group["rules"]]
    assert _runbook_urls(rules) == expected
    assert all(url.startswith("https://wiki.example/ow/deploy.md#runbook-") for url in expected)


def test_render_agrees_with_kustomize() -> None:
    """render()'s configMapGenerator and replacements against the real kustomize, where
    kubectl is installed (the tests above need only render())."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    for directory in (PROMETHEUS, KUSTOMIZATIONS["base"]):
        out = subprocess.run(
            [kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=True
        ).stdout
        assert sorted(map(_canonical, yaml.safe_load_all(out))) == sorted(
            map(_canonical, render(directory))
        ), directory


def _canonical(doc: Doc) -> str:
    return json.dumps(doc, sort_keys=True)


def test_alerts_cover_the_issue_list() -> None:
    exprs = " ".join(rule["expr"] for rule in _alert_rules())
    for needle in (
        "otelworker_staging_backlog_items / otelworker_staging_backlog_limit_items > 0.8",
        "otelworker_staging_oldest_age_seconds > 15 * 60",
        "otelworker_staging_dead_items > 0",
        "rate(otelworker_batch_failures_total[5m]) > 0",
        'otelworker_requests_total{code=~"503|UNAVAILABLE"}',
        "otelworker_ready == 0",
        "otelworker_gc_orphans_found > 0",
        # forwarding (issue 21)
        "max by (destination) (otelworker_forward_lag_seconds) > 300",
        "delta(otelworker_forward_dead_objects[15m])) > 0",
        # compaction (issue 23): three times COMPACT_GRACE_S's default
        "max(otelworker_compact_lag_seconds) > 3 * 300",
    ):
        assert needle in exprs
    lagging = [r for r in _alert_rules() if r["alert"] == "OtelworkerForwardLagging"]
    assert [r["for"] for r in lagging] == ["10m"]
    compaction = [r for r in _alert_rules() if r["alert"] == "OtelworkerCompactionLagging"]
    assert [r["for"] for r in compaction] == ["15m"]
    assert _settings_default("COMPACT_GRACE_S") == 300


def test_dashboard_has_the_forwarding_row() -> None:
    """Issue 21's row: delivered records per destination, pending, lag, attempts, dead."""
    panels = list(_dashboard_panels())
    (row,) = [p for p in panels if p["type"] == "row" and p["title"] == "Forwarding"]
    below = [p for p in panels if p["type"] != "row" and p["gridPos"]["y"] > row["gridPos"]["y"]]
    exprs = " ".join(t["expr"] for p in below for t in p["targets"])
    for name in (
        "otelworker_forward_delivered_records_total",
        "otelworker_forward_pending_objects",
        "otelworker_forward_lag_seconds",
        "otelworker_forward_attempts_total",
        "otelworker_forward_dead_objects",
    ):
        assert name in exprs, name


def test_dashboard_has_the_compaction_row() -> None:
    """Issue 23's row: rows and objects compacted, files and bytes, passes and failures,
    the lag."""
    panels = list(_dashboard_panels())
    (row,) = [p for p in panels if p["type"] == "row" and p["title"] == "Compaction"]
    below = [p for p in panels if p["type"] != "row" and p["gridPos"]["y"] > row["gridPos"]["y"]]
    exprs = " ".join(t["expr"] for p in below for t in p["targets"])
    for name in (
        "otelworker_compact_records_total",
        "otelworker_compact_source_objects_total",
        "otelworker_compact_files_total",
        "otelworker_compact_bytes_total",
        "otelworker_compact_runs_total",
        "otelworker_compact_failures_total",
        "otelworker_compact_lag_seconds",
    ):
        assert name in exprs, name


def test_dashboard_model() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41
    (variable,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["name"] == "datasource" and variable["query"] == "prometheus"
    panels = list(_dashboard_panels())
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}"
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs))
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert target["expr"].count("(") == target["expr"].count(")")


# --- metric names -------------------------------------------------------------------------

_METRIC = re.compile(r"\b(?:otelworker|process)_[a-z_]+")


def metric_names_used() -> set[str]:
    """Every metric name in the alert expressions and the dashboard's queries, as written
    there (with `_total`, `_bucket`, `_sum`, `_count` where the query has them)."""
    exprs = [rule["expr"] for rule in _alert_rules()]
    exprs += [t["expr"] for panel in _dashboard_panels() for t in panel.get("targets", [])]
    return {name for expr in exprs for name in _METRIC.findall(expr)}


def exported_sample_names(exposition: str) -> set[str]:
    """The names a query can use against this exposition: each family's TYPE name, plus
    `_bucket`/`_sum`/`_count` for histograms (`_sum`/`_count` for summaries)."""
    names: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", exposition, flags=re.MULTILINE):
        names.add(name)
        suffixes = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("_sum", "_count")}
        names.update(name + suffix for suffix in suffixes.get(kind, ()))
        if kind == "counter" and not name.endswith("_total"):
            names.add(name + "_total")
    return names


def test_metric_names_used_are_found() -> None:
    used = metric_names_used()
    assert "otelworker_stage_duration_seconds_bucket" in used
    assert "process_resident_memory_bytes" in used
    assert "otelworker_gc_orphans_found" in used
    assert not any(name.endswith("_") for name in used)


def test_every_used_metric_is_exported() -> None:
    """Every metric the alerts and the dashboard query is in a fresh process registry (or
    is written by gc-orphans' textfile). Starts nothing: only builds the registry."""
    metrics = Metrics()
    exposition = generate_latest(metrics.registry).decode()
    missing = metric_names_used() - exported_sample_names(exposition) - PRODUCED_ELSEWHERE
    assert not missing, f"used in deploy/ but not exported: {sorted(missing)}"
