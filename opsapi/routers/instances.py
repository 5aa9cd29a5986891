"""Router instances from the routers file (`OPSAPI_ROUTERS_FILE`): server configuration, never
API input.

The file is JSON (`.json`) or YAML (`.yaml`, `.yml`): a mapping of instance name to its
configuration, for example in YAML::

    edge:
      type: nginx
      conf: /etc/nginx/nginx.conf         # absolute paths only
      prefix: /etc/nginx
      upstreams_dir: /etc/nginx/opsapi    # the main config includes upstreams_dir/*.conf
      probe: 127.0.0.1:8099               # where the generated probe servers listen
      binary: nginx                       # optional; also command_timeout, confirm_timeout,
                                          # settle (seconds)
    lb:
      type: haproxy
      socket: /run/haproxy/admin.sock     # or host:port; optional timeout (seconds)
    edge_lua:
      type: nginx-lua                     # weights in nginx's shared memory, no reload
      admin: 127.0.0.1:8098               # loopback or unix:/path; or admins: [...] for several
      secret: 32-or-more-visible-ascii    # bearer secret; nginx keeps only a salted hash of it
      state_file: /var/lib/opsapi/edge_lua.state  # read by nginx at start and reload
                                          # optional timeout (seconds, per admin call)
    hook:
      type: webhook
      url: https://deploy.example.com/opsapi/weights
      secret: at-least-16-characters      # HMAC key; optional timeout (seconds)

Names match `^[a-z0-9][a-z0-9_-]{0,62}$`; `pull` is the built-in router and cannot be redefined.
Unknown fields are refused, so a typo fails the start instead of being ignored. Error messages
name the instance and the field but never echo a value (a value may be a secret).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    model_validator,
)

from opsapi.canary.policy import ROUTER_NAME
from opsapi.routers.base import Router, RouteTarget
from opsapi.routers.haproxy import HaproxyRouter, parse_socket
from opsapi.routers.nginx import NginxRouter, split_host_port
from opsapi.routers.nginx_lua import SECRET, NginxLuaRouter, admin_error
from opsapi.routers.webhook import WebhookRouter

PULL = "pull"
_NAME = re.compile(ROUTER_NAME)


class RoutersFileError(ValueError):
    """The routers file cannot be used; `problems` lists `{"instance", "field", "message"}`."""

    def __init__(self, path: Path, problems: list[dict[str, str]]) -> None:
        self.path = path
        self.problems = problems
        parts = []
        for problem in problems:
            where = [f"instance {problem['instance']!r}"] if problem["instance"] else []
            where += [f"field {problem['field']!r}"] if problem["field"] else []
            parts.append(": ".join([*where, problem["message"]]))
        super().__init__(f"routers file {path}: " + "; ".join(parts))


def _absolute(path: Path) -> Path:
    if not path.is_absolute():
        raise ValueError("must be an absolute path")
    return path


def _host_port(value: str) -> str:
    if split_host_port(value) is None:
        raise ValueError("must be host:port or [ipv6]:port")
    return value


def _socket(value: str) -> str:
    parse_socket(value)
    return value


def _url(value: str) -> str:
    try:
        url = httpx.URL(value)
    except httpx.InvalidURL:
        url = None
    if url is None or url.scheme not in ("http", "https") or not url.host:
        raise ValueError("must be an http:// or https:// URL with a host")
    return value


def _long_enough(secret: SecretStr) -> SecretStr:
    # pydantic's own length message says how long the value is: not for a secret.
    if not 16 <= len(secret.get_secret_value()) <= 4096:
        raise ValueError("must be 16 to 4096 characters")
    return secret


def _admin(value: str) -> str:
    message = admin_error(value)
    if message is not None:
        raise ValueError(message)
    return value


def _admin_secret(secret: SecretStr) -> SecretStr:
    # nginx stores a hash of it in its configuration: long enough that guessing is hopeless.
    if not SECRET.fullmatch(secret.get_secret_value()):
        raise ValueError("must be 32 to 4096 visible ASCII characters (openssl rand -hex 32)")
    return secret


AbsolutePath = Annotated[Path, AfterValidator(_absolute)]
AdminAddress = Annotated[str, AfterValidator(_admin)]
Timeout = Annotated[float, Field(gt=0, le=300)]


class _Instance(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class NginxInstance(_Instance):
    """An nginx reached through its binary, its files and its probe address."""

    type: Literal["nginx"]
    conf: AbsolutePath
    prefix: AbsolutePath
    upstreams_dir: AbsolutePath
    probe: Annotated[str, AfterValidator(_host_port)]
    binary: str = Field(default="nginx", min_length=1, max_length=4096, pattern=r"^[^\x00\s]+$")
    command_timeout: Timeout = 10.0
    confirm_timeout: Timeout = 10.0
    settle: float = Field(default=0.3, ge=0, le=10)


class HaproxyInstance(_Instance):
    """A HAProxy runtime API socket (`level admin`)."""

    type: Literal["haproxy"]
    socket: Annotated[str, AfterValidator(_socket)]
    timeout: Timeout = 3.0


class NginxLuaInstance(_Instance):
    """One or more nginx with the Lua module, reached at their admin locations."""

    type: Literal["nginx-lua"]
    admin: AdminAddress | None = None
    admins: list[AdminAddress] | None = Field(default=None, min_length=1, max_length=16)
    secret: Annotated[SecretStr, AfterValidator(_admin_secret)]
    state_file: AbsolutePath
    timeout: Timeout = 2.0

    @model_validator(mode="after")
    def _one_way_to_name_admins(self) -> NginxLuaInstance:
        if (self.admin is None) == (self.admins is None):
            raise ValueError("give either admin or admins")
        if self.admins is not None and len(set(self.admins)) != len(self.admins):
            raise ValueError("admins: the same address twice")
        return self

    @property
    def addresses(self) -> list[str]:
        """The admin addresses, however given."""
        return [self.admin] if self.admin is not None else list(self.admins or ())


class WebhookInstance(_Instance):
    """A URL receiving signed weight changes."""

    type: Literal["webhook"]
    url: Annotated[str, AfterValidator(_url)] = Field(max_length=2048)
    secret: Annotated[SecretStr, AfterValidator(_long_enough)]
    timeout: Timeout = 5.0


InstanceConfig = NginxInstance | HaproxyInstance | WebhookInstance | NginxLuaInstance
_MODELS: dict[str, type[InstanceConfig]] = {
    "nginx": NginxInstance,
    "nginx-lua": NginxLuaInstance,
    "haproxy": HaproxyInstance,
    "webhook": WebhookInstance,
}


class PullRouter:
    """The built-in `pull` router: clients poll the API for the weight, so applying is storing
    it (done by the service layer) and there is nothing to read back. It takes no parameters;
    its slots are `DEFAULT_SLOTS` (blue, green)."""

    name = PULL

    def check_params(self, params: dict[str, Any]) -> list[dict[str, str]]:
        """The pull router takes no parameters."""
        return [
            {"field": f"router.{key}", "message": "the pull router takes no parameters"}
            for key in sorted(params, key=str)
        ]

    async def apply(self, target: RouteTarget, weight: int) -> None:
        """Nothing to do: the desired weight, once committed, is what clients poll."""

    async def read_back(self, target: RouteTarget) -> int | None:
        """Unsupported."""
        return None

    async def health(self) -> str:
        """Always up: it is the API itself."""
        return "built in: clients poll GET /internal/ops/canary/{service}/weight"


def load_routers(path: Path | None) -> dict[str, Router]:
    """The router instances of the routers file (none without one); `pull` is not included.

    Raises RoutersFileError naming every bad instance and field."""
    if path is None:
        return {}
    return {name: build_router(name, config) for name, config in load_instances(path).items()}


def load_instances(path: Path) -> dict[str, InstanceConfig]:
    """The routers file's instance configurations, validated."""
    data = _read(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RoutersFileError(path, [_problem("", "", "must be a mapping of instance names")])
    problems: list[dict[str, str]] = []
    instances: dict[str, InstanceConfig] = {}
    for name, raw in data.items():
        label = _label(name)
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            problems.append(_problem(label, "", f"name must match {ROUTER_NAME}"))
            continue
        if name == PULL:
            problems.append(_problem(name, "", "reserved for the built-in pull router"))
            continue
        if not isinstance(raw, dict):
            problems.append(_problem(name, "", "must be a mapping"))
            continue
        kind = raw.get("type")
        model = _MODELS.get(kind) if isinstance(kind, str) else None
        if model is None:
            problems.append(_problem(name, "type", _type_message(kind)))
            continue
        try:
            instances[name] = model.model_validate(raw)
        except ValidationError as error:
            # Built from locations and messages only: pydantic's own str() may quote the input.
            problems += [
                _problem(name, ".".join(str(part) for part in item["loc"]), item["msg"])
                for item in error.errors(include_input=False, include_url=False)
            ]
    problems += _shared_files(instances)
    if problems:
        raise RoutersFileError(path, problems)
    return instances


def build_router(name: str, config: InstanceConfig) -> Router:
    """The router object for one validated instance."""
    if isinstance(config, NginxInstance):
        return NginxRouter(
            name,
            config.conf,
            config.prefix,
            config.upstreams_dir,
            config.binary,
            probe=config.probe,
            command_timeout=config.command_timeout,
            confirm_timeout=config.confirm_timeout,
            settle=config.settle,
        )
    if isinstance(config, HaproxyInstance):
        return HaproxyRouter(name, config.socket, timeout=config.timeout)
    if isinstance(config, NginxLuaInstance):
        return NginxLuaRouter(
            name,
            config.addresses,
            config.secret.get_secret_value(),
            config.state_file,
            timeout=config.timeout,
        )
    return WebhookRouter(name, config.url, config.secret.get_secret_value(), config.timeout)


def _type_message(kind: object) -> str:
    known = ", ".join(_MODELS)
    if kind is None:
        return f"required: one of {known}"
    # Shown only when it looks like a type name, not like something pasted in the wrong place.
    shown = f" {kind!r}" if isinstance(kind, str) and re.fullmatch(r"\w{1,32}", kind) else ""
    return f"unknown type{shown}; expected one of {known}"


def _problem(instance: str, field: str, message: str) -> dict[str, str]:
    return {"instance": instance, "field": field, "message": message}


def _label(name: object) -> str:
    text = str(name)
    return text if len(text) <= 70 else text[:69] + "…"


def _shared_files(instances: dict[str, InstanceConfig]) -> list[dict[str, str]]:
    # Two nginx instances writing `<service>.conf` into one directory, or two nginx-lua instances
    # one state file, would overwrite each other.
    owners: dict[Path, str] = {}
    problems = []
    for name, config in instances.items():
        if isinstance(config, NginxInstance | NginxLuaInstance):
            field = "upstreams_dir" if isinstance(config, NginxInstance) else "state_file"
            path = Path(getattr(config, field))
            if path in owners:
                problems.append(_problem(name, field, f"already used by instance {owners[path]!r}"))
            owners.setdefault(path, name)
    return problems


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader refusing duplicate keys (a second `edge:` would silently replace the first)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if isinstance(key, str | int | float | bool):
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {_label(key)!r}", key_node.start_mark
                )
            seen.add(key)
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {_label(key)!r}")
        result[key] = value
    return result


def _read(path: Path) -> Any:
    suffix = path.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise RoutersFileError(path, [_problem("", "", "must end in .json, .yaml or .yml")])
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8"
        raise RoutersFileError(path, [_problem("", "", f"cannot read: {reason}")]) from None
    # Parse errors report a position and the parser's complaint, never the offending text,
    # which could be a secret.
    if suffix == ".json":
        try:
            return json.loads(text, object_pairs_hook=_unique_pairs)
        except json.JSONDecodeError as error:
            message = f"invalid JSON at line {error.lineno} column {error.colno}: {error.msg}"
        except ValueError as error:
            message = f"invalid JSON: {error}"
        raise RoutersFileError(path, [_problem("", "", message)]) from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        position = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        message = f"invalid YAML{position}: {error.problem or 'syntax error'}"
    except yaml.YAMLError:
        message = "invalid YAML"
    raise RoutersFileError(path, [_problem("", "", message)]) from None
