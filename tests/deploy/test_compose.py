"""docker-compose.yml, checked statically (there is no Docker engine here): valid Compose, and
every file, port, address and command it names exists and agrees with the others."""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from compose_spec import PyCompose

from opsapi.config import Settings
from opsapi.routers.instances import load_routers
from opsapi.routers.nginx_lua import NginxLuaRouter
from tests.deploy.compose import (
    SHARED,
    compose,
    container_file,
    default_of,
    listen_port,
    mounts,
    repo_path,
    services,
    unescape,
)
from tests.deploy.support import ROOT, promtool

OPSAPI_IMAGE = "opsapi:local"


def opsapi_services() -> dict[str, dict[str, object]]:
    return {name: s for name, s in services().items() if s.get("image") == OPSAPI_IMAGE}


def test_the_file_is_valid_compose() -> None:
    PyCompose.from_json(json.dumps(compose())).validate()


def test_the_stack_has_every_part() -> None:
    names = set(services())
    assert {"postgres", "migrate", "grants", "opsapi", "nginx", "demo-blue", "demo-green",
            "prometheus", "grafana"} <= names  # fmt: skip


def test_every_mounted_file_and_build_context_exists_and_volumes_are_declared() -> None:
    declared = set(compose().get("volumes", {}))
    for name, service in services().items():
        for target, source in mounts(service).items():
            if source.startswith("./"):
                assert repo_path(source).exists(), f"{name}: {source}"
            else:
                assert source in declared, f"{name}: volume {source} for {target}"
        build = service.get("build")
        if build:
            context = ROOT / build["context"]
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
    assert all(s.get("build") == services()["opsapi"]["build"] for s in opsapi_services().values())


def _opsapi_commands(service: dict[str, object]) -> list[list[str]]:
    """The `opsapi …` command lines a service of the opsapi image runs."""
    entrypoint = service.get("entrypoint") or ["opsapi"]
    command = service.get("command") or ["serve", "--host", "0.0.0.0", "--port", "8080"]
    assert isinstance(entrypoint, list)
    assert isinstance(command, list)
    if entrypoint == ["opsapi"]:
        return [command]
    if entrypoint[:1] == ["sh"]:
        return [
            line.split(">")[0].split()[1:]
            for line in re.split(r"[;&|]+", " ".join(command))
            if line.split()[:1] == ["opsapi"]
        ]
    return []


@pytest.mark.parametrize("name", sorted(opsapi_services()))
def test_every_command_of_the_opsapi_image_exists(name: str) -> None:
    service = opsapi_services()[name]
    entrypoint = service.get("entrypoint") or ["opsapi"]
    assert isinstance(entrypoint, list)
    if entrypoint[0] == "python":
        # the demo app of the package
        assert entrypoint[1:] == ["-m", "opsapi.demo.app"]
        args = [sys.executable, *entrypoint[1:], service["command"][0], "--help"]  # type: ignore[index]
    else:
        (command,) = _opsapi_commands(service)
        assert (ROOT / "pyproject.toml").read_text().count('opsapi = "opsapi.cli:main"') == 1
        args = [sys.executable, "-m", "opsapi", *command, "--help"]
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    for key in service.get("environment", {}):  # type: ignore[attr-defined]
        if key.startswith("OPSAPI_"):
            assert key.removeprefix("OPSAPI_").lower() in Settings.model_fields, key


def test_database_roles_agree_with_the_init_script_and_the_kubernetes_job() -> None:
    init = (ROOT / "deploy/compose/postgres/init.sql").read_text()
    roles = dict(re.findall(r"CREATE ROLE (\w+) LOGIN PASSWORD '([^']+)'", init))
    (database,) = re.findall(r"CREATE DATABASE (\w+) OWNER opsapi_migrator", init)
    postgres = services()["postgres"]
    assert mounts(postgres)["/docker-entrypoint-initdb.d/init.sql"] == (
        "./deploy/compose/postgres/init.sql"
    )

    def user_of(service: str) -> tuple[str, str, str, str]:
        url = urlsplit(services()[service]["environment"]["OPSAPI_DATABASE_URL"])
        return url.username or "", url.password or "", url.hostname or "", url.path.strip("/")

    assert user_of("migrate") == ("opsapi_migrator", roles["opsapi_migrator"], "postgres", database)
    assert user_of("grants") == user_of("migrate")
    assert user_of("opsapi") == ("opsapi_app", roles["opsapi_app"], "postgres", database)
    assert services()["opsapi"]["environment"]["OPSAPI_MIGRATE_ON_START"] == "false"
    assert services()["migrate"]["command"] == ["migrate"]
    # the grants step is the Kubernetes Job's, with the same SQL file
    grants = services()["grants"]
    assert grants["environment"]["APP_ROLE"] == "opsapi_app"
    job = yaml.safe_load((ROOT / "deploy/kubernetes/migrate/job.yaml").read_text())
    (job_grants,) = job["spec"]["template"]["spec"]["containers"]
    assert [unescape(part) for part in grants["command"]] == job_grants["command"]
    assert container_file(grants, "/etc/opsapi-grants/grants.sql") == (
        ROOT / "deploy/postgres/grants.sql"
    )
    assert grants["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services()["opsapi"]["depends_on"]["grants"]["condition"] == (
        "service_completed_successfully"
    )


def test_opsapi_and_nginx_share_the_router_files_at_the_same_paths() -> None:
    opsapi, nginx, setup = services()["opsapi"], services()["nginx"], services()["edge-setup"]
    routers_path = opsapi["environment"]["OPSAPI_ROUTERS_FILE"]
    routers_file = container_file(opsapi, routers_path)
    assert setup["environment"]["OPSAPI_ROUTERS_FILE"] == routers_path
    assert container_file(setup, routers_path) == routers_file
    edge = load_routers(routers_file)["edge"]
    assert isinstance(edge, NginxLuaRouter)
    (admin,) = edge.admins
    # the admin socket and the state file are in the one volume all three mount at SHARED
    assert admin.startswith(f"unix:{SHARED}/")
    assert str(edge.state_file).startswith(f"{SHARED}/")
    shared = {mounts(s)[SHARED] for s in (opsapi, nginx, setup)}
    assert len(shared) == 1
    assert shared <= set(compose()["volumes"])
    # edge-setup writes the snippet the nginx configuration includes, for its upstream
    script = " ".join(setup["command"])
    written = re.search(r"opsapi nginx-config --router edge (\S+) > (\S+);", script)
    assert written, script
    upstream, snippet = written.groups()
    conf = container_file(nginx, "/etc/nginx/nginx.conf").read_text()
    assert f"include {snippet};" in conf
    assert f"proxy_pass http://{upstream};" in conf
    assert "include /etc/nginx/modules-enabled/*.conf;" in conf  # Debian's Lua module
    policy = yaml.safe_load((ROOT / "deploy/compose/checkout-policy.yaml").read_text())
    assert policy["router"]["name"] == "edge"
    assert policy["router"]["upstream"] == upstream


def test_the_policy_slots_are_the_demo_containers() -> None:
    policy = yaml.safe_load((ROOT / "deploy/compose/checkout-policy.yaml").read_text())
    (network,) = compose()["networks"]["default"]["ipam"]["config"]
    subnet = ipaddress.ip_network(network["subnet"])
    addresses = {}
    for slot, color in (("blue", "demo-blue"), ("green", "demo-green")):
        service = services()[color]
        address = service["networks"]["default"]["ipv4_address"]
        assert ipaddress.ip_address(address) in subnet
        addresses[slot] = f"{address}:{listen_port(service)}"
        assert service["environment"]["DEMO_SERVICE"] == policy["service"]
    assert policy["router"]["slots"] == addresses
    versions = {
        default_of(services()[f"demo-{s}"]["environment"]["DEMO_VERSION"]) for s in addresses
    }
    assert len(versions) == 2  # a stable and a canary version


def _scrape_targets(config: dict[str, object]) -> dict[str, list[str]]:
    return {
        job["job_name"]: [t for c in job["static_configs"] for t in c["targets"]]
        for job in config["scrape_configs"]  # type: ignore[attr-defined]
    }


def test_prometheus_scrapes_services_on_the_ports_they_listen_on(tmp_path: Path) -> None:
    prometheus = services()["prometheus"]
    config_path = re.search(r"--config\.file=(\S+)", " ".join(prometheus["command"]))
    assert config_path
    config_file = container_file(prometheus, config_path.group(1))
    config = yaml.safe_load(config_file.read_text())
    targets = _scrape_targets(config)
    assert targets["opsapi"] == [f"opsapi:{listen_port(services()['opsapi'])}"]
    assert sorted(targets["demo"]) == sorted(
        f"{name}:{listen_port(services()[name])}" for name in ("demo-blue", "demo-green")
    )
    # the rule files are mounted, and opsapi's Prometheus URL is this service
    for rule_file in config["rule_files"]:
        assert container_file(prometheus, rule_file).is_file()
    url = urlsplit(services()["opsapi"]["environment"]["OPSAPI_PROMETHEUS_URL"])
    assert (url.hostname, url.port) == ("prometheus", 9090)
    assert "9090:9090" in prometheus["ports"]
    # and promtool accepts the configuration with those files
    local = dict(config)
    local["rule_files"] = [str(container_file(prometheus, f)) for f in config["rule_files"]]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(local))
    result = subprocess.run(
        [promtool(), "check", "config", str(tmp_path / "prometheus.yml")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_is_provisioned_with_the_stack_prometheus_and_the_dashboard() -> None:
    grafana = services()["grafana"]
    provisioning = container_file(grafana, "/etc/grafana/provisioning")
    (datasource,) = yaml.safe_load((provisioning / "datasources/prometheus.yaml").read_text())[
        "datasources"
    ]
    url = urlsplit(datasource["url"])
    assert (url.hostname, url.port) == ("prometheus", 9090)
    assert datasource["type"] == "prometheus"
    (provider,) = yaml.safe_load((provisioning / "dashboards/opsapi.yaml").read_text())["providers"]
    folder = provider["options"]["path"]
    dashboard = container_file(grafana, f"{folder}/opsapi-dashboard.json")
    assert dashboard == ROOT / "deploy/grafana/opsapi-dashboard.json"
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert container_file(grafana, home) == dashboard


def test_published_ports_reach_what_listens() -> None:
    assert f"8080:{listen_port(services()['opsapi'])}" in services()["opsapi"]["ports"]
    conf = container_file(services()["nginx"], "/etc/nginx/nginx.conf").read_text()
    (port,) = re.findall(r"^\s*listen (\d+);", conf, re.M)
    assert f"8000:{port}" in services()["nginx"]["ports"]
    traffic = services()["traffic"]["command"]
    assert traffic[traffic.index("--url") + 1] == f"http://nginx:{port}/".replace(":80/", "/")
