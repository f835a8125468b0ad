"""Launch profiles: how the SUT agent starts, probes and stops an external inference server.

Profiles come from the agent's own configuration file (examples/servers.yaml documents the
format), never from requests: a request only names a profile and a model. Templates in a profile
use `{placeholder}` fields, checked when the file loads so that a typo fails at agent start-up
rather than at the first benchmark; `render` fills them in for one launch.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import socket
import string
import sys
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import urllib3
import yaml

from mecbench.core.errors import FailedPrecondition, InvalidArgument
from mecbench.core.request_env import served_process_env

PROBE_KINDS = ("http", "tcp", "grpc")
# Placeholders every template may use; `{port2}` .. `{portN}` come on top, up to `ports`.
NAMED_PLACEHOLDERS = frozenset({"host", "port", "model", "model_dir", "python", "profile"})
# A server on the head of a cluster SUT (SutConfig.cluster) also gets where its cluster's runtime
# listens and how many members it has (sut_agent/external/clusters.py).
CLUSTER_PLACEHOLDERS = frozenset({"cluster_address", "cluster_size"})
MAX_PORTS = 16
# A model name from a request ends up on a command line; this is every character real model
# names and paths use (Hugging Face ids, Ollama tags, file paths), and none a shell or an option
# parser gives a meaning to.
_SAFE_VALUE = re.compile(r"[A-Za-z0-9._:/@+=,~%-]+")
_MAX_VALUE_LENGTH = 512
_PROFILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_EXTRA_PORT = re.compile(r"port([1-9][0-9]*)")
_DEFAULT_READY_INTERVAL_S = 0.2
# Liveness probes run while a benchmark measures the server: a slower default keeps their
# traffic negligible next to the load.
_DEFAULT_LIVE_INTERVAL_S = 1.0
_DEFAULT_PROBE_TIMEOUT_S = 2.0

_PROFILE_KEYS = frozenset(
    {
        "command",
        "env",
        "cwd",
        "server_type",
        "endpoint",
        "ready",
        "live",
        "live_failures",
        "ready_timeout_s",
        "stop_command",
        "stop_signal",
        "stop_timeout_s",
        "ports",
        "host",
    }
)
_PROBE_KEYS = frozenset({*PROBE_KINDS, "service", "interval_s", "timeout_s"})


@dataclass(frozen=True)
class Probe:
    """One rendered health check: an HTTP GET, a TCP connect or a grpc.health.v1 Check."""

    kind: str  # "http" | "tcp" | "grpc"
    target: str  # http: full URL; tcp and grpc: host:port
    grpc_service: str = ""  # grpc: the grpc.health.v1 service name ("" = the server as a whole)
    interval_s: float = _DEFAULT_READY_INTERVAL_S
    timeout_s: float = _DEFAULT_PROBE_TIMEOUT_S  # one attempt


@dataclass(frozen=True)
class ProbeTemplate:
    """A probe whose target is still a template."""

    kind: str
    target: str
    grpc_service: str = ""
    interval_s: float = _DEFAULT_READY_INTERVAL_S
    timeout_s: float = _DEFAULT_PROBE_TIMEOUT_S

    def render(self, values: Mapping[str, str]) -> Probe:
        return Probe(self.kind, _fill(self.target, values), self.grpc_service, self.interval_s, self.timeout_s)


@dataclass(frozen=True)
class LaunchProfile:
    name: str
    command: tuple[str, ...]  # argv template
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))  # added to the agent's environment
    cwd: str = ""  # "" = the agent's cwd
    server_type: str = ""  # default server type of configs that name this profile
    endpoint: str = "http://{host}:{port}"
    ready: ProbeTemplate = field(default_factory=lambda: ProbeTemplate("tcp", "{host}:{port}"))
    live: ProbeTemplate | None = None  # None: only the process's exit is watched
    live_failures: int = 3  # consecutive failed liveness probes that count as a hang
    ready_timeout_s: float = 120.0
    stop_command: tuple[str, ...] = ()  # () = signal the process group
    stop_signal: str = "SIGTERM"
    stop_timeout_s: float = 10.0  # grace before SIGKILL
    ports: int = 1  # free loopback ports to allocate: {port}, {port2}, ...
    host: str = "127.0.0.1"

    def templates(self) -> list[tuple[str, str]]:
        """Every template of the profile, with the key it came from."""
        found = [(f"command[{i}]", part) for i, part in enumerate(self.command)]
        found += [(f"env.{key}", value) for key, value in self.env.items()]
        found += [("cwd", self.cwd), ("endpoint", self.endpoint), ("ready", self.ready.target)]
        if self.live is not None:
            found.append(("live", self.live.target))
        found += [(f"stop_command[{i}]", part) for i, part in enumerate(self.stop_command)]
        return found

    def placeholders(self) -> frozenset[str]:
        """The placeholders the profile's templates use, e.g. {"host", "port", "model"}."""
        used: set[str] = set()
        for key, template in self.templates():
            try:
                used.update(template_fields(template))
            except ValueError as error:
                raise FailedPrecondition(f"launch profile {self.name}: {key}: {error}") from error
        return frozenset(used)


@dataclass(frozen=True)
class RenderedLaunch:
    """A profile with every placeholder filled in: what one server process is started with."""

    argv: tuple[str, ...]
    env: dict[str, str]  # the full environment: the agent's (less MECBENCH_*), the request's, the profile's
    cwd: str | None
    endpoint: str
    ready: Probe
    live: Probe | None
    stop_argv: tuple[str, ...] = ()


def template_fields(template: str) -> list[str]:
    """The placeholder names in a template; ValueError if it is malformed."""
    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise ValueError(f"bad template {template!r} ({error}); write {{{{ and }}}} for literal braces") from error
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name:
            raise ValueError(f"empty placeholder {{}} in {template!r}; write {{{{}}}} for literal braces")
        if spec or conversion:
            raise ValueError(f"placeholder {{{name}}} takes no format or conversion in {template!r}")
        names.append(name)
    return names


def port_values(ports: Sequence[int]) -> dict[str, str]:
    """Template values of allocated ports: {"port": first, "port2": second, ...}."""
    return {("port" if i == 0 else f"port{i + 1}"): str(port) for i, port in enumerate(ports)}


def unsafe_value_reason(value: str) -> str | None:
    """Why a value from a request (a model name) may not go on a command line, or None if it may."""
    if not value:
        return "must not be empty"
    if len(value) > _MAX_VALUE_LENGTH:
        return f"must be at most {_MAX_VALUE_LENGTH} characters"
    if value.startswith("-"):
        return "must not start with '-' (it would read as a command-line option)"
    if not _SAFE_VALUE.fullmatch(value):
        return "may only contain letters, digits and . _ : / @ + = , ~ % -"
    if ".." in value.split("/"):
        return "must not contain a '..' path segment"
    return None


def render(
    profile: LaunchProfile,
    values: Mapping[str, str],
    *,
    untrusted: Collection[str] = ("model",),
    request_env: Mapping[str, str] | None = None,
) -> RenderedLaunch:
    """Fill in a profile's templates. `values` gives the ports (see `port_values`), `model` and
    `model_dir`; `host`, `python` and `profile` default to the profile's host, this interpreter and
    the profile's name. Values named in `untrusted` come from requests and must pass
    `unsafe_value_reason` where the profile uses them (InvalidArgument, field = the value's name);
    a placeholder with no value is FailedPrecondition."""
    merged = {"host": profile.host, "python": sys.executable, "profile": profile.name, **values}
    used = profile.placeholders()
    for key in sorted(used & set(untrusted)):
        reason = unsafe_value_reason(merged.get(key, ""))
        if reason is not None:
            raise InvalidArgument(f"{reason} (launch profile {profile.name} puts it on a command line)", field=key)
    missing = sorted(used - merged.keys())
    if missing:
        names = ", ".join(f"{{{name}}}" for name in missing)
        raise FailedPrecondition(f"launch profile {profile.name} needs a value for {names}")
    # The request's variables (checked against the reserved names and the operator's allowlist)
    # reach the server only; the profile's, the operator's, win over them.
    environment = served_process_env(
        request_env or {}, {key: _fill(value, merged) for key, value in profile.env.items()}
    )
    cwd = _fill(profile.cwd, merged)
    return RenderedLaunch(
        argv=tuple(_fill(part, merged) for part in profile.command),
        env=environment,
        cwd=cwd or None,
        endpoint=_fill(profile.endpoint, merged),
        ready=profile.ready.render(merged),
        live=profile.live.render(merged) if profile.live is not None else None,
        stop_argv=tuple(_fill(part, merged) for part in profile.stop_command),
    )


def allocate_ports(count: int, host: str) -> list[int]:
    """`count` distinct free TCP ports on `host`, found by binding port 0. The sockets are closed
    before this returns, so call it right before the launch: the ports are free, not reserved."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            family, kind, proto, _, address = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.bind(address)
        return [int(sock.getsockname()[1]) for sock in sockets]
    except OSError as error:
        raise FailedPrecondition(f"cannot allocate {count} free port(s) on {host}: {error}") from error
    finally:
        for sock in sockets:
            sock.close()


def _fill(template: str, values: Mapping[str, str]) -> str:
    try:
        return template.format_map(values)
    except (KeyError, ValueError, IndexError, AttributeError) as error:
        raise FailedPrecondition(f"cannot fill in template {template!r}: {error!r}") from error


# --- Loading ---------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """YAML that rejects duplicate keys: a profile defined twice must not silently replace the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            # `<<: *anchor` merge keys may legitimately repeat and be overridden.
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"duplicate key {key_node.value!r}",
                        key_node.start_mark,
                    )
                seen.add(key)
        return super().construct_mapping(node, deep)


def _reject_duplicate_json_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def load_profiles(path: Path) -> dict[str, LaunchProfile]:
    """Every profile of a YAML (or .json) profiles file. Bad content raises FailedPrecondition
    naming the file and, for each problem, `profiles.NAME.KEY` and why."""
    document = read_document(path)
    problems: list[str] = []
    profiles: dict[str, LaunchProfile] = {}
    if not isinstance(document, Mapping):
        problems.append("the file must be a mapping with a `profiles` key")
    else:
        problems += [
            f"{key}: unknown key (only `profiles` and `clusters` are allowed)"
            for key in document if key not in ("profiles", "clusters")
        ]
        # A file of cluster profiles only (a cluster worker's agent serves no server) needs none.
        entries = document.get("profiles", {} if "clusters" in document else None)
        if not isinstance(entries, Mapping):
            problems.append("profiles: must be a mapping of profile name to profile")
        else:
            for name, raw in entries.items():
                profile = _ProfileReader(str(name), raw, problems, extra=CLUSTER_PLACEHOLDERS).read()
                if profile is not None:
                    profiles[profile.name] = profile
    if problems:
        raise FailedPrecondition(f"server profiles {path}: " + "; ".join(problems))
    return profiles


def read_document(path: Path) -> object:
    """The parsed YAML (or .json) of a profiles file; FailedPrecondition when it cannot be read."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise FailedPrecondition(f"cannot read server profiles {path}: {error}") from error
    try:
        if path.suffix.lower() == ".json":
            document: object = json.loads(text, object_pairs_hook=_reject_duplicate_json_keys)
        else:
            document = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader subclass: no arbitrary objects
    except (ValueError, yaml.YAMLError) as error:
        raise FailedPrecondition(f"server profiles {path} are not valid {_format_name(path)}: {error}") from error
    return document


def _format_name(path: Path) -> str:
    return "JSON" if path.suffix.lower() == ".json" else "YAML"


class _ProfileReader:
    """Reads one profile, recording every problem (as `profiles.NAME.KEY: why`) rather than stopping at the first."""

    def __init__(
        self, name: str, raw: object, problems: list[str], where: str = "profiles",
        extra: frozenset[str] = frozenset(), keys: frozenset[str] = _PROFILE_KEYS,
    ) -> None:
        self.name = name
        self.where = where
        self.extra = extra  # placeholders this kind of profile may use beside NAMED_PLACEHOLDERS
        self.keys = keys
        self.raw: Mapping[Any, Any] = raw if isinstance(raw, Mapping) else {}
        self.problems = problems
        self.valid = True
        if not _PROFILE_NAME.fullmatch(name):
            self.problem("", "a profile name is 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit")
        if not isinstance(raw, Mapping):
            self.problem("", "must be a mapping of profile keys")

    def problem(self, key: str, why: str) -> None:
        self.valid = False
        where = f"{self.where}.{self.name}" + (f".{key}" if key else "")
        self.problems.append(f"{where}: {why}")

    def read(self) -> LaunchProfile | None:
        for key in self.raw:
            if key not in self.keys:
                self.problem(str(key), f"unknown key (known: {', '.join(sorted(self.keys))})")
        ports = self.integer("ports", 1, 0, MAX_PORTS)
        host = self.string("host", "127.0.0.1")
        if not host or any(c.isspace() or c in "/{}" for c in host):
            self.problem("host", f"must be a host name or address, not {host!r}")
        command = self.argv("command", required=True)
        endpoint = self.string("endpoint", "http://{host}:{port}" if ports >= 1 else "")
        ready = self.probe("ready", _DEFAULT_READY_INTERVAL_S, ports)
        if ready is None and "ready" not in self.raw:
            example = 'ready: {http: "http://{host}:{port}/health"} or ready: {tcp: "{host}:{port}"}'
            self.problem("ready", f"is required, e.g. {example}")
        profile = LaunchProfile(
            name=self.name,
            command=command,
            env=MappingProxyType(self.env()),
            cwd=self.string("cwd", ""),
            server_type=self.string("server_type", ""),
            endpoint=endpoint,
            ready=ready or ProbeTemplate("tcp", "{host}:{port}"),
            live=self.probe("live", _DEFAULT_LIVE_INTERVAL_S, ports),
            live_failures=self.integer("live_failures", 3, 1, 1000),
            ready_timeout_s=self.number("ready_timeout_s", 120.0, 86400.0, zero_allowed=False),
            stop_command=self.argv("stop_command", required=False),
            stop_signal=self.signal_name("stop_signal", "SIGTERM"),
            stop_timeout_s=self.number("stop_timeout_s", 10.0, 3600.0, zero_allowed=True),
            ports=ports,
            host=host,
        )
        for key, template in profile.templates():
            self.check_template(key, template, ports)
        return profile if self.valid else None

    def check_template(self, key: str, template: str, ports: int) -> None:
        try:
            names = template_fields(template)
        except ValueError as error:
            self.problem(key, str(error))
            return
        for name in names:
            reason = _placeholder_problem(name, ports, self.extra)
            if reason is not None:
                self.problem(key, reason)

    def string(self, key: str, default: str) -> str:
        value = self.raw.get(key, default)
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        self.problem(key, f"must be a string, not {_kind(value)}")
        return default

    def number(self, key: str, default: float, maximum: float, zero_allowed: bool) -> float:
        value = self.raw.get(key, default)
        return self.checked_number(key, value, default, maximum, zero_allowed)

    def checked_number(self, key: str, value: object, default: float, maximum: float, zero_allowed: bool) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.problem(key, f"must be a number of seconds, not {_kind(value)}")
            return default
        if value < 0 or (value == 0 and not zero_allowed) or value > maximum:
            low = "0" if zero_allowed else "above 0"
            self.problem(key, f"must be {low} to {maximum:g} seconds, not {value}")
            return default
        return float(value)

    def integer(self, key: str, default: int, minimum: int, maximum: int) -> int:
        value = self.raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(key, f"must be a whole number, not {_kind(value)}")
            return default
        if not minimum <= value <= maximum:
            self.problem(key, f"must be {minimum} to {maximum}, not {value}")
            return default
        return value

    def argv(self, key: str, required: bool) -> tuple[str, ...]:
        value = self.raw.get(key)
        if value is None:
            if required:
                self.problem(key, "is required: a list of arguments or one string split as a shell would")
            return ()
        parts: Iterable[object]
        if isinstance(value, str):
            try:
                parts = shlex.split(value)
            except ValueError as error:
                self.problem(key, f"cannot be split into arguments: {error}")
                return ()
        elif isinstance(value, list):
            parts = value
        else:
            self.problem(key, f"must be a list of arguments or a string, not {_kind(value)}")
            return ()
        argv: list[str] = []
        for i, part in enumerate(parts):
            if isinstance(part, str):
                argv.append(part)
            elif isinstance(part, int) and not isinstance(part, bool):
                argv.append(str(part))
            else:
                self.problem(f"{key}[{i}]", f"must be a string (quote it), not {_kind(part)}")
                argv.append("")  # keeps the later arguments' indexes right in further messages
        if not argv and (required or value):
            self.problem(key, "must name a program")
        elif argv and not argv[0]:
            self.problem(f"{key}[0]", "must name a program")
        return tuple(argv)

    def env(self) -> dict[str, str]:
        value = self.raw.get("env", {})
        if not isinstance(value, Mapping):
            self.problem("env", f"must be a mapping of variable name to value, not {_kind(value)}")
            return {}
        env: dict[str, str] = {}
        for name, text in value.items():
            if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
                self.problem(f"env.{name}", "is not a valid environment variable name")
            elif isinstance(text, str):
                env[name] = text
            elif isinstance(text, int | float) and not isinstance(text, bool):
                env[name] = str(text)
            else:
                self.problem(f"env.{name}", f"must be a string (quote it), not {_kind(text)}")
        return env

    def signal_name(self, key: str, default: str) -> str:
        value = self.string(key, default).upper()
        name = value if value.startswith("SIG") else f"SIG{value}"
        if name not in signal.Signals.__members__:
            self.problem(key, f"unknown signal {value!r} (e.g. SIGTERM, SIGINT)")
            return default
        return name

    def probe(self, key: str, default_interval_s: float, ports: int) -> ProbeTemplate | None:
        if key not in self.raw:
            return None
        block = self.raw[key]
        shape = 'a mapping with one of http: URL, tcp: "host:port" or grpc: "host:port"'
        if not isinstance(block, Mapping):
            self.problem(key, f"must be {shape}, not {_kind(block)}")
            return None
        for name in block:
            if name not in _PROBE_KEYS:
                self.problem(f"{key}.{name}", f"unknown key (known: {', '.join(sorted(_PROBE_KEYS))})")
        kinds = [kind for kind in PROBE_KINDS if kind in block]
        if len(kinds) != 1:
            self.problem(key, f"must be {shape}" + (f", not several ({', '.join(kinds)})" if kinds else ""))
            return None
        kind = kinds[0]
        target = block[kind]
        if not isinstance(target, str) or not target:
            self.problem(f"{key}.{kind}", f"must be a non-empty string, not {_kind(target)}")
            return None
        service = block.get("service", "")
        if "service" in block and kind != "grpc":
            self.problem(f"{key}.service", "only a grpc probe names a service")
        if not isinstance(service, str):
            self.problem(f"{key}.service", f"must be a string, not {_kind(service)}")
            service = ""
        interval_s = self.checked_number(
            f"{key}.interval_s", block.get("interval_s", default_interval_s), default_interval_s, 3600.0, False
        )
        default_timeout_s = _DEFAULT_PROBE_TIMEOUT_S
        timeout_s = self.checked_number(
            f"{key}.timeout_s", block.get("timeout_s", default_timeout_s), default_timeout_s, 3600.0, False
        )
        reason = _probe_target_problem(kind, target, ports, self.extra)
        if reason is not None:
            self.problem(f"{key}.{kind}", reason)
        return ProbeTemplate(kind, target, service, interval_s, timeout_s)


def _placeholder_problem(name: str, ports: int, extra: frozenset[str] = frozenset()) -> str | None:
    numbered = _EXTRA_PORT.fullmatch(name)
    if name == "port":
        number = 1
    elif numbered is not None and int(numbered.group(1)) >= 2:
        number = int(numbered.group(1))
    elif numbered is not None:
        return f"unknown placeholder {{{name}}}: the first port is {{port}}"
    elif name in NAMED_PLACEHOLDERS or name in extra:
        return None
    else:
        known = "{host}, {port}, {port2}..{portN}, {model}, {model_dir}, {python}, {profile}" + "".join(
            f", {{{other}}}" for other in sorted(extra)
        )
        return f"unknown placeholder {{{name}}} (known: {known}; write {{{{ and }}}} for literal braces)"
    if number > ports:
        return f"uses {{{name}}} but the profile allocates {ports} port(s); set ports: {number}"
    return None


def _probe_target_problem(kind: str, target: str, ports: int, extra: frozenset[str] = frozenset()) -> str | None:
    """Checks a probe target's shape with sample values, so `tcp: http://...` fails at load time."""
    try:
        names = template_fields(target)
    except ValueError:
        return None  # reported with the templates
    if any(_placeholder_problem(name, ports, extra) for name in names):
        return None
    sample = {name: "127.0.0.1" if name == "host" else "1" if name.startswith("port") else "x" for name in names}
    rendered = target.format_map(sample)
    if kind == "http":
        try:
            url = urllib3.util.parse_url(rendered)
        except urllib3.exceptions.LocationParseError as error:
            return f"is not a URL: {error}"
        if url.scheme not in ("http", "https") or not url.host:
            return f"must be an http:// or https:// URL, not {target!r}"
        return None
    host, _, port = rendered.rpartition(":")
    if not host or "/" in rendered or not port.isdigit() or not 0 < int(port) < 65536:
        return f'must be "host:port", e.g. "{{host}}:{{port}}", not {target!r}'
    return None


def _kind(value: object) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"
