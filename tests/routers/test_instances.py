"""Router instances from the routers file: JSON and YAML, validation errors, secrets kept out."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from opsapi.routers.base import Router, RouteTarget
from opsapi.routers.haproxy import HaproxyRouter
from opsapi.routers.instances import PullRouter, RoutersFileError, load_routers
from opsapi.routers.nginx import NginxRouter
from opsapi.routers.webhook import WebhookRouter

SECRET = "S3CRET-value-that-must-never-show"
INSTANCES: dict[str, Any] = {
    "edge": {
        "type": "nginx",
        "conf": "/etc/nginx/nginx.conf",
        "prefix": "/etc/nginx",
        "upstreams_dir": "/etc/nginx/opsapi",
        "binary": "nginx",
        "probe": "127.0.0.1:8099",
    },
    "lb": {"type": "haproxy", "socket": "/run/haproxy/admin.sock"},
    "lb_tcp": {"type": "haproxy", "socket": "127.0.0.1:9999", "timeout": 1.5},
    "hook": {"type": "webhook", "url": "https://deploy.example/opsapi", "secret": SECRET},
}


def write(tmp_path: Path, name: str, data: Any) -> Path:
    path = tmp_path / name
    if name.endswith(".json"):
        path.write_text(json.dumps(data))
    else:
        path.write_text(yaml.safe_dump(data))
    return path


def problems(tmp_path: Path, data: Any, name: str = "routers.yaml") -> str:
    with pytest.raises(RoutersFileError) as error:
        load_routers(write(tmp_path, name, data))
    message = str(error.value)
    assert SECRET not in message
    assert SECRET not in repr(error.value)
    # No chained exception (a pydantic or parser error could quote the input) in tracebacks.
    assert error.value.__cause__ is None
    assert error.value.__context__ is None or error.value.__suppress_context__
    return message


@pytest.mark.parametrize("name", ["routers.json", "routers.yaml", "routers.yml"])
def test_json_and_yaml_load(tmp_path: Path, name: str) -> None:
    routers = load_routers(write(tmp_path, name, INSTANCES))
    assert sorted(routers) == ["edge", "hook", "lb", "lb_tcp"]
    edge, lb, hook = routers["edge"], routers["lb_tcp"], routers["hook"]
    assert isinstance(edge, NginxRouter)
    assert (edge.name, edge.conf, edge.upstreams_dir, edge.probe) == (
        "edge", Path("/etc/nginx/nginx.conf"), Path("/etc/nginx/opsapi"), "127.0.0.1:8099",
    )  # fmt: skip
    assert isinstance(lb, HaproxyRouter)
    assert (lb.socket, lb.timeout) == ("127.0.0.1:9999", 1.5)
    assert isinstance(hook, WebhookRouter)
    assert hook.url == "https://deploy.example/opsapi"
    for router in routers.values():
        assert SECRET not in repr(router)
        assert SECRET not in str(router)
    assert routers["lb"].check_params({"backend": "b"})  # parameters checked per type
    assert (
        routers["lb"].check_params({"backend": "b", "slots": {"blue": "s1", "green": "s2"}}) == []
    )
    assert edge.check_params({"upstream": "u", "slots": {"blue": "h:1", "green": "h:2"}}) == []
    assert hook.check_params({}) == []


def test_no_file_no_instances(tmp_path: Path) -> None:
    assert load_routers(None) == {}
    empty = tmp_path / "routers.yaml"
    empty.write_text("")
    assert load_routers(empty) == {}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"edge": {**INSTANCES["edge"], "type": "envoy"}},
         "instance 'edge': field 'type': unknown type 'envoy'; expected one of nginx, nginx-lua, "
         "haproxy, webhook"),
        ({"edge": {k: v for k, v in INSTANCES["edge"].items() if k != "type"}},
         "instance 'edge': field 'type': required: one of nginx, nginx-lua, haproxy, webhook"),
        ({"edge": {k: v for k, v in INSTANCES["edge"].items() if k != "conf"}},
         "instance 'edge': field 'conf': Field required"),
        ({"edge": {**INSTANCES["edge"], "conf": "nginx.conf"}},
         "instance 'edge': field 'conf': Value error, must be an absolute path"),
        ({"edge": {**INSTANCES["edge"], "probe": "localhost"}},
         "instance 'edge': field 'probe': Value error, must be host:port or [ipv6]:port"),
        ({"edge": {**INSTANCES["edge"], "cnof": "/x"}},
         "instance 'edge': field 'cnof': Extra inputs are not permitted"),
        ({"lb": {"type": "haproxy", "socket": "admin.sock"}},
         "instance 'lb': field 'socket': Value error, socket must be an absolute unix socket path "
         "or host:port"),
        ({"hook": {**INSTANCES["hook"], "url": "ftp://x"}},
         "instance 'hook': field 'url': Value error, must be an http:// or https:// URL"),
        ({"hook": {**INSTANCES["hook"], "timeout": 0}},
         "instance 'hook': field 'timeout': Input should be greater than 0"),
        ({"hook": {"type": "webhook", "url": "https://x"}},
         "instance 'hook': field 'secret': Field required"),
        ({"Edge!": INSTANCES["edge"]},
         "instance 'Edge!': name must match ^[a-z0-9][a-z0-9_-]{0,62}$"),
        ({"pull": {"type": "webhook", "url": "https://x", "secret": SECRET}},
         "instance 'pull': reserved for the built-in pull router"),
        ({"edge2": INSTANCES["edge"]},
         "instance 'edge2': field 'upstreams_dir': already used by instance 'edge'"),
        ({"lb": "haproxy"}, "instance 'lb': must be a mapping"),
    ],
)  # fmt: skip
def test_invalid_instances_are_named(tmp_path: Path, change: dict[str, Any], expected: str) -> None:
    message = problems(tmp_path, {**INSTANCES, **change})
    assert expected in message
    assert message.startswith(f"routers file {tmp_path / 'routers.yaml'}: ")


def test_every_problem_is_reported_and_listed(tmp_path: Path) -> None:
    data = {
        "edge": {"type": "nginx", "prefix": "relative"},
        "hook": {"type": "webhook", "url": "https://x", "secret": "short-" + SECRET[:5]},
    }
    with pytest.raises(RoutersFileError) as error:
        load_routers(write(tmp_path, "routers.json", data))
    found = {(p["instance"], p["field"]) for p in error.value.problems}
    assert found == {
        ("edge", "conf"), ("edge", "prefix"), ("edge", "upstreams_dir"), ("edge", "probe"),
        ("hook", "secret"),
    }  # fmt: skip
    assert "field 'secret': Value error, must be 16 to 4096 characters" in str(error.value)
    assert "not 11" not in str(error.value)  # not even its length
    assert SECRET[:5] not in str(error.value)


def test_secrets_stay_out_of_errors(tmp_path: Path) -> None:
    # A secret pasted into a misspelt field, into the type, or into a broken line.
    assert "field 'secrte'" in problems(tmp_path, {"hook": {**INSTANCES["hook"], "secrte": SECRET}})
    assert "unknown type;" in problems(tmp_path, {"hook": {**INSTANCES["hook"], "type": SECRET}})
    assert "field 'url'" in problems(tmp_path, {"hook": {**INSTANCES["hook"], "url": SECRET}})
    broken = tmp_path / "broken.yaml"
    broken.write_text(f"hook:\n  type: webhook\n  secret: {SECRET}: oops\n")
    with pytest.raises(RoutersFileError, match=r"invalid YAML at line 3 column \d+") as error:
        load_routers(broken)
    assert SECRET not in str(error.value)
    broken_json = tmp_path / "broken.json"
    broken_json.write_text('{"hook": {"secret": "' + SECRET + '" "url": 1}}')
    with pytest.raises(RoutersFileError, match="invalid JSON at line 1 column") as error:
        load_routers(broken_json)
    assert SECRET not in str(error.value)


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(RoutersFileError, match="cannot read: No such file"):
        load_routers(tmp_path / "missing.yaml")
    with pytest.raises(RoutersFileError, match=r"must end in \.json, \.yaml or \.yml"):
        load_routers(write(tmp_path, "routers.toml", {}))
    with pytest.raises(RoutersFileError, match="must be a mapping of instance names"):
        load_routers(write(tmp_path, "routers.json", [INSTANCES["edge"]]))
    duplicated = tmp_path / "dup.yaml"
    duplicated.write_text("lb:\n  type: haproxy\n  socket: /a.sock\nlb:\n  type: haproxy\n")
    with pytest.raises(RoutersFileError, match="duplicate key 'lb'"):
        load_routers(duplicated)
    duplicated_json = tmp_path / "dup.json"
    duplicated_json.write_text('{"lb": {"type": "haproxy"}, "lb": {"type": "haproxy"}}')
    with pytest.raises(RoutersFileError, match="duplicate key 'lb'"):
        load_routers(duplicated_json)


async def test_pull_router_is_a_no_op() -> None:
    router: Router = PullRouter()
    assert router.name == "pull"
    assert router.check_params({}) == []
    assert router.check_params({"x": 1}) == [
        {"field": "router.x", "message": "the pull router takes no parameters"}
    ]
    assert router.check_params({"slots": {"blue": "a", "green": "b"}}) == [
        {"field": "router.slots", "message": "the pull router takes no parameters"}
    ]
    await router.apply(RouteTarget("checkout"), 50)
    assert await router.read_back(RouteTarget("checkout")) is None
