"""The Kubernetes manifests: valid against the API schemas, and wired to what the product has."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from opsapi.config import Settings
from opsapi.notifications.channels import load_channels
from opsapi.routers.instances import load_routers
from tests.deploy.support import ROOT, promtool, rule_groups

KUBERNETES = ROOT / "deploy/kubernetes"
# A release the schemas of kubernetes-validate bundle, and what current clusters run.
KUBERNETES_VERSION = "1.33.0"
OPERATOR_API = "monitoring.coreos.com/v1"

Doc = dict[str, Any]


def documents(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifests() -> list[tuple[Path, Doc]]:
    return [
        (path, doc)
        for path in sorted(KUBERNETES.rglob("*.yaml"))
        for doc in documents(path)
    ]  # fmt: skip


def find(kind: str, name: str) -> Doc:
    found = [d for _, d in manifests() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} manifests"
    return found[0]


def pod_spec(workload: Doc) -> Doc:
    return workload["spec"]["template"]["spec"]  # type: ignore[no-any-return]


def selects(selector: Doc, labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, selector
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def containers(spec: Doc) -> list[Doc]:
    return [*spec.get("initContainers", []), *spec["containers"]]


CORE = [
    pytest.param(p, d, id=f"{p.relative_to(KUBERNETES)}:{d['kind']}/{d['metadata']['name']}")
    for p, d in manifests()
    if d["apiVersion"] != OPERATOR_API
]


@pytest.mark.parametrize(("path", "doc"), CORE)
def test_every_manifest_validates_against_the_kubernetes_schemas(path: Path, doc: Doc) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_the_schema_check_refuses_a_misspelt_field() -> None:
    broken = find("Deployment", "opsapi") | {"spec": {"replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_the_servers_run_two_replicas_without_migrating_spread_and_protected() -> None:
    deployment = find("Deployment", "opsapi")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    spec = pod_spec(deployment)
    assert deployment["spec"]["replicas"] == 2
    assert selects(deployment["spec"]["selector"], labels)
    config = find("ConfigMap", "opsapi")["data"]
    assert config["OPSAPI_MIGRATE_ON_START"] == "false"
    (container,) = spec["containers"]
    assert {"configMapRef": {"name": "opsapi"}} in container["envFrom"]
    anti = spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert any(
        term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
        and selects(term["podAffinityTerm"]["labelSelector"], labels)
        for term in anti
    )
    budget = find("PodDisruptionBudget", "opsapi")
    assert selects(budget["spec"]["selector"], labels)
    assert budget["spec"]["minAvailable"] == 1
    # the shutdown fits the grace period twice over (docs/operations.md)
    shutdown = float(config["OPSAPI_SHUTDOWN_TIMEOUT_SECONDS"])
    assert spec["terminationGracePeriodSeconds"] >= 2 * shutdown + 5


def test_the_migration_job_migrates_as_the_owner_then_grants_the_application_role() -> None:
    job = find("Job", "opsapi-migrate")
    spec = pod_spec(job)
    (migrate,) = spec["initContainers"]
    (grants,) = spec["containers"]
    assert migrate["args"] == ["migrate"]
    env = {e["name"]: e for e in migrate["env"]}
    assert env["OPSAPI_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == (
        "opsapi-migrator-database"
    )
    grants_env = {e["name"]: e for e in grants["env"]}
    assert grants_env["OPSAPI_DATABASE_URL"] == env["OPSAPI_DATABASE_URL"]
    # the SQL it runs is deploy/postgres/grants.sql
    (mount,) = grants["volumeMounts"]
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    configmap = find("ConfigMap", volume["configMap"]["name"])
    assert f"{mount['mountPath']}/grants.sql" in grants["command"][-1]
    assert configmap["data"]["grants.sql"] == (ROOT / "deploy/postgres/grants.sql").read_text()
    # the servers use another role than the migration
    (server,) = pod_spec(find("Deployment", "opsapi"))["containers"]
    server_env = {e["name"]: e for e in server["env"]}
    assert server_env["OPSAPI_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == (
        "opsapi-database"
    )
    # the Job's pods are not opsapi servers: no Service, budget or policy of the servers picks them
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert not _service_selects(find("Service", "opsapi"), pod_labels)
    assert not selects(find("PodDisruptionBudget", "opsapi")["spec"]["selector"], pod_labels)
    assert not selects(find("NetworkPolicy", "opsapi")["spec"]["podSelector"], pod_labels)
    assert selects(find("NetworkPolicy", "opsapi-migrate")["spec"]["podSelector"], pod_labels)


def _service_selects(service: Doc, labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in service["spec"]["selector"].items())


def test_every_opsapi_command_the_manifests_run_exists() -> None:
    commands = [
        container["args"][0]
        for _, doc in manifests()
        if doc["kind"] in ("Deployment", "Job")
        for container in containers(pod_spec(doc))
        if container["image"].startswith("opsapi:")
    ]
    assert sorted(set(commands)) == ["migrate", "serve"]
    for command in set(commands):
        result = subprocess.run(
            [sys.executable, "-m", "opsapi", command, "--help"], capture_output=True, check=False
        )
        assert result.returncode == 0, (command, result.stderr)


def test_settings_secrets_and_mounted_files_exist_and_agree() -> None:
    config = find("ConfigMap", "opsapi")["data"]
    unknown = {
        name for name in config if name.removeprefix("OPSAPI_").lower() not in Settings.model_fields
    }
    assert unknown == set(), "not opsapi settings"
    examples = {d["metadata"]["name"]: d for d in documents(KUBERNETES / "examples/secrets.yaml")}
    for _, doc in manifests():
        if doc["kind"] not in ("Deployment", "Job"):
            continue
        spec = pod_spec(doc)
        for container in containers(spec):
            assert container["resources"]["requests"], container["name"]
            assert container["resources"]["limits"]["memory"], container["name"]
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in examples[ref["name"]]["stringData"], ref
                elif env["name"].startswith("OPSAPI_"):
                    assert env["name"].removeprefix("OPSAPI_").lower() in Settings.model_fields
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                secret = examples[volume["secret"]["secretName"]]
                for item in volume["secret"].get("items", []):
                    assert item["key"] in secret["stringData"], item
    # the routers and notifications files are where the Secrets are mounted
    spec = pod_spec(find("Deployment", "opsapi"))
    mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    files = {
        f"{mounts[v['name']]}/{item['path']}": (v["secret"]["secretName"], item["key"])
        for v in spec["volumes"]
        if "secret" in v
        for item in v["secret"]["items"]
    }
    assert files[config["OPSAPI_ROUTERS_FILE"]] == ("opsapi-routers", "routers.yaml")
    assert files[config["OPSAPI_NOTIFICATIONS_FILE"]] == ("opsapi-notifications", "channels.yaml")


def test_the_example_routers_and_channels_files_load(tmp_path: Path) -> None:
    secrets = {d["metadata"]["name"]: d for d in documents(KUBERNETES / "examples/secrets.yaml")}
    routers = tmp_path / "routers.yaml"
    routers.write_text(secrets["opsapi-routers"]["stringData"]["routers.yaml"])
    channels = tmp_path / "channels.yaml"
    channels.write_text(secrets["opsapi-notifications"]["stringData"]["channels.yaml"])
    assert load_routers(routers)
    assert load_channels(channels)


def test_the_network_policy_admits_the_api_port_and_the_service_targets_it() -> None:
    deployment = find("Deployment", "opsapi")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    (container,) = pod_spec(deployment)["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    policy = find("NetworkPolicy", "opsapi")
    assert selects(policy["spec"]["podSelector"], labels)
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    (ingress,) = policy["spec"]["ingress"]
    assert [p["port"] for p in ingress["ports"]] == [ports["http"]]
    egress_ports = {p["port"] for rule in policy["spec"]["egress"] for p in rule["ports"]}
    assert {53, 5432, 9090, 443} <= egress_ports  # DNS, PostgreSQL, Prometheus, PagerDuty
    service = find("Service", "opsapi")
    assert _service_selects(service, labels)
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in ports
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_the_service_monitor_scrapes_the_service_port_keeping_opsapi_labels() -> None:
    monitor = find("ServiceMonitor", "opsapi")
    assert monitor["apiVersion"] == OPERATOR_API
    service = find("Service", "opsapi")
    assert selects(monitor["spec"]["selector"], service["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert endpoint["honorLabels"] is True
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "honorLabels"}
    # the alerts select job="opsapi": the operator names the job after the Service
    assert service["metadata"]["name"] == "opsapi"


def test_the_prometheus_rule_holds_exactly_the_rule_files_and_promtool_accepts_it(
    tmp_path: Path,
) -> None:
    rule = find("PrometheusRule", "opsapi")
    assert rule["apiVersion"] == OPERATOR_API
    assert set(rule["spec"]) == {"groups"}
    expected = rule_groups("rules.yml") + rule_groups("alerts.yml")
    assert rule["spec"]["groups"] == expected
    extracted = tmp_path / "prometheusrule.yml"
    extracted.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = subprocess.run(
        [promtool(), "check", "rules", str(extracted)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alerts_fire_when_they_should(tmp_path: Path) -> None:
    """promtool's unit tests: a stalled controller, failing routers, a head going back …"""
    result = subprocess.run(
        [promtool(), "test", "rules", str(ROOT / "tests/deploy/prometheus_alerts_test.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
