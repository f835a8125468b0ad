"""The environment a request may give the inference server, and never an agent.

An agent's own settings come from its operator alone (its deployment, its environment, its
settings file). A request's `SutConfig.env` is the environment of the *served* process (an
external server the SUT agent starts, or the server container of a pod), and only after this
filter: the name must be a plain variable name, names that change how a program loads code,
finds files, trusts peers or configures MECBench itself are always refused, and the operator can
narrow what is left to an allowlist of names or `PREFIX*` patterns.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable, Mapping

from mecbench.core.errors import Violations

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_ENTRIES = 256
MAX_VALUE_BYTES = 32 * 1024

# Always refused, whatever the operator allows. Matched without regard to case (a program may
# read `http_proxy` or `HTTP_PROXY`).
RESERVED: tuple[str, ...] = (
    "MECBENCH_*",  # the agents' own settings
    "LD_*", "DYLD_*", "GLIBC_TUNABLES", "MALLOC_*", "GCONV_PATH",  # the dynamic loader and libc
    "PYTHON*", "PERL5*", "PERLLIB", "RUBY*", "NODE_OPTIONS", "NODE_PATH", "JAVA_TOOL_OPTIONS",
    "_JAVA_OPTIONS", "JDK_JAVA_OPTIONS", "CLASSPATH", "LUA_*",  # interpreters loading code
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "TMPDIR", "PWD", "IFS", "ENV", "BASH_ENV", "BASH_FUNC_*",
    "SHELLOPTS", "PS4", "PROMPT_COMMAND",  # the shell and where files are looked for
    "GRPC_*", "SSL_*", "OPENSSL_*", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS",
    "*_PROXY", "HOSTALIASES", "LOCALDOMAIN", "RES_OPTIONS", "KUBECONFIG", "KUBERNETES_*",
    "AWS_*", "MINIO_*",  # whom the server trusts and talks to, and credentials
    "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES",  # the GPUs are the node agent's to give
)


def _matches(name: str, patterns: Iterable[str]) -> str | None:
    upper = name.upper()
    for pattern in patterns:
        if fnmatch.fnmatchcase(upper, pattern.upper()):
            return pattern
    return None


def check_request_env(
    env: Mapping[str, str], field: str, allowed: Iterable[str] = (), violations: Violations | None = None
) -> Violations:
    """Every problem with a request's environment, one violation per refused name (`{field}.{NAME}`).

    `allowed` is the operator's allowlist (names or `PREFIX*` patterns); empty allows every name
    that is not reserved."""
    violations = violations if violations is not None else Violations()
    allowlist = tuple(allowed)
    if len(env) > MAX_ENTRIES:
        violations.add(field, f"at most {MAX_ENTRIES} variables")
    for name, value in sorted(env.items()):
        where = f"{field}.{name}" if ENV_NAME.match(name) else field
        if not ENV_NAME.match(name):
            violations.add(where, f"{name[:64]!r} is not an environment variable name ([A-Za-z_][A-Za-z0-9_]*)")
            continue
        reserved = _matches(name, RESERVED)
        if reserved is not None:
            violations.add(where, f"{name} is reserved ({reserved}): a request never sets it")
        elif allowlist and _matches(name, allowlist) is None:
            allowed_text = ", ".join(allowlist)
            violations.add(where, f"{name} is not allowed by this SUT agent's operator (allowed: {allowed_text})")
        if "\x00" in value or len(value.encode()) > MAX_VALUE_BYTES:
            violations.add(where, f"a value has no NUL byte and at most {MAX_VALUE_BYTES} bytes")
    return violations


def served_process_env(request_env: Mapping[str, str], operator_env: Mapping[str, str]) -> dict[str, str]:
    """The environment of a served process: this process's own, less MECBench's settings (the
    server has no business with the agent's tokens or certificates), then the request's (already
    checked), then the operator's (a launch profile's, the GPUs the node agent gave), which win."""
    environment = {key: value for key, value in os.environ.items() if not key.upper().startswith("MECBENCH_")}
    environment.update(request_env)
    environment.update(operator_env)
    return environment
